// The `reg` variant of the parallel layout's backward (QGOFT_CUDA_VARIANT=reg; design, byte and
// instruction counts: docs/CUDA.md, "Variants" and "Costs at the benchmark shapes"). Same rows, segments,
// shared-memory block table (ParallelTable) and partial rows as the table variant of
// parallel_backward_kernel, with three changes:
//  * the shuffle layers' pair gradients are accumulated in registers across all the rows of the block
//    (acc_sh) instead of a shared-memory read-modify-write per row: the pair (lo, lo + 2^s) of shuffle
//    layer s is owned by its upper lane lo + 2^s, which receives the lower lane's tape value and gradient
//    anyway, and every lane is the upper lane of at most one pair (lane t: layer ctz(t)); written to the
//    block's cross-thread accumulators once at the end;
//  * one barrier per row instead of four: lane 0 of every warp publishes its chunk start's forward value
//    and gradient (two buffers, alternating by row; segmented rows: warp 0 has run the top layers before),
//    and every warp computes the cross-warp layers itself in lanes 0 .. T/32 - 1; only warp 0 accumulates
//    their pair gradients (upper lanes, at most one pair each; one owner per pair: deterministic);
//  * the loads of the block's next row (x and grad) are issued before the current row is processed; the
//    segment's scale is copied to shared memory once.
// Its instantiation for 512-thread segments with 16-byte rows, gradients and float accumulation (kLive, the
// benchmark shapes) has no branch per pair in its row loop: the row-invariant facts of a lane are bits of a
// mask computed once (LaneLive), every lane reads its blocks from the table whether its pair exists or not
// and the mask selects the updates (LiveBits in level_forward / level_backward), every thread runs its
// in-thread pairs, the rows advance by offsets, and warp 0 adds each lane's cross-warp pair sums to the
// block's accumulators once per row; and it reads the shuffle and cross-warp layers' blocks from a lane
// table (ParallelLaneTable, filled once per block) at one address per thread plus a constant per layer,
// with no index arithmetic per row. Same products, rounded the same way, in the same order.
#pragma once

#include "chain_parallel.cuh"

namespace qgoft::cuda::detail {

// The reg kernel's instantiation for T = 2^kRegLogT threads (chain_sizes.h) has the pair and table indices
// of the layer helpers folded into constants; other widths run the generic instantiation.
QGOFT_HOST_DEVICE inline bool reg_fixed_width(const ParallelArgs& a) { return a.logT == kRegLogT; }

// a, with the segment shape fixed at compile time when kLogT > 0 (then T = 2^kLogT >= 256, R = 1).
template <int kLogT>
__device__ __forceinline__ ParallelArgs with_fixed_width(const ParallelArgs& in) {
  ParallelArgs a = in;
  if constexpr (kLogT > 0) {
    a.logT = kLogT;
    a.T = 1 << kLogT;
    a.R = 1;
    a.table = kChunk << kLogT;
  }
  return a;
}

// kLive: the LiveBits `live`, else the flag `active` (level_forward / level_backward take either).
template <bool kLive>
__device__ __forceinline__ auto live_or(LiveBits live, bool active) {
  if constexpr (kLive) {
    return live;
  } else {
    return active;
  }
}

// The accumulators (lv.acc_at / 4: 4 values each) of the pair of level lv whose upper participant is pos (> 0):
// the pair (pos - 2^s, pos) of layer s, the lowest set bit of pos.
template <class A, bool kTable>
__device__ __forceinline__ int upper_pair(const XLevel<A, kTable>& lv, int pos) {
  int s = 0;
  while (((pos >> s) & 1) == 0) ++s;
  return lv.acc_at(s, pos - (1 << s)) >> 2;
}

// The lane table (ParallelLaneTable) of a row segment, copied from its block table `tab`: layer L < LS of
// thread t holds shuffle layer L's block of participant t, layer LS + s cross-warp layer s's block of
// participant xw_pos(t) (the block that lane reads, LiveBits: whether or not its pair exists). The caller
// synchronises before (tab filled) and after.
__device__ __forceinline__ int xw_pos(int lane, int words) { return lane & (words - 1); }
template <class A>
__device__ __forceinline__ void fill_lane_table(const ParallelArgs& a, int seg_base, const A* tab, A* lanes) {
  const int LS = shuffle_layers(a), half = a.T >> 1, nw = a.T >> 5;
  const XLevel<A, true> sh = shuffle_level<A, true>(a, seg_base), xw = cross_warp_level<A, true>(a, seg_base);
  for (int idx = threadIdx.x; idx < ParallelLaneTable::blocks(a.logT); idx += blockDim.x) {
    const int layer = idx / half, t = 2 * (idx % half);
    const bool shuffle = layer < LS;
    const int s = shuffle ? layer : layer - LS, pos = shuffle ? t : xw_pos(t & 31, nw);
    const int src = (shuffle ? sh : xw).index(s, pos & ~(1 << s));
#pragma unroll
    for (int c = 0; c < 4; ++c) lanes[4 * idx + c] = tab[4 * src + c];
  }
}

// The start of the reg kernels (the reg backward and the paired one, chain_parallel_pair.cuh): the segment's block
// table, its scale (scl: 1 past d; when a.scale is set) and the zeroed cross-thread accumulators in shared memory,
// a barrier, then (kLive) the lane table and a barrier. args: the layout's offsets (the table fill); a: the shape.
template <class A, bool kGrads, bool kLive>
__device__ __forceinline__ void reg_backward_start(const ParallelArgs& args, const ParallelArgs& a, const Lanes& ln,
                                                   const ParallelBackwardSmem& layout, A* sm) {
  fill_table(args, static_cast<const A*>(args.blocks), ln.seg_base, sm + layout.tab);
  const A* scale = static_cast<const A*>(a.scale);
  const int d = static_cast<int>(a.d);
  A* scl = sm + layout.scl;  // [S]: the segment's scale (1 past d; only when scale != nullptr)
  if (scale != nullptr) {
    for (int k = ln.tid; k < a.table; k += blockDim.x) scl[k] = ln.seg_base + k < d ? scale[ln.seg_base + k] : A(1);
  }
  if constexpr (kGrads) {
    A* cacc = sm + layout.cacc;
    for (int k = ln.tid; k < static_cast<int>(layout.red - layout.cacc); k += blockDim.x) cacc[k] = A(0);
  }
  __syncthreads();
  if constexpr (kLive) {
    fill_lane_table(args, ln.seg_base, sm + layout.tab, sm + layout.lane);
    __syncthreads();
  }
}

// kLive: whether lane `lane` of warp 0 (wq == 0) owns a cross-warp pair as its upper lane (at most one, whose sums
// it adds to the block's accumulators once per row) with acc_blocks; `pair`: that pair's accumulators (4 each).
template <class A>
__device__ __forceinline__ bool cross_warp_owner(const ParallelArgs& a, const Lanes& ln, int lane, int wq,
                                                 bool acc_blocks, int& pair) {
  pair = 0;
  if (a.logT <= 5 || lane == 0) return false;
  XLevel<A, true> lv = cross_warp_level<A, true>(a, ln.seg_base);
  lv.acc = 4 * ln.slot * (a.T - 1);
  pair = upper_pair(lv, lane);
  return acc_blocks && wq == 0 && level_live(lv, a.logT - 5, lane, lane < (a.T >> 5)).upper != 0;
}

// The accumulators (4 each, from layout.cacc) of the shuffle-layer pair lane ln.t (% 32 != 0) owns as its upper lane.
template <class A>
__device__ __forceinline__ int shuffle_owner_pair(const ParallelArgs& a, const Lanes& ln) {
  XLevel<A, true> lv = shuffle_level<A, true>(a, ln.seg_base);
  lv.acc = 4 * ln.slot * (a.T - 1);
  return upper_pair(lv, ln.t);
}

// Lane ln.t's shuffle-layer sums (acc_sh: the pair it owns as its upper lane, when t % 32 != 0) into the cross-thread
// accumulators cacc ([T-1][4] of its slot's row segment).
template <class A>
__device__ __forceinline__ void put_shuffle_sums(const ParallelArgs& a, const Lanes& ln, A* cacc, const A* acc_sh) {
  if ((ln.t & 31) == 0) return;
  A* c = cacc + 4 * shuffle_owner_pair<A>(a, ln);
#pragma unroll
  for (int k = 0; k < 4; ++k) c[k] = acc_sh[k];
}

// The backward of a row's cross-warp layers in the reg kernels, computed by every warp for its row (lanes below the
// level's words hold its participants; xpos: the participant whose blocks a lane reads): gq, this lane's word's
// gradient; tt, the level's tape. Pair sums where `owner`: kLive, the pair a lane holds as its upper lane (at most
// one, cross_warp_owner) added once to cacc + 4 xw_pair; otherwise per layer to cacc + lv.acc_at(s, lo). Returns
// the gradient of word wq (this warp's), in every lane.
template <bool kGrads, bool kLive, class A, class Active, class Blocks>
__device__ __forceinline__ A cross_warp_backward(const XLevel<A, true>& lv, int layers, int xpos, Active active,
                                                 Blocks blocks, A gq, const A (&tt)[5], int wq, bool owner, A* cacc,
                                                 int xw_pair) {
  A up[4] = {A(0), A(0), A(0), A(0)};  // kLive: the inputs and output gradients of the pair this lane holds as upper
  gq = level_backward<kGrads, true>(lv, layers, xpos, active, blocks, gq, tt, [&](int s, int lo, A ui, A uj, A gi, A gj) {
    if constexpr (kLive) {
      up[0] = ui, up[1] = uj, up[2] = gi, up[3] = gj;
    } else if (owner) {
      accumulate_outer(cacc + lv.acc_at(s, lo), ui, uj, gi, gj);
    }
  });
  if (kLive && owner) {
    A* c = static_cast<A*>(__builtin_assume_aligned(cacc + 4 * xw_pair, 4 * sizeof(A)));
    accumulate_outer(c, up[0], up[1], up[2], up[3]);
  }
  return __shfl_sync(kFullMask, gq, wq);
}

// The end of the reg kernels with parameter gradients: each lane's shuffle-layer sums (acc_sh, the pair it owns as
// its upper lane; acc_sh == nullptr: already in the cross-thread accumulators) into the cross-thread accumulators, a
// barrier, then the block's sums (parallel_write_sums).
template <class A>
__device__ __forceinline__ void reg_backward_finish(const ParallelArgs& args, const ParallelArgs& a, const Lanes& ln,
                                                    const ParallelBackwardSmem& layout, A* sm, bool acc_blocks,
                                                    const A (&acc_in)[kChunk - 1][4], const A* acc_sh,
                                                    const A (&acc_s)[kChunk]) {
  if (acc_sh != nullptr && acc_blocks) put_shuffle_sums(a, ln, sm + layout.cacc, acc_sh);
  __syncthreads();
  parallel_write_sums(args, ln, layout, sm, acc_in, acc_s);
}

// The reg kernels' register accumulators, zeroed: acc_in the in-thread pairs (layer 1 -> 0..3, layer 2 -> 4..5,
// layer 3 -> 6), acc_sh the shuffle-layer pair a lane owns as its upper lane (t % 32 != 0), acc_s the scale.
template <class A>
__device__ __forceinline__ void zero_reg_accumulators(A (&acc_in)[kChunk - 1][4], A (&acc_sh)[4], A (&acc_s)[kChunk]) {
#pragma unroll
  for (int k = 0; k < kChunk - 1; ++k) acc_in[k][0] = acc_in[k][1] = acc_in[k][2] = acc_in[k][3] = A(0);
  acc_sh[0] = acc_sh[1] = acc_sh[2] = acc_sh[3] = A(0);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) acc_s[e] = A(0);
}

// What the reg kernels read and write: their operands (ParallelArgs) and their regions of shared memory (layout).
template <class S>
struct RegOperands {
  using A = typename Elem<S>::A;
  A* xch;          // exchange words of the cross-warp layers (ParallelBackwardSmem: [2][rows][2][32])
  A* cacc;         // [R][T-1][4]: cross-thread pairs of each slot
  A* tacc;         // [31][4] top pairs, then [32] segment-start scale
  const A* blocks;  // the segment's block table
  const A* scale;  // the scale (global), or null
  const A* scl;    // [S]: the segment's scale (1 past d; only when scale != nullptr)
  const S* x;
  const S* grad;
  S* gx;
  __device__ __forceinline__ RegOperands(const ParallelArgs& a, const ParallelBackwardSmem& layout, A* sm)
      : xch(sm),
        cacc(sm + layout.cacc),
        tacc(sm + layout.tacc),
        blocks(sm + layout.tab),
        scale(static_cast<const A*>(a.scale)),
        scl(sm + layout.scl),
        x(static_cast<const S*>(a.x)),
        grad(static_cast<const S*>(a.grad)),
        gx(static_cast<S*>(a.out)) {}
};

template <class S, bool kVec, bool kGrads, int kLogT>
__global__ void __launch_bounds__(512) parallel_backward_reg_kernel(const ParallelArgs args) {
  using A = typename Elem<S>::A;
  // `a` (segment shape as constants) for the per-row layer work; `args` where the layout's pair offsets
  // are indexed (table fill, top layers, write-out), so that the copy stays in registers
  const ParallelArgs a = with_fixed_width<kLogT>(args);
  QGOFT_DYNAMIC_SMEM(A, sm);
  const Lanes ln(a);
  const int T = a.T, R = a.R;
  const bool segmented = a.nseg > 1;
  const int d = static_cast<int>(a.d);
  const int width = 4 * static_cast<int>(a.num_pairs) + d;
  // kLive: the branch-free row loop (see lane_bits below), which reads the lane table
  constexpr bool kLive = reg_branch_free(kLogT, kVec, kGrads, sizeof(A));
  const ParallelBackwardSmem layout(R, T, a.nseg, width, kGrads, a.table, true, kLive);
  // the block and lane tables (kLive: read by the shuffle and cross-warp layers, at one address per thread, through
  // LaneBlocks: layer s at a constant offset from it; the others read the block table)
  reg_backward_start<A, kGrads, kLive>(args, a, ln, layout, sm);
  const RegOperands<S> op(a, layout, sm);
  const bool acc_blocks = kGrads && a.want_blocks;
  const bool acc_scale = kGrads && a.want_scale;
  const int lane = ln.tid & 31;
  const int wq = ln.t >> 5;  // this warp's word in its row's cross-warp level
  const int LS = shuffle_layers(a);

  A acc_in[kChunk - 1][4], acc_sh[4], acc_s[kChunk];
  zero_reg_accumulators(acc_in, acc_sh, acc_s);
  auto level_blocks = [&](int first_layer) {
    if constexpr (kLive) {
      return LaneBlocks<A>{sm + layout.lane + 4 * ParallelLaneTable::at(a.logT, first_layer, ln.t), T >> 1};
    } else {
      return op.blocks;
    }
  };
  const auto sh_blocks = level_blocks(0);

  const XLevel<A, true> shl = shuffle_level<A, true>(a, ln.seg_base);
  // which of this thread's pairs exist, computed once: only in the fixed-width instantiation with 16-byte
  // rows, gradients and float accumulation (in the others the mask's register adds spills or instructions;
  // they check the pairs per row). There every thread also runs its in-thread pairs unconditionally: with
  // 16-byte rows a chunk lies wholly inside the row (its 7 pairs exist) or wholly outside, and an outside
  // chunk's values are zeros that read zero blocks (fill_table) and are never stored nor written out as
  // sums (store_chunk, put_block_sums and put_scale_sums check d) nor used by a partner (an existing pair's
  // lower element is inside the row when its upper one is)
  LaneLive lane_bits = lane_live<A, true>(a, ln, lane);
  if constexpr (kLive) lane_bits.bits |= LaneLive::kInThread;
  RawChunk<S, kVec> xr, gr;
  // kRowSteps: the block's rows as element offsets into grad, x and the output, advanced by one grid stride
  // of rows per group instead of multiplied out per row (kLogT > 0: R == 1 and every thread's slot is 0, the
  // same values in every thread of the block; float accumulation only: the float64 instantiations, at the
  // register cap with spills, keep their arithmetic)
  constexpr bool kRowSteps = kLogT > 0 && sizeof(A) == 4;
  const int slot = kLogT > 0 ? 0 : ln.slot;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * R;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * R + slot;
  const int64_t grad_step = row_step * a.grad_ld, x_step = row_step * a.x_ld, out_step = row_step * d;
  int64_t next_grad = first_row * a.grad_ld, next_x = first_row * a.x_ld, out_at = first_row * d;
  auto load_rows = [&](int64_t group) {  // the rows of `group`, the next one after those loaded before
    const int64_t row = group * R + slot;
    const bool valid = group < a.groups && (kLogT > 0 || row < a.rows);  // kLogT > 0: R == 1
    if constexpr (kRowSteps) {
      gr.load(op.grad + next_grad, ln.base, d, valid);
      if constexpr (kGrads) xr.load(op.x + next_x, ln.base, d, valid);
      next_grad += grad_step;
      next_x += x_step;
    } else {  // multiplied out per row
      gr.load(op.grad + row * a.grad_ld, ln.base, d, valid);
      if constexpr (kGrads) xr.load(op.x + row * a.x_ld, ln.base, d, valid);
    }
  };
  // kLive: warp 0's lanes 1 .. T/32 - 1, the cross-warp pair each owns as its upper lane (one per lane),
  // whose sums it adds to cacc once per row (the generic instantiation adds them per layer)
  int xw_pair = 0;
  const bool xw_owner = kLive && cross_warp_owner<A>(a, ln, lane, wq, acc_blocks, xw_pair);
  load_rows(blockIdx.x);
  int parity = 0;
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x, out_at += out_step) {
    const int64_t row = g * R + slot;
    const bool valid = kLogT > 0 || row < a.rows;  // kLogT > 0: R == 1, row == g < groups == rows
    A gv[kChunk];
    A v[kChunk];
    gr.unpack(gv);
    if constexpr (kGrads) xr.unpack(v);
    load_rows(g + gridDim.x);
    Tape<A> tp;
    // kLive: the lane mask, opaque anew for each pass through the levels: ptxas then derives each pass's
    // predicates from the mask (one instruction each) instead of keeping the forward's alive for the backward
    // in bits of another register (two instructions each)
    auto pass_mask = [&]() {
      if constexpr (kLive) return LaneLive{opaque(lane_bits.bits)};
      return lane_bits;  // not used
    };
    const LaneLive live = pass_mask();
    const LaneLive* lp = kLive ? &live : nullptr;
    // the chunk start of lane 0 (T > 32) gets its final value from the cross-warp layers below
    const bool late_start = a.logT > 5 && lane == 0;
    const A g_start = gv[0];
    if constexpr (kGrads) {  // recompute the layers inside the warp, recording the tape
      parallel_forward_in_warp<A, true, true>(a, ln, op.blocks, v, tp, lp, sh_blocks);
      if (acc_scale && valid) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          if (e > 0 || !(late_start || (segmented && ln.t == 0))) acc_s[e] += gv[e] * v[e];
        }
      }
    }
    if (op.scale != nullptr) {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) gv[e] *= op.scl[(ln.t << kLogChunk) + e];
    }

    if (segmented && ln.tid < 32) {  // top layers (warp 0; R == 1): the segment start's gradient
      const A top = top_backward<S, kGrads>(args, row, valid, ln.sigma, op.tacc);
      if (ln.tid == 0) gv[0] = top;
    }
    if (a.logT > 5) {  // cross-warp layers, computed by every warp for its row
      const int nw = T >> 5;
      A* xb = op.xch + 64 * parity + ln.slot * nw;  // the words of this warp's row (R * nw <= 32)
      parity ^= 1;
      if (lane == 0) {
        if constexpr (kGrads) xb[wq] = v[0];
        xb[32 + wq] = gv[0];
      }
      __syncthreads();
      const bool qv = lane < nw;
      const auto xw_active = live_or<kLive>(pass_mask().cross_warp(), qv);
      // LiveBits: every lane reads a block of the level; lanes past its words (no LiveBits) read lane % nw's
      const int xpos = kLive ? xw_pos(lane, nw) : lane;
      const auto xw_blocks = level_blocks(LS);
      A gq = qv ? xb[32 + lane] : A(0);
      XLevel<A, true> lv = cross_warp_level<A, true>(a, ln.seg_base);
      lv.acc = 4 * ln.slot * (T - 1);
      A tt[5];
      if constexpr (kGrads) {
        const A u = level_forward<true>(lv, a.logT - 5, xpos, xw_active, xw_blocks, qv ? xb[lane] : A(0), tt);
        const A mine = __shfl_sync(kFullMask, u, wq);
        if (acc_scale && valid && late_start && !(segmented && ln.t == 0)) acc_s[0] += g_start * mine;
      }
      const bool owner = kLive ? xw_owner && valid : acc_blocks && valid && wq == 0;
      const A mine = cross_warp_backward<kGrads, kLive>(lv, a.logT - 5, xpos, live_or<kLive>(pass_mask().cross_warp(), qv),
                                                        xw_blocks, gq, tt, wq, owner, op.cacc, xw_pair);
      if (lane == 0) gv[0] = mine;
    }
    gv[0] = level_backward<kGrads, true>(shl, LS, ln.t, live_or<kLive>(pass_mask().shuffle(), true),
                                         sh_blocks, gv[0], tp.sh,
                                         [&](int, int, A ui, A uj, A gi, A gj) {
                                           if (acc_blocks && valid) accumulate_outer(acc_sh, ui, uj, gi, gj);
                                         });
    in_thread_backward<kGrads, true>(a, ln, op.blocks, d, gv, tp, [&](int k, A ui, A uj, A gi, A gj) {
      if (acc_blocks && valid) accumulate_outer(acc_in[k], ui, uj, gi, gj);
    }, lp);
    if (op.gx != nullptr) store_chunk<S, kVec>(op.gx + (kRowSteps ? out_at : row * d), ln.base, d, valid, gv);
  }

  if constexpr (kGrads) reg_backward_finish<A>(args, a, ln, layout, sm, acc_blocks, acc_in, acc_sh, acc_s);
}

}  // namespace qgoft::cuda::detail
