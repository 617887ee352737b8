// avx2 variant of the CPU Givens-chain kernels (compile flags set in CMakeLists.txt).
#define QGOFT_ISA_NS avx2
#define QGOFT_LANES 8
#define QGOFT_VECS 4
#include "chain_kernel_impl.h"
