// Kernels of general layouts (any layout: sequential, butterfly, stacked, custom). A block processes
// groups of R rows held in a buffer (shared memory or its slice of a global workspace): threads take the
// pairs of a layer (pair q of layer l belongs to thread (q - off[l]) mod blockDim for every row, so its
// gradient accumulator has one owner), __syncthreads between layers (it also orders the global
// workspace within the block). Design and costs: docs/CUDA.md.
#pragma once

#include "chain_device.cuh"

namespace qgoft::cuda::detail {

// The helpers below loop over a row's columns or a layer's pairs from the thread's index in steps of the block
// size, both of type I: int in the forward kernel, unsigned (threadIdx.x, blockDim.x as they are) in the
// backward. The type moves ptxas's schedule: with unsigned ones the forward's pair loop recomputed the group's
// row count for every pair (bf16 row loop 643 SASS instructions against 627 of the sources before the CUDA
// restructure, whose kernels used int), with int ones the backward's kernels changed (-16 to +40 instructions).

// dst[r][c] = src row r (stride ld), converted to A, for the nr rows of a group (block-strided).
template <class I, class S, class A>
__device__ __forceinline__ void rows_in(A* dst, const S* src, int64_t ld, int nr, int64_t d) {
  const I first = static_cast<I>(threadIdx.x), step = static_cast<I>(blockDim.x);
  for (int r = 0; r < nr; ++r) {
    const S* sr = src + r * ld;
    A* dr = dst + r * d;
    for (int64_t c = first; c < d; c += step) dr[c] = Elem<S>::to(sr[c]);
  }
}

// Row r of dst (contiguous, width d) = src[r][c] (times scale[c] when scale is set).
template <class I, class S, class A>
__device__ __forceinline__ void rows_out(S* dst, const A* src, const A* scale, int nr, int64_t d) {
  const I first = static_cast<I>(threadIdx.x), step = static_cast<I>(blockDim.x);
  for (int r = 0; r < nr; ++r) {
    const A* sr = src + r * d;
    S* dr = dst + r * d;
    for (int64_t c = first; c < d; c += step) {
      A v = sr[c];
      if (scale != nullptr) v *= __ldg(scale + c);
      dr[c] = Elem<S>::from(v);
    }
  }
}

// Forward of the layers of a group of nr rows held in buf ([nr][d]); with a tape ([nr][2P]) the inputs
// of every block are recorded.
template <class I, class A>
__device__ __forceinline__ void general_layers_forward(const GeneralArgs& a, A* buf, int nr, A* tape) {
  const I first = static_cast<I>(threadIdx.x), step = static_cast<I>(blockDim.x);
  const A* blocks = static_cast<const A*>(a.blocks);
  const int2* pairs = reinterpret_cast<const int2*>(a.pairs);
  const int64_t d = a.d, P = a.num_pairs;
  for (int64_t l = 0; l < a.num_layers; ++l) {
    const int64_t begin = __ldg(a.offsets + l), end = __ldg(a.offsets + l + 1);
    for (int64_t q = begin + first; q < end; q += step) {
      const int2 ij = __ldg(pairs + q);
      A g0, g1, g2, g3;
      load_block(blocks, q, g0, g1, g2, g3);
      for (int r = 0; r < nr; ++r) {
        A* br = buf + r * d;
        const A xi = br[ij.x], xj = br[ij.y];
        if (tape != nullptr) {
          tape[r * 2 * P + 2 * q] = xi;
          tape[r * 2 * P + 2 * q + 1] = xj;
        }
        br[ij.x] = g0 * xi + g2 * xj;
        br[ij.y] = g1 * xi + g3 * xj;
      }
    }
    __syncthreads();
  }
}

template <class S>
__global__ void __launch_bounds__(kGeneralThreads) general_forward_kernel(const GeneralArgs a) {
  using A = typename Elem<S>::A;
  QGOFT_DYNAMIC_SMEM(A, smem);
  A* buf = a.workspace != nullptr
               ? static_cast<A*>(a.workspace) + static_cast<int64_t>(blockIdx.x) * a.ws_stride
               : smem;
  const int64_t d = a.d;
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row0 = g * a.R;
    const int nr = static_cast<int>(a.rows - row0 < a.R ? a.rows - row0 : a.R);
    rows_in<int>(buf, static_cast<const S*>(a.x) + row0 * a.x_ld, a.x_ld, nr, d);
    __syncthreads();
    general_layers_forward<int, A>(a, buf, nr, nullptr);
    rows_out<int>(static_cast<S*>(a.out) + row0 * d, buf, static_cast<const A*>(a.scale), nr, d);
    __syncthreads();
  }
}

template <class S, bool kGrads>
__global__ void __launch_bounds__(kGeneralThreads) general_backward_kernel(const GeneralArgs a) {
  using A = typename Elem<S>::A;
  QGOFT_DYNAMIC_SMEM(A, smem);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t d = a.d, P = a.num_pairs;
  const int R = a.R;
  const bool acc_blocks = kGrads && a.want_blocks;
  const bool acc_scale = kGrads && a.want_scale;
  const int64_t row_elems = general_row_elems(d, P, kGrads, acc_blocks);
  A* region = a.workspace != nullptr
                  ? static_cast<A*>(a.workspace) + static_cast<int64_t>(blockIdx.x) * a.ws_stride
                  : smem;
  A* z = region;                         // [R][d] forward state (kGrads)
  A* gb = region + (kGrads ? R * d : 0);  // [R][d] gradient
  A* tape = gb + R * d;                  // [R][2P] block inputs (acc_blocks)
  A* partial_row = kGrads ? static_cast<A*>(a.partial) + static_cast<int64_t>(blockIdx.x) * a.partial_ld
                          : nullptr;
  A* accb = nullptr;
  A* accs = nullptr;
  if constexpr (kGrads) {
    if (a.acc_in_smem) {
      A* acc = smem + (a.workspace != nullptr ? 0 : R * row_elems);
      accb = acc;
      accs = acc + (acc_blocks ? 4 * P : 0);
    } else {
      accb = partial_row;
      accs = partial_row + 4 * P;
    }
    if (acc_blocks) {
      for (int64_t k = tid; k < 4 * P; k += nt) accb[k] = A(0);
    }
    if (acc_scale) {
      for (int64_t k = tid; k < d; k += nt) accs[k] = A(0);
    }
  }
  const A* blocks = static_cast<const A*>(a.blocks);
  const A* scale = static_cast<const A*>(a.scale);
  const int2* pairs = reinterpret_cast<const int2*>(a.pairs);
  __syncthreads();

  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row0 = g * R;
    const int nr = static_cast<int>(a.rows - row0 < R ? a.rows - row0 : R);
    rows_in<unsigned>(gb, static_cast<const S*>(a.grad) + row0 * a.grad_ld, a.grad_ld, nr, d);
    if constexpr (kGrads) {
      rows_in<unsigned>(z, static_cast<const S*>(a.x) + row0 * a.x_ld, a.x_ld, nr, d);
      __syncthreads();
      general_layers_forward<unsigned, A>(a, z, nr, acc_blocks ? tape : nullptr);
      if (acc_scale) {
        for (int64_t c = tid; c < d; c += nt) {
          A s = A(0);
          for (int r = 0; r < nr; ++r) s += gb[r * d + c] * z[r * d + c];
          accs[c] += s;
        }
      }
    }
    if (scale != nullptr) {
      for (int r = 0; r < nr; ++r) {
        A* gbr = gb + r * d;
        for (int64_t c = tid; c < d; c += nt) gbr[c] *= __ldg(scale + c);
      }
    }
    __syncthreads();
    for (int64_t l = a.num_layers - 1; l >= 0; --l) {
      const int64_t begin = __ldg(a.offsets + l), end = __ldg(a.offsets + l + 1);
      for (int64_t q = begin + tid; q < end; q += nt) {
        const int2 ij = __ldg(pairs + q);
        A g0, g1, g2, g3;
        load_block(blocks, q, g0, g1, g2, g3);
        A sum[4] = {A(0), A(0), A(0), A(0)};
        for (int r = 0; r < nr; ++r) {
          A* gbr = gb + r * d;
          const A gi = gbr[ij.x], gj = gbr[ij.y];
          if (acc_blocks) accumulate_outer(sum, tape[r * 2 * P + 2 * q], tape[r * 2 * P + 2 * q + 1], gi, gj);
          gbr[ij.x] = g0 * gi + g1 * gj;
          gbr[ij.y] = g2 * gi + g3 * gj;
        }
        if (acc_blocks) {
#pragma unroll
          for (int k = 0; k < 4; ++k) accb[4 * q + k] += sum[k];
        }
      }
      __syncthreads();
    }
    if (a.out != nullptr) rows_out<unsigned>(static_cast<S*>(a.out) + row0 * d, gb, static_cast<const A*>(nullptr), nr, d);
    __syncthreads();
  }

  if constexpr (kGrads) {
    if (a.acc_in_smem) {
      __syncthreads();
      if (acc_blocks) {
        for (int64_t k = tid; k < 4 * P; k += nt) partial_row[k] = accb[k];
      }
      if (acc_scale) {
        for (int64_t k = tid; k < d; k += nt) partial_row[4 * P + k] = accs[k];
      }
    }
  }
}

}  // namespace qgoft::cuda::detail
