// Per-dtype launchers of the CUDA Givens-chain kernels (host side, no device code): declared here for the
// dtype dispatch in chain_launch.cu, defined in chain_launch.cuh and instantiated once per activation
// dtype in chain_<dtype>.cu. Each launches exactly one kernel on `s`; the caller checks the launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "chain_cuda.h"

namespace qgoft::cuda::detail {

template <class S>
struct Launchers {
  static void parallel_forward(bool vec, const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s);
  static void parallel_top_forward(const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s);
  static void parallel_backward(bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                                cudaStream_t s);
  static int parallel_backward_occupancy(bool vec, bool grads, const ParallelArgs& a, int threads, size_t smem);
  static void parallel_stack_backward(bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                                      cudaStream_t s);
  static int parallel_stack_backward_occupancy(bool vec, bool grads, const ParallelArgs& a, int threads, size_t smem);
  static void general_forward(const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s);
  static void butterfly_forward(bool vec, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s);
  static void butterfly_backward(bool vec, bool grads, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s);
  static void general_backward(bool grads, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s);
  static int general_backward_occupancy(bool grads, int threads, size_t smem);
};

extern template struct Launchers<float>;
extern template struct Launchers<double>;
extern template struct Launchers<__nv_bfloat16>;
extern template struct Launchers<__half>;

}  // namespace qgoft::cuda::detail
