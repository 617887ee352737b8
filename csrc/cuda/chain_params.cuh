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

// Item k summed over the slots of lane j (j, j + lanes, j + 2 lanes, ... < slots) in that order into s: 16-byte
// loads of entries 4k .. 4k + 3, those of kReduceBatch slots issued before their sums. The last scale item when
// d % 4 != 0 (entries past 4P + d: the rows' padding, never written) loads its entries below 4P + d one by one.
template <class A>
__device__ __forceinline__ void sum_lane_slots(const ReduceArgs& a, int64_t k, int j, A (&s)[4]) {
  const A* col = static_cast<const A*>(a.partial) + 4 * k;
  const int64_t width = 4 * a.num_pairs + a.d, step = a.lanes * a.partial_ld;
  if (4 * k + 4 > width) {
    for (int64_t b = j; b < a.slots; b += a.lanes) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (4 * k + c < width) s[c] += __ldg(col + b * a.partial_ld + c);
      }
    }
    return;
  }
  const int64_t stride = int64_t(kReduceBatch) * a.lanes;
  for (int64_t b0 = j; b0 < a.slots; b0 += stride) {
    const A* row = col + b0 * a.partial_ld;
    const int64_t left = (a.slots - b0 + a.lanes - 1) / a.lanes;  // this lane's slots from b0 on
    const int n = left < kReduceBatch ? static_cast<int>(left) : kReduceBatch;
    A v[kReduceBatch][4];
#pragma unroll
    for (int u = 0; u < kReduceBatch; ++u) {
      if (u < n) load_block(row + u * step, 0, v[u][0], v[u][1], v[u][2], v[u][3]);
    }
#pragma unroll
    for (int u = 0; u < kReduceBatch; ++u) {
      if (u < n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) s[c] += v[u][c];
      }
    }
  }
}

// Item k's gradients from its sums over all slots: pair k's block gradient (givens: combined into
// d theta = -s a00 - c a01 + c a10 - s a11, with (c, -s, s, c) the block), or scale entries 4 (k - P) .. below d.
template <class A, bool kGivens>
__device__ __forceinline__ void write_item(const ReduceArgs& a, int64_t k, const A (&s)[4]) {
  const int64_t P = a.num_pairs;
  if (k < P) {
    if constexpr (kGivens) {
      A c, minus_s, sn, c_again;
      load_block(static_cast<const A*>(a.blocks), k, c, minus_s, sn, c_again);
      (void)minus_s;
      (void)c_again;
      static_cast<A*>(a.grad_params)[k] = -sn * s[0] - c * s[1] + c * s[2] - sn * s[3];
    } else {
      A* out = static_cast<A*>(a.grad_params) + 4 * k;
#pragma unroll
      for (int c = 0; c < 4; ++c) out[c] = s[c];
    }
  } else {
    const int64_t c0 = 4 * (k - P);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (c0 + c < a.d) static_cast<A*>(a.grad_scale)[c0 + c] = s[c];
    }
  }
}

// The parameter gradients from the backward's partial rows (docs/CUDA.md, "Deterministic reduction"; items and
// lanes: ReduceItems). Thread tid = j (kReduceThreads / lanes) + i takes item i of its block's group and lane j:
// the warp's loads of one slot row cover consecutive items. Lane j sums its slots in order (sum_lane_slots), then
// a fixed tree over the lanes adds lane j + h into lane j for h = lanes / 2, lanes / 4, ..., 1: through shared
// memory where lane j + h lies in another warp, by shuffles within a warp. The order of every addition depends
// on slots and lanes only, never on scheduling: bitwise reproducible. lanes = 1 (QGOFT_CUDA_REDUCE=serial) is one
// thread per item summing every slot in slot order.
template <class A, bool kGivens>
__global__ void __launch_bounds__(kReduceThreads, sizeof(A) == 4 ? 4 : 2) reduce_partials_kernel(const ReduceArgs a) {
  QGOFT_DYNAMIC_SMEM(A, buf);  // [4][kReduceThreads]: entry c of thread tid's sums at c kReduceThreads + tid
  const ReduceItems items(a.num_pairs, a.d, a.grad_params != nullptr, a.grad_scale != nullptr);
  const int lanes = a.lanes, per_block = kReduceThreads / lanes;
  const int tid = threadIdx.x, i = tid % per_block, j = tid / per_block;
  for (int64_t group = items.first + int64_t(blockIdx.x) * per_block; group < items.end;
       group += int64_t(gridDim.x) * per_block) {
    const int64_t k = group + i;
    A s[4] = {A(0), A(0), A(0), A(0)};
    if (k < items.end) sum_lane_slots(a, k, j, s);
    for (int h = lanes >> 1; h > 0; h >>= 1) {
      const int step = h * per_block;  // lane j + h of item i is thread tid + step (for j < h)
      if (step >= 32) {
        if (j >= h && j < 2 * h) {
#pragma unroll
          for (int c = 0; c < 4; ++c) buf[c * kReduceThreads + tid] = s[c];
        }
        __syncthreads();
        if (j < h) {
#pragma unroll
          for (int c = 0; c < 4; ++c) s[c] += buf[c * kReduceThreads + tid + step];
        }
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const A other = __shfl_xor_sync(0xffffffffu, s[c], step);
          if (j < h) s[c] += other;
        }
      }
    }
    if (j == 0 && k < items.end) write_item<A, kGivens>(a, k, s);
    if (lanes > 1) __syncthreads();  // the next group's first writes to buf after this group's last reads (lanes 2)
  }
}

}  // namespace qgoft::cuda::detail
