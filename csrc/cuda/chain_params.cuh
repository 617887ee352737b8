// Parameter-side kernels of the CUDA Givens chain, independent of the activation dtype: the (P, 4) block
// table from the angles, and the fixed-order reduction of the backward's per-block partial rows into the
// parameter gradients (docs/CUDA.md, "Deterministic reduction").
#pragma once

#include "chain_device.cuh"

namespace qgoft::cuda::detail {

__device__ __forceinline__ void sin_cos(float v, float* s, float* c) { sincosf(v, s, c); }
__device__ __forceinline__ void sin_cos(double v, double* s, double* c) { sincos(v, s, c); }

template <class A, class In>
__global__ void __launch_bounds__(256) givens_blocks_kernel(const GivensArgs a) {
  const In* angles = static_cast<const In*>(a.angles);
  A* out = static_cast<A*>(a.blocks);
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < a.num_pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A theta = static_cast<A>(angles[p]);
    A s, c;
    sin_cos(theta, &s, &c);
    out[4 * p] = c;
    out[4 * p + 1] = -s;
    out[4 * p + 2] = s;
    out[4 * p + 3] = c;
  }
}

// Item k < P: the 4 block entries of pair k summed over the slots in slot order (givens: combined
// into d theta = -s a00 - c a01 + c a10 - s a11, with (c, -s, s, c) the block); item P + c: scale c.
template <class A, bool kGivens>
__global__ void __launch_bounds__(256) reduce_partials_kernel(const ReduceArgs a) {
  const A* partial = static_cast<const A*>(a.partial);
  const int64_t P = a.num_pairs, items = P + a.d;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < items;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (k < P) {
      if (a.grad_params == nullptr) continue;
      A s0 = A(0), s1 = A(0), s2 = A(0), s3 = A(0);
      const A* col = partial + 4 * k;
#pragma unroll 4
      for (int64_t b = 0; b < a.slots; ++b) {
        A v0, v1, v2, v3;
        load_block(col + b * a.partial_ld, 0, v0, v1, v2, v3);
        s0 += v0;
        s1 += v1;
        s2 += v2;
        s3 += v3;
      }
      if constexpr (kGivens) {
        A c, minus_s, sn, c_again;
        load_block(static_cast<const A*>(a.blocks), k, c, minus_s, sn, c_again);
        (void)minus_s;
        (void)c_again;
        static_cast<A*>(a.grad_params)[k] = -sn * s0 - c * s1 + c * s2 - sn * s3;
      } else {
        A* out = static_cast<A*>(a.grad_params) + 4 * k;
        out[0] = s0;
        out[1] = s1;
        out[2] = s2;
        out[3] = s3;
      }
    } else {
      if (a.grad_scale == nullptr) continue;
      const int64_t c = k - P;
      A s = A(0);
#pragma unroll 4
      for (int64_t b = 0; b < a.slots; ++b) s += partial[b * a.partial_ld + 4 * P + c];
      static_cast<A*>(a.grad_scale)[c] = s;
    }
  }
}

}  // namespace qgoft::cuda::detail
