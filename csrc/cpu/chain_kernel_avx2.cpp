// avx2 variant of the CPU Givens-chain kernels (-mavx2 -mfma -mf16c, see CMakeLists.txt): 8 lanes,
// tiles of 16 rows when they fit kSmallTileBytes, else 8.
#define QGOFT_ISA_NS avx2
#define QGOFT_LANES 8
#define QGOFT_VECS 1
#define QGOFT_VECS_SMALL_TILE 2
#include "chain_kernel_impl.h"
