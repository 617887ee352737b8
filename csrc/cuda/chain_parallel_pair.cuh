// The paired reg backward of the parallel layout (QGOFT_CUDA_BACKWARD=pair with the reg variant; design, counts and
// prediction: docs/CUDA.md, "The paired reg backward"): parallel_backward_reg_kernel's branch-free instantiation
// (512-thread segments, 16-byte rows, parameter gradients; 16-bit activations: reg_pair_applies in chain_sizes.h)
// with every thread working on two of the block's rows at once, g and g + gridDim.x (kPairRows):
//  * each block read (the in-thread layers' table, the lane table of the shuffle and cross-warp layers, the
//    scale), each predicate of the lane mask, the loop control, the row offsets and the row's barrier serve both
//    rows; the two rows' shuffle and cross-warp chains run side by side, layer by layer (the *_rows helpers of
//    chain_parallel.cuh): two independent dependency chains per warp where the reg kernel has one;
//  * registers (at most 128 at 512 threads; every choice below removed spills the one before it left):
//    - the rows' chunks stay as loaded (RawChunk: 4 registers per chunk in bf16) and are unpacked where used, the
//      layer-1 tape and the gradient's elements a second time for the in-thread backward, instead of 8 + 7 live
//      values per row;
//    - the next pair is loaded into registers only once the current pair's words are unpacked for the last time
//      (before the in-thread backward), and the pair after it is prefetched into L2 then (prefetch_chunk: no
//      register), so that those loads find their rows in L2 and have the in-thread backward to arrive;
//    - the top layers of segmented rows run first, while few values are live, and warp 0 publishes their results
//      in the exchange words at once;
//    - the scale sums (ParallelBackwardSmem::ssum, each thread's 8 its own: one 16-byte read-modify-write per pair
//      of rows when the scale gradient is wanted) and the shuffle-layer pair a lane owns (one per row, in the
//      block's cross-thread accumulators) live in shared memory; warp 0's cross-warp owners add their pair's sums
//      inside the level's backward.
// Same products (the helpers the reg kernel calls), rounded the same way, and every accumulator summed in the same
// row order (row g before g + gridDim.x, as the reg kernel's loop takes them): bitwise the reg kernel's results.
#pragma once

#include <bit>

#include "chain_parallel_reg.cuh"

namespace qgoft::cuda::detail {

// a, as the instantiation knows it: without kSegmented its rows have one segment (nseg a constant 1), without
// kScaleGrad no scale gradient is wanted (want_scale a constant false); the launcher picks the instantiation
// (ParallelArgs::pair, parallel_backward_for in chain_launch.cuh).
template <bool kSegmented, bool kScaleGrad>
__device__ __forceinline__ ParallelArgs specialized(ParallelArgs a) {
  if constexpr (!kSegmented) a.nseg = 1;
  if constexpr (!kScaleGrad) a.want_scale = false;
  return a;
}

// The chunk's 8 values from its words as loaded: bf16 element 2k in the high half of a float from word k shifted up,
// element 2k + 1 from word k masked (one instruction each, the bits __bfloat162float gives; through Elem16's 16-bit
// value the high half takes two); float16 through Elem16. Here only: the same change in Elem16 gave other kernels
// spills (docs/CUDA.md, "The paired reg backward without the scale's gradient").
template <class S>
__device__ __forceinline__ void unpack_words(const RawChunk<S, true>& c, float (&v)[kChunk]) {
  if constexpr (std::is_same_v<S, __nv_bfloat16>) {
    const unsigned w[4] = {c.w.x, c.w.y, c.w.z, c.w.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#ifdef QGOFT_CUDA_HOST_SIM
      v[2 * k] = std::bit_cast<float>(w[k] << 16);
      v[2 * k + 1] = std::bit_cast<float>(w[k] & 0xffff0000u);
#else
      v[2 * k] = __uint_as_float(w[k] << 16);
      v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
#endif
    }
  } else {
    c.unpack(v);
  }
}

// c with its words opaque to the compiler (16-bit rows: one uint4), so that unpacking it again is computed anew
// instead of the first unpack's values being kept alive in registers (common subexpressions) in between.
template <class S>
__device__ __forceinline__ RawChunk<S, true> unpack_anew(RawChunk<S, true> c) {
  c.w.x = opaque(c.w.x);
  c.w.y = opaque(c.w.y);
  c.w.z = opaque(c.w.z);
  c.w.w = opaque(c.w.w);
  return c;
}

// Instantiations (ParallelArgs::pair): <S, true, true> for any rows and masks the paired kernel takes (pair == 1);
// without the scale's gradient (pair == 2, the masks `auto` pairs) <S, true, false> for segmented rows and
// <S, false, false> for rows of one segment (2049 .. 4096 elements): no scale sums, no top layers or segment-start
// conditions in their row loops (bf16: 786 / 831 SASS instructions per pair of rows against 924; docs/CUDA.md, "The
// paired reg backward without the scale's gradient"). kPrefetch: the L2 prefetch of the pair after the next (every
// instantiation above); <S, false, false, false> runs rows of one segment without it (ParallelArgs::pair_prefetch == 0,
// QGOFT_CUDA_PAIR_PREFETCH=off: an A/B switch, same results).
template <class S, bool kSegmented, bool kScaleGrad, bool kPrefetch = true>
__global__ void __launch_bounds__(512) parallel_backward_pair_kernel(const ParallelArgs args) {
  using A = typename Elem<S>::A;
  static_assert(sizeof(S) == 2, "the paired reg backward: 16-bit activations (reg_pair_applies)");
  constexpr int N = kPairRows;
  // `a` (segment shape as constants) for the per-row layer work; `args` for the table fill, top layers, write-out
  const ParallelArgs a = specialized<kSegmented, kScaleGrad>(with_fixed_width<kRegLogT>(args));
  QGOFT_DYNAMIC_SMEM(A, sm);
  const Lanes ln(a);
  const bool segmented = kSegmented && a.nseg > 1;
  const int d = static_cast<int>(a.d);
  const int width = 4 * static_cast<int>(a.num_pairs) + d;
  const ParallelBackwardSmem layout(1, a.T, a.nseg, width, true, a.table, true, true, N);
  reg_backward_start<A, true, true>(args, a, ln, layout, sm);
  const RegOperands<S> op(a, layout, sm);
  const bool acc_blocks = a.want_blocks;
  const bool acc_scale = a.want_scale;
  const int lane = ln.tid & 31;
  const int wq = ln.t >> 5;  // this warp's word in its rows' cross-warp level
  const int nw = a.T >> 5;
  const int LS = shuffle_layers(a);

  A acc_in[kChunk - 1][4];  // in-thread pairs: layer 1 -> 0..3, layer 2 -> 4..5, layer 3 -> 6
#pragma unroll
  for (int k = 0; k < kChunk - 1; ++k) acc_in[k][0] = acc_in[k][1] = acc_in[k][2] = acc_in[k][3] = A(0);
  // the shuffle-layer pair this lane owns as its upper lane (t % 32 != 0): its sums in the block's cross-thread
  // accumulators (zeroed by reg_backward_start), one read-modify-write per row, instead of 4 registers
  A* sh_acc = static_cast<A*>(
      __builtin_assume_aligned(op.cacc + 4 * (lane != 0 ? shuffle_owner_pair<A>(a, ln) : 0), 4 * sizeof(A)));
  // this thread's scale sums (its own 8 of ssum; the barriers of reg_backward_start order nothing here)
  A* ssum = static_cast<A*>(__builtin_assume_aligned(sm + layout.ssum + (ln.t << kLogChunk), 4 * sizeof(A)));
#pragma unroll
  for (int e = 0; e < kChunk; ++e) ssum[e] = A(0);
  // the shuffle and cross-warp layers' blocks in the lane table, at one address per thread
  const LaneBlocks<A> sh_blocks{sm + layout.lane + 4 * ParallelLaneTable::at(a.logT, 0, ln.t), a.T >> 1};
  const LaneBlocks<A> xw_blocks{sm + layout.lane + 4 * ParallelLaneTable::at(a.logT, LS, ln.t), a.T >> 1};
  const XLevel<A, true> shl = shuffle_level<A, true>(a, ln.seg_base);
  XLevel<A, true> xwl = cross_warp_level<A, true>(a, ln.seg_base);
  xwl.acc = 0;
  // the lane mask, every in-thread pair run (16-byte rows: a chunk wholly inside or outside the row)
  LaneLive lane_bits = lane_live<A, true>(a, ln, lane);
  lane_bits.bits |= LaneLive::kInThread;
  int xw_pair = 0;
  const bool xw_owner = cross_warp_owner<A>(a, ln, lane, wq, acc_blocks, xw_pair);
  // the lanes that hold a shuffle-layer pair as its upper lane (the others' sums would be zeros)
  const bool sh_owner = acc_blocks && lane != 0 && lane_bits.shuffle().upper != 0;

  // the next pair's rows as loaded, into registers where the current pair's loaded words are no longer needed
  // (after they are unpacked again for the in-thread layers: 16 registers that the whole row would otherwise
  // hold); the pair after it is prefetched into L2 at the same time (kPrefetch), so that those loads find their rows
  // there.
  // Rows advance by element offsets (row g + r gridDim.x of the pair at offset r * step from row g's).
  RawChunk<S, true> xr[N], gr[N];
  const int64_t grid = gridDim.x;
  const int64_t grad_step = grid * a.grad_ld, x_step = grid * a.x_ld, out_step = grid * d;
  int64_t next_grad = blockIdx.x * a.grad_ld, next_x = blockIdx.x * a.x_ld;
  int64_t out_at = blockIdx.x * static_cast<int64_t>(d);
  auto load_pair = [&](int64_t group) {  // rows group, group + gridDim.x: the pair after those loaded before
#pragma unroll
    for (int r = 0; r < N; ++r) {
      const int64_t row = group + r * grid;
      gr[r].load(op.grad + next_grad + r * grad_step, ln.base, d, row < a.groups);
      xr[r].load(op.x + next_x + r * x_step, ln.base, d, row < a.groups);
      if constexpr (kPrefetch) {
        const bool after = row + N * grid < a.groups;  // the same row of the pair after
        prefetch_chunk(op.grad + next_grad + (N + r) * grad_step, ln.base, d, after);
        prefetch_chunk(op.x + next_x + (N + r) * x_step, ln.base, d, after);
      }
    }
    next_grad += N * grad_step;
    next_x += N * x_step;
  };
  load_pair(blockIdx.x);
  int parity = 0;
  for (int64_t g = blockIdx.x; g < a.groups; g += N * static_cast<int64_t>(gridDim.x), out_at += N * out_step) {
    bool valid[N];
#pragma unroll
    for (int r = 0; r < N; ++r) {
      valid[r] = g + r * grid < a.groups;
    }
    // this pair's exchange words: [N][2][32], each row's warps' chunk-start values, then gradients (two buffers,
    // alternating: a warp writes this pair's after the barrier of the last pair, when every warp has read the
    // words of the pair before it from the other buffer)
    A* xb = op.xch + 2 * 32 * N * parity;
    parity ^= 1;
    // top layers (warp 0 of segmented rows): each row's segment-start gradient, rows in order, published at once
    // as warp 0's gradient word (they read only the top pass's results, grad and the scale: done first, while few
    // values are live)
    if (segmented && ln.tid < 32) {
#pragma unroll
      for (int r = 0; r < N; ++r) {
        const A top = top_backward<S, true>(args, g + r * grid, valid[r], ln.sigma, op.tacc);
        if (ln.tid == 0) xb[64 * r + 32] = top;
      }
    }
    // the lane mask, opaque anew for each pass through the levels (as in the reg kernel)
    auto pass_mask = [&]() { return LaneLive{opaque(lane_bits.bits)}; };
    const LaneLive live = pass_mask();
    A v[N][kChunk];
    Tape<A> tp[N];
#pragma unroll
    for (int r = 0; r < N; ++r) unpack_words(xr[r], v[r]);
    in_thread_forward_rows<true, true>(a, ln, op.blocks, v, tp, &live);
    // the scale sums of elements 1-7 (final after the in-thread layers), rows in order; all 8 read and written
    // back (16-byte accesses; element 0 unchanged here)
    A g_start[N];
    {
      A acc[kChunk];
#pragma unroll
      for (int e = 0; e < kChunk; ++e) acc[e] = acc_scale ? ssum[e] : A(0);
#pragma unroll
      for (int r = 0; r < N; ++r) {
        A gv[kChunk];
        unpack_words(unpack_anew(gr[r]), gv);
        g_start[r] = gv[0];
#pragma unroll
        for (int e = 1; e < kChunk; ++e) {
          if (acc_scale) acc[e] += gv[e] * v[r][e];
        }
      }
      if (acc_scale) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) ssum[e] = acc[e];
      }
    }
    A v0[N], tsh[N][5], g0[N];
#pragma unroll
    for (int r = 0; r < N; ++r) v0[r] = v[r][0];
    level_forward_rows<true>(shl, LS, ln.t, live.shuffle(), sh_blocks, v0, tsh);
    // the chunk start of lane 0 (T > 32) gets its final value from the cross-warp layers below
    const bool late_start = lane == 0;
    if (acc_scale && !(late_start || (segmented && ln.t == 0))) {  // element 0, rows in order
      A acc = ssum[0];
#pragma unroll
      for (int r = 0; r < N; ++r) {
        acc += g_start[r] * v0[r];
      }
      ssum[0] = acc;
    }
#pragma unroll
    for (int r = 0; r < N; ++r) g0[r] = op.scale != nullptr ? g_start[r] * op.scl[ln.t << kLogChunk] : g_start[r];
    // cross-warp layers, computed by every warp for both rows
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < N; ++r) {
        xb[64 * r + wq] = v0[r];
        if (!(segmented && ln.t == 0)) xb[64 * r + 32 + wq] = g0[r];  // segmented: warp 0's is the top layers'
      }
    }
    __syncthreads();
    const bool qv = lane < nw;
    const int xpos = xw_pos(lane, nw);  // lanes past the level's words read lane % nw's block
    A u[N], gq[N], tt[N][5];
#pragma unroll
    for (int r = 0; r < N; ++r) {
      u[r] = qv ? xb[64 * r + lane] : A(0);
      gq[r] = qv ? xb[64 * r + 32 + lane] : A(0);
    }
    level_forward_rows<true>(xwl, a.logT - 5, xpos, pass_mask().cross_warp(), xw_blocks, u, tt);
    A mine[N];
#pragma unroll
    for (int r = 0; r < N; ++r) mine[r] = __shfl_sync(kFullMask, u[r], wq);
    if (acc_scale && late_start && !(segmented && ln.t == 0)) {  // lane 0's chunk start, rows in order
      A acc = ssum[0];
#pragma unroll
      for (int r = 0; r < N; ++r) {
        acc += g_start[r] * mine[r];
      }
      ssum[0] = acc;
    }
    // the inputs and output gradients of the pair this lane holds as its upper lane in each row (at most one per
    // level; selected, not branched on: no branch between the level's shuffles), added to the block's
    // accumulators after the level, rows in order: warp 0's cross-warp owners here, every lane's shuffle-layer
    // pair below. Its own output gradient is the level's input: an upper participant takes no part in the layers
    // above its pair's (the level goes down from the top layer), so its gradient has not changed by then.
    A up[N][4];
    auto keep_upper = [&](int r, int, int, A ui, A uj, A gi, A) {
      up[r][0] = ui, up[r][1] = uj, up[r][2] = gi;
    };
    auto clear_upper = [&](const A (&g_in)[N]) {
#pragma unroll
      for (int r = 0; r < N; ++r) up[r][0] = up[r][1] = up[r][2] = A(0), up[r][3] = g_in[r];
    };
    clear_upper(gq);
    level_backward_rows<true, true>(xwl, a.logT - 5, xpos, pass_mask().cross_warp(), xw_blocks, gq, tt, keep_upper);
    if (xw_owner) accumulate_pair_rows(op.cacc + 4 * xw_pair, up);
#pragma unroll
    for (int r = 0; r < N; ++r) {
      const A mine = __shfl_sync(kFullMask, gq[r], wq);
      if (lane == 0) g0[r] = mine;
    }
    clear_upper(g0);
    level_backward_rows<true, true>(shl, LS, ln.t, pass_mask().shuffle(), sh_blocks, g0, tsh, keep_upper);
    if (sh_owner) accumulate_pair_rows(sh_acc, up);
    // in-thread layers: the gradients and the layer-1 tape unpacked again from the rows as loaded
    A gv[N][kChunk];
#pragma unroll
    for (int r = 0; r < N; ++r) {
      unpack_words(unpack_anew(gr[r]), gv[r]);
      if (op.scale != nullptr) {
#pragma unroll
        for (int e = 1; e < kChunk; ++e) gv[r][e] *= op.scl[(ln.t << kLogChunk) + e];
      }
      gv[r][0] = g0[r];
      unpack_words(unpack_anew(xr[r]), tp[r].x[0]);
    }
    load_pair(g + N * grid);
    in_thread_backward_rows<true, true>(a, ln, op.blocks, d, gv, tp, [&](int r, int k, A ui, A uj, A gi, A gj) {
      if (acc_blocks) accumulate_outer(acc_in[k], ui, uj, gi, gj);
    }, &live);
    if (op.gx != nullptr) {
#pragma unroll
      for (int r = 0; r < N; ++r) store_chunk<S, true>(op.gx + out_at + r * out_step, ln.base, d, valid[r], gv[r]);
    }
  }
  A acc_s[kChunk];
#pragma unroll
  for (int e = 0; e < kChunk; ++e) acc_s[e] = ssum[e];
  reg_backward_finish<A>(args, a, ln, layout, sm, acc_blocks, acc_in, nullptr, acc_s);
}

}  // namespace qgoft::cuda::detail
