// Backward kernel of stack(parallel(d), k), k >= 2 (ParallelArgs::reps = k): the parallel layout's layers k
// times, repetition j with its own blocks j (d - 1) .. (j + 1)(d - 1) - 1 (docs/MATH.md, layouts.stack). Rows fit
// one segment (nseg == 1): the per-layer machinery of chain_parallel.cuh (parallel_forward_local,
// parallel_backward_local, the sums writers) runs over the same registers, one pass over x and grad. (The
// forward is parallel_forward_kernel itself, which loops over the repetitions.)
// Design, counts and predictions: docs/CUDA.md ("XOR layouts").
#pragma once

#include "chain_parallel.cuh"

namespace qgoft::cuda::detail {

static_assert(sizeof(Tape<float>) == kTapeWords * sizeof(float), "kTapeWords must count Tape's values");

// A thread's tape to (kStore) or from shared memory: word w at at[w stride] (stride R T: conflict-free).
template <bool kStore, class A>
__device__ __forceinline__ void tape_smem(Tape<A>& tp, A* at, int64_t stride) {
  int w = 0;
  auto move = [&](A& r) {
    if constexpr (kStore) at[w * stride] = r;
    else r = at[w * stride];
    ++w;
  };
#pragma unroll
  for (int li = 0; li < kLogChunk; ++li) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) move(tp.x[li][e]);
  }
#pragma unroll
  for (int s = 0; s < 5; ++s) move(tp.sh[s]);
#pragma unroll
  for (int s = 0; s < 5; ++s) move(tp.top[s]);
}

// Backward: grad_x = chain^T(scale * grad) and (kGrads) the parameter gradients of the rows this block owns
// into partial row blockIdx.x. Per row: the forward through repetitions 0 .. reps-2, saving each one's tape
// (a.stack_tape) or input (shared memory, per thread); then for j = reps-1 .. 0: the tape of repetition j
// (the last one's from the forward through it; the others' from shared memory, or recomputed from their
// inputs), and the backward through it (parallel_backward_local). Every accumulator has one owner
// thread (no atomics): cross-thread pairs in cacc, in-thread pairs in iacc (StackBackwardSmem), the scale in
// registers; the block's sums are written per repetition at the end.
template <class S, bool kVec, bool kGrads, bool kTable>
__global__ void __launch_bounds__(512) parallel_stack_backward_kernel(const ParallelArgs a) {
  using A = typename Elem<S>::A;
  QGOFT_DYNAMIC_SMEM(A, sm);
  const Lanes ln(a);
  const int T = a.T, R = a.R, reps = a.reps;
  const int d = static_cast<int>(a.d);
  const int width = 4 * static_cast<int>(a.num_pairs) + d;
  const int64_t rt = static_cast<int64_t>(R) * T;
  const bool acc_blocks = kGrads && a.want_blocks;
  const bool acc_scale = kGrads && a.want_scale;
  const bool keep_tape = kGrads && a.stack_tape;
  const StackBackwardSmem layout(reps, R, T, width, acc_blocks, kGrads, kTable ? a.table : 0, keep_tape);
  A* xch = sm;
  A* cacc = sm + layout.cacc;
  A* iacc = sm + layout.iacc;
  A* vin = sm + layout.vin;
  const int64_t rep_cacc = 4 * static_cast<int64_t>(R) * (T - 1);
  const StackBlocks<A> blocks = stack_blocks<A, kTable>(a, ln, sm + layout.tab);
  const S* x = static_cast<const S*>(a.x);
  const S* grad = static_cast<const S*>(a.grad);
  S* gx = static_cast<S*>(a.out);

  A acc_s[kChunk];
#pragma unroll
  for (int e = 0; e < kChunk; ++e) acc_s[e] = A(0);
  if (acc_blocks) {
    for (int64_t k = ln.tid; k < layout.vin - layout.cacc; k += blockDim.x) cacc[k] = A(0);
  }
  __syncthreads();

  const int LS = shuffle_layers(a);
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row = g * R + ln.slot;
    const bool valid = row < a.rows;
    A gv[kChunk];
    load_chunk<S, kVec>(grad + row * a.grad_ld, ln.base, d, valid, gv);
    [[maybe_unused]] A v[kChunk];
    Tape<A> tp;
    if constexpr (kGrads) {  // tapes or inputs of repetitions 0 .. reps-2 saved; v: the input of the last one
      load_chunk<S, kVec>(x + row * a.x_ld, ln.base, d, valid, v);
      for (int j = 0; j + 1 < reps; ++j) {
        if (keep_tape) {
          parallel_forward_local<A, true, kTable>(a, ln, blocks.rep(j), v, xch, tp);
          tape_smem<true>(tp, vin + j * kTapeWords * rt + ln.tid, rt);
        } else {
#pragma unroll
          for (int e = 0; e < kChunk; ++e) vin[(j * kChunk + e) * rt + ln.tid] = v[e];
          parallel_forward_local<A, false, kTable>(a, ln, blocks.rep(j), v, xch, tp);
        }
      }
    }
    for (int j = reps - 1; j >= 0; --j) {
      if constexpr (kGrads) {  // the tape of repetition j: kept, or recomputed from its input
        if (j + 1 < reps && keep_tape) {
          tape_smem<false>(tp, vin + j * kTapeWords * rt + ln.tid, rt);
        } else {
          if (j + 1 < reps) {
#pragma unroll
            for (int e = 0; e < kChunk; ++e) v[e] = vin[(j * kChunk + e) * rt + ln.tid];
          }
          parallel_forward_local<A, true, kTable>(a, ln, blocks.rep(j), v, xch, tp);
        }
        if (j == reps - 1 && acc_scale && valid) {
#pragma unroll
          for (int e = 0; e < kChunk; ++e) acc_s[e] += gv[e] * v[e];
        }
      }
      if (j == reps - 1) scale_chunk(static_cast<const A*>(a.scale), ln.base, d, gv);
      A* ia = iacc + static_cast<int64_t>(kChunk - 1) * 4 * j * rt + ln.tid;
      const A* bj = blocks.rep(j);
      parallel_backward_local<kGrads, A, kTable>(a, ln, bj, g, valid, acc_blocks, gv, tp, xch, cacc + j * rep_cacc, ia,
                                                 4 * static_cast<int>(rt), static_cast<int>(rt), T, R, d, LS);
    }
    if (gx != nullptr) store_chunk<S, kVec>(gx + row * d, ln.base, d, valid, gv);
  }

  if constexpr (kGrads) {
    __syncthreads();
    A* red = sm + layout.red;
    A* dst = sums_row(a, ln, red, width);
    if (a.want_blocks) {
      for (int j = 0; j < reps; ++j) {
        const A* ia = iacc + static_cast<int64_t>(kChunk - 1) * 4 * j * rt + ln.tid;
        put_block_sums(a, ln, dst + 4 * (a.d - 1) * j, [&](int k, int c) { return ia[(4 * k + c) * rt]; },
                       cacc + j * rep_cacc);
      }
    }
    if (a.want_scale) put_scale_sums(a, ln, dst, acc_s);
    reduce_slot_rows(a, ln, red, width);
  }
}

}  // namespace qgoft::cuda::detail
