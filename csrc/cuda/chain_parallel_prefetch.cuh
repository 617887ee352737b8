// The prefetching forward of the parallel layout (QGOFT_CUDA_FORWARD=prefetch, ParallelArgs::prefetch; design,
// counts and predictions: docs/CUDA.md, "The prefetching forward"): the table forward of the single layout
// (reps == 1, the segment's blocks in shared memory, a persistent grid) with 16-byte rows and three changes:
//  * software pipelining: the block's next row group is loaded into registers (RawChunk: the 16-byte words as
//    loaded) before the current one is computed, so that its HBM latency overlaps the current row's layers
//    and barriers instead of following them (as the reg backward does);
//  * the row loop has no branch per pair: the lane's row-invariant facts are a mask computed once (LaneLive,
//    as in the reg backward); every thread runs its in-thread pairs (with 16-byte rows a chunk lies wholly
//    inside or outside the row: an outside chunk's zeros read zero blocks and are never stored nor used by a
//    partner), and the shuffle and cross-warp layers read every participant's block and select the update by
//    its LiveBits;
//  * like the reg backward, it is compiled twice: for 512-thread segments with the segment shape as constants
//    (kLogT = kRegLogT: rows of 2049 .. 4096 elements and every segmented row, the benchmark shapes) and for
//    any shape (kLogT = 0).
// Same rows, blocks, products (dot2: rounded as the table forward's expressions) and order as
// parallel_forward_kernel<S, true, true, true>: bitwise equal results (the host emulation requires it).
// kStack: a stack of the parallel layout (a.reps > 1, whole rows, nseg == 1; docs/CUDA.md, "Stacks of the parallel
// layout (fused XOR path)"): every repetition's segment table in shared memory (stack_blocks) and the row's
// registers run through the repetitions in order, the next row's load still in flight; a separate instantiation, so
// that the single layout's (kStack = false) code is unchanged; compiled for one block per SM with 512-thread
// segments (prefetch_forward_blocks: every repetition's 4096-element table, >= 128 KiB, leaves room for one).
#pragma once

#include "chain_parallel_reg.cuh"

namespace qgoft::cuda::detail {

template <class S, int kLogT, bool kStack = false>
__global__ void __launch_bounds__(512, prefetch_forward_blocks(sizeof(S), kStack && kLogT > 0))
    parallel_forward_prefetch_kernel(const ParallelArgs args) {
  using A = typename Elem<S>::A;
  // `a` (segment shape as constants) for the row loop; `args` for the table fill
  const ParallelArgs a = with_fixed_width<kLogT>(args);
  QGOFT_DYNAMIC_SMEM(A, xch);
  const Lanes ln(a);
  A* tab = xch + 32;
  StackBlocks<A> blocks{tab, 0};
  if constexpr (kStack) blocks = stack_blocks<A, true>(args, ln, tab);
  else fill_table(args, static_cast<const A*>(args.blocks), ln.seg_base, tab);
  __syncthreads();
  const int d = static_cast<int>(a.d);
  const S* x = static_cast<const S*>(a.x);
  // the lane mask: the cross-warp bits as participant lane % (T/32) of warp 0's R T / 32 words (via_warp0)
  LaneLive live = lane_live<A, true>(a, ln, ln.tid & 31, a.R * (a.T >> 5));
  live.bits |= LaneLive::kInThread;
  RawChunk<S, true> next;
  auto load_group = [&](int64_t g) {  // the rows of group g, the one after those loaded before
    const int64_t row = g * a.R + ln.slot;
    next.load(x + row * a.x_ld, ln.base, d, g < a.groups && row < a.rows);
  };
  load_group(blockIdx.x);
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row = g * a.R + ln.slot;
    const bool valid = row < a.rows;
    A v[kChunk];
    next.unpack(v);
    load_group(g + gridDim.x);
    Tape<A> tp;
    if constexpr (kStack) {
      for (int j = 0; j < a.reps; ++j) parallel_forward_local<A, false, true>(a, ln, blocks.rep(j), v, xch, tp, &live);
    } else {
      parallel_forward_local<A, false, true>(a, ln, tab, v, xch, tp, &live);
    }
    finish_forward_row<S, true>(a, ln, row, valid, v);
  }
}

}  // namespace qgoft::cuda::detail
