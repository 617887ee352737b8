// dtype dispatch of the CUDA Givens-chain launchers (chain_cuda.h), and the two small kernels that do
// not depend on the activation dtype: blocks from angles, and the reduction of the partial rows.
#include "chain_kernels.cuh"

QGOFT_CHAIN_LAUNCHER_DECLS(f32)
QGOFT_CHAIN_LAUNCHER_DECLS(f64)
QGOFT_CHAIN_LAUNCHER_DECLS(bf16)
QGOFT_CHAIN_LAUNCHER_DECLS(f16)

namespace qgoft::cuda {

#define QGOFT_DISPATCH_DTYPE(t, call)           \
  switch (t) {                                  \
    case DType::Float32: return detail::call(f32); \
    case DType::Float64: return detail::call(f64); \
    case DType::BFloat16: return detail::call(bf16); \
    case DType::Float16: return detail::call(f16); \
  }

#define QGOFT_PF(sfx) parallel_forward_##sfx(vec, a, c, s)
void parallel_forward(DType t, bool vec, const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s) {
  QGOFT_DISPATCH_DTYPE(t, QGOFT_PF)
}
#define QGOFT_PTF(sfx) parallel_top_forward_##sfx(a, c, s)
void parallel_top_forward(DType t, const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s) {
  QGOFT_DISPATCH_DTYPE(t, QGOFT_PTF)
}
#define QGOFT_PB(sfx) parallel_backward_##sfx(vec, grads, a, c, s)
void parallel_backward(DType t, bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                       cudaStream_t s) {
  QGOFT_DISPATCH_DTYPE(t, QGOFT_PB)
}
#define QGOFT_PBO(sfx) parallel_backward_occupancy_##sfx(vec, grads, threads, smem)
int parallel_backward_occupancy(DType t, bool vec, bool grads, int threads, size_t smem) {
  QGOFT_DISPATCH_DTYPE(t, QGOFT_PBO)
  return 1;
}
#define QGOFT_GF(sfx) general_forward_##sfx(a, c, s)
void general_forward(DType t, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  QGOFT_DISPATCH_DTYPE(t, QGOFT_GF)
}
#define QGOFT_GB(sfx) general_backward_##sfx(grads, a, c, s)
void general_backward(DType t, bool grads, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  QGOFT_DISPATCH_DTYPE(t, QGOFT_GB)
}
#define QGOFT_GBO(sfx) general_backward_occupancy_##sfx(grads, threads, smem)
int general_backward_occupancy(DType t, bool grads, int threads, size_t smem) {
  QGOFT_DISPATCH_DTYPE(t, QGOFT_GBO)
  return 1;
}

namespace {
inline unsigned grid_for(int64_t items, int threads, int64_t max_blocks) {
  int64_t blocks = (items + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned>(blocks);
}
}  // namespace

void givens_blocks(bool acc_double, bool angles_double, const GivensArgs& a, cudaStream_t s) {
  const unsigned grid = grid_for(a.num_pairs, 256, 4096);
  if (acc_double) {
    if (angles_double) detail::givens_blocks_kernel<double, double><<<grid, 256, 0, s>>>(a);
    else detail::givens_blocks_kernel<double, float><<<grid, 256, 0, s>>>(a);
  } else {
    if (angles_double) detail::givens_blocks_kernel<float, double><<<grid, 256, 0, s>>>(a);
    else detail::givens_blocks_kernel<float, float><<<grid, 256, 0, s>>>(a);
  }
}

void reduce_partials(bool acc_double, bool givens, const ReduceArgs& a, cudaStream_t s) {
  const unsigned grid = grid_for(a.num_pairs + a.d, 256, 8192);
  if (acc_double) {
    if (givens) detail::reduce_partials_kernel<double, true><<<grid, 256, 0, s>>>(a);
    else detail::reduce_partials_kernel<double, false><<<grid, 256, 0, s>>>(a);
  } else {
    if (givens) detail::reduce_partials_kernel<float, true><<<grid, 256, 0, s>>>(a);
    else detail::reduce_partials_kernel<float, false><<<grid, 256, 0, s>>>(a);
  }
}

}  // namespace qgoft::cuda
