// generic variant of the CPU Givens-chain kernels (baseline instruction set; 128-bit vectors).
#define QGOFT_ISA_NS generic
#define QGOFT_LANES 4
#define QGOFT_VECS 2
#include "chain_kernel_impl.h"
