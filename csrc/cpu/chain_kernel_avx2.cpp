// avx2 variant of the CPU Givens-chain kernels (-mavx2 -mfma -mf16c, see CMakeLists.txt).
#define QGOFT_ISA_NS avx2
#define QGOFT_LANES 8
#define QGOFT_VECS 1
#include "chain_kernel_impl.h"
