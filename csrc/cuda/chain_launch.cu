// The entry points of chain_cuda.h: dtype dispatch to the per-dtype launchers (chain_launch.h,
// instantiated in chain_<dtype>.cu), and the launches of the dtype-independent kernels (blocks from
// angles; reduction of the partial rows, planned by plan_backward).
#include "chain_launch.h"
#include "chain_params.cuh"

namespace qgoft::cuda {
namespace {

template <class S>
struct Tag {
  using type = S;
};

// f(Tag<S>{}) for the activation type S of t.
template <class F>
auto by_dtype(DType t, F&& f) {
  switch (t) {
    case DType::Float64: return f(Tag<double>{});
    case DType::BFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::Float16: return f(Tag<__half>{});
    case DType::Float32: break;
  }
  return f(Tag<float>{});
}

template <class T>
using L = detail::Launchers<typename T::type>;

inline unsigned grid_for(int64_t items, int threads, int64_t max_blocks) {
  int64_t blocks = (items + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace

void parallel_forward(DType t, bool vec, const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s) {
  by_dtype(t, [&](auto tag) { L<decltype(tag)>::parallel_forward(vec, a, c, s); });
}
void parallel_top_forward(DType t, const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s) {
  by_dtype(t, [&](auto tag) { L<decltype(tag)>::parallel_top_forward(a, c, s); });
}
void parallel_backward(DType t, bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                       cudaStream_t s) {
  by_dtype(t, [&](auto tag) { L<decltype(tag)>::parallel_backward(vec, grads, a, c, s); });
}
int parallel_backward_occupancy(DType t, bool vec, bool grads, const ParallelArgs& a, int threads, size_t smem) {
  return by_dtype(t, [&](auto tag) {
    return L<decltype(tag)>::parallel_backward_occupancy(vec, grads, a, threads, smem);
  });
}
void parallel_stack_backward(DType t, bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                             cudaStream_t s) {
  by_dtype(t, [&](auto tag) { L<decltype(tag)>::parallel_stack_backward(vec, grads, a, c, s); });
}
int parallel_stack_backward_occupancy(DType t, bool vec, bool grads, const ParallelArgs& a, int threads,
                                      size_t smem) {
  return by_dtype(t, [&](auto tag) {
    return L<decltype(tag)>::parallel_stack_backward_occupancy(vec, grads, a, threads, smem);
  });
}
void general_forward(DType t, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  by_dtype(t, [&](auto tag) { L<decltype(tag)>::general_forward(a, c, s); });
}
void butterfly_forward(DType t, bool vec, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  by_dtype(t, [&](auto tag) { L<decltype(tag)>::butterfly_forward(vec, a, c, s); });
}
void butterfly_backward(DType t, bool vec, bool grads, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  by_dtype(t, [&](auto tag) { L<decltype(tag)>::butterfly_backward(vec, grads, a, c, s); });
}
void general_backward(DType t, bool grads, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  by_dtype(t, [&](auto tag) { L<decltype(tag)>::general_backward(grads, a, c, s); });
}
int general_backward_occupancy(DType t, bool grads, int threads, size_t smem) {
  return by_dtype(t, [&](auto tag) { return L<decltype(tag)>::general_backward_occupancy(grads, threads, smem); });
}

void givens_blocks(bool acc_double, bool angles_double, const GivensArgs& a, cudaStream_t s) {
  const unsigned grid = grid_for(a.num_pairs, 256, 4096);
  auto k = acc_double ? (angles_double ? detail::givens_blocks_kernel<double, double>
                                       : detail::givens_blocks_kernel<double, float>)
                      : (angles_double ? detail::givens_blocks_kernel<float, double>
                                       : detail::givens_blocks_kernel<float, float>);
  k<<<grid, 256, 0, s>>>(a);
}

void reduce_partials(bool acc_double, bool givens, const ReduceArgs& a, const LaunchConfig& c, cudaStream_t s) {
  auto k = acc_double ? (givens ? detail::reduce_partials_kernel<double, true>
                                : detail::reduce_partials_kernel<double, false>)
                      : (givens ? detail::reduce_partials_kernel<float, true>
                                : detail::reduce_partials_kernel<float, false>);
  k<<<c.grid, c.threads, c.smem, s>>>(a);
}

}  // namespace qgoft::cuda
