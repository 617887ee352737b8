// The CUDA Givens-chain kernels and launchers for __nv_bfloat16 activations: one translation unit per dtype,
// so that the build compiles them in parallel (see chain_launch.cuh).
#include "chain_launch.cuh"

template struct qgoft::cuda::detail::Launchers<__nv_bfloat16>;
