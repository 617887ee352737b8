// avx512 variant of the CPU Givens-chain kernels (-mavx512f/bw/vl/dq, see CMakeLists.txt).
#define QGOFT_ISA_NS avx512
#define QGOFT_LANES 16
#define QGOFT_VECS 1
#include "chain_kernel_impl.h"
