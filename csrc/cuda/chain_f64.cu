// Kernels of the CUDA Givens chain for double activations (one translation unit per dtype, so that the
// build compiles them in parallel). Everything is in chain_kernels.cuh.
#include "chain_kernels.cuh"

QGOFT_DEFINE_CHAIN_LAUNCHERS(double, f64)
