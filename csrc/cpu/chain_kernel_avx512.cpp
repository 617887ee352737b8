// avx512 variant of the CPU Givens-chain kernels (compile flags set in CMakeLists.txt).
#define QGOFT_ISA_NS avx512
#define QGOFT_LANES 16
#include "chain_kernel_impl.h"
