// The reg stacked backward: stack(parallel(d), k), k >= 2, under QGOFT_CUDA_VARIANT=reg (design, counts and
// prediction: docs/CUDA.md, "The `reg` stacked backward"). The reg backward's branch-free instantiation
// (chain_parallel_reg.cuh: 512-thread segments, 16-byte rows, parameter gradients, float accumulation;
// stack_reg_applies in chain_sizes.h) run over k repetitions of the layout, repetition j with its own segment table
// in shared memory (stack_blocks). Per row:
//  * repetitions 0 .. k-2 forward: the layers inside the warp, then one barrier, after which every warp computes the
//    cross-warp layers itself (the reg kernel's scheme); each thread saves the repetition's input and (16-bit rows)
//    its shuffle-layer tape in shared memory, warp 0 the block's cross-warp tape (StackRegSaved);
//  * the last repetition as the reg kernel's row: forward with the tape, the scale, one barrier for the cross-warp
//    forward and backward, the shuffle and in-thread backward; its pair gradients in registers;
//  * repetitions k-2 .. 0 backward: the tape of the in-thread layers (float32 rows: and of the shuffle layers)
//    recomputed from the saved input, one barrier to exchange the chunk starts' gradients, then the cross-warp, shuffle
//    and in-thread backward; the shuffle-layer pair of each lane and the in-thread pairs accumulated by
//    read-modify-writes of 16 bytes in shared memory (owner-only: cacc, and the thread's own slice of iacc).
// 2k - 1 barriers per row; the exchange words alternate between two buffers at every barrier. Same products,
// rounded the same way, every accumulator summed over the block's rows in row order, the same rows per block:
// bitwise the results of parallel_stack_backward_kernel (chain_stack.cuh).
#pragma once

#include "chain_parallel_reg.cuh"
#include "chain_stack.cuh"

namespace qgoft::cuda::detail {

template <class S>
__global__ void __launch_bounds__(512) parallel_stack_reg_kernel(const ParallelArgs args) {
  using A = typename Elem<S>::A;
  static_assert(sizeof(A) == 4, "the reg stacked backward: float accumulation (stack_reg_applies)");
  // `a` (segment shape as constants) for the per-row layer work; `args` for the table fill and the write-out
  const ParallelArgs a = with_fixed_width<kRegLogT>(args);
  QGOFT_DYNAMIC_SMEM(A, sm);
  const Lanes ln(a);
  const int T = a.T, reps = a.reps, d = static_cast<int>(a.d);
  const int width = 4 * static_cast<int>(a.num_pairs) + d;
  const bool acc_blocks = a.want_blocks, acc_scale = a.want_scale;
  const StackBackwardSmem layout(reps, 1, T, width, acc_blocks, true, a.table, false, true);
  const StackBlocks<A> blocks = stack_blocks<A, true>(args, ln, sm + layout.tab);
  A* cacc = sm + layout.cacc;  // [reps][T-1][4]
  const int rep_cacc = 4 * (T - 1);
  for (int k = ln.tid; k < static_cast<int>(layout.vin - layout.cacc); k += blockDim.x) cacc[k] = A(0);
  __syncthreads();
  const int lane = ln.tid & 31;
  const int wq = ln.t >> 5;  // this warp's word in the cross-warp level
  const int nw = T >> 5, LW = a.logT - 5, LS = shuffle_layers(a);
  // this thread's in-thread accumulators of repetition j (< reps - 1): pair k at iacc(j) + 4 (k T)
  auto iacc = [&](int j) {
    return static_cast<A*>(__builtin_assume_aligned(sm + layout.iacc + 4 * ((kChunk - 1) * j * T + ln.t), 16));
  };
  // repetition j's (< reps - 1) saved words: this thread's input (kChunk, thread-contiguous) and shuffle-layer tape
  // (LS words, T apart), the block's cross-warp tape (lane q's LW words from 4 q, q < words; written by warp 0, read
  // by every warp's lanes, those past the words at lane % words)
  auto saved = [&](int j) {
    return static_cast<A*>(__builtin_assume_aligned(sm + layout.vin + StackRegSaved::input(j, T) + kChunk * ln.t, 16));
  };
  auto saved_shuffle = [&](int j) { return sm + layout.vin + StackRegSaved::shuffle(reps, j, T) + ln.t; };
  auto saved_cross_warp = [&](int j) {
    return static_cast<A*>(
        __builtin_assume_aligned(sm + layout.vin + StackRegSaved::cross_warp(reps, j, T) + 4 * xw_pos(lane, nw), 16));
  };
  const int sh_pair = lane != 0 ? shuffle_owner_pair<A>(a, ln) : 0;  // the shuffle-layer pair this lane owns
  // 16-bit rows keep the shuffle-layer tapes of repetitions 0 .. reps-2 (-42 instructions per row); float32 rows
  // recompute them (kept, they cost 12 + 8 spill bytes at the 128-register cap)
  constexpr bool kKeepShuffleTape = sizeof(S) == 2;

  A acc_in[kChunk - 1][4], acc_sh[4], acc_s[kChunk];  // the last repetition's pairs (as in the reg kernel), the scale
  zero_reg_accumulators(acc_in, acc_sh, acc_s);

  const XLevel<A, true> shl = shuffle_level<A, true>(a, ln.seg_base);
  XLevel<A, true> xwl = cross_warp_level<A, true>(a, ln.seg_base);
  xwl.acc = 0;
  // the lane mask (every in-thread pair run: 16-byte rows put a chunk wholly inside or outside the row), opaque
  // anew for each pass through the levels (as in the reg kernel)
  LaneLive lane_bits = lane_live<A, true>(a, ln, lane);
  lane_bits.bits |= LaneLive::kInThread;
  auto pass_mask = [&]() { return LaneLive{opaque(lane_bits.bits)}; };
  int xw_pair = 0;
  const bool xw_owner = cross_warp_owner<A>(a, ln, lane, wq, acc_blocks, xw_pair);
  const bool qv = lane < nw;
  const int xpos = xw_pos(lane, nw);  // lanes past the level's words read lane % nw's block

  // the block's rows as element offsets, one grid stride of rows apart; the next row loaded a row ahead
  const S* x = static_cast<const S*>(a.x);
  const S* grad = static_cast<const S*>(a.grad);
  S* gx = static_cast<S*>(a.out);
  RawChunk<S, true> xr, gr;
  const int64_t grad_step = static_cast<int64_t>(gridDim.x) * a.grad_ld, x_step = static_cast<int64_t>(gridDim.x) * a.x_ld;
  const int64_t out_step = static_cast<int64_t>(gridDim.x) * d;
  int64_t next_grad = blockIdx.x * a.grad_ld, next_x = blockIdx.x * a.x_ld, out_at = blockIdx.x * static_cast<int64_t>(d);
  auto load_row = [&](int64_t g) {
    gr.load(grad + next_grad, ln.base, d, g < a.groups);
    xr.load(x + next_x, ln.base, d, g < a.groups);
    next_grad += grad_step;
    next_x += x_step;
  };
  // the exchange words of the next barrier ([32] values, then [32] gradients): two buffers, alternating by barrier
  int parity = 0;
  auto words = [&]() {
    A* xb = sm + 64 * parity;
    parity ^= 1;
    return xb;
  };

  load_row(blockIdx.x);
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x, out_at += out_step) {
    A gv[kChunk], v[kChunk];
    gr.unpack(gv);
    xr.unpack(v);
    load_row(g + gridDim.x);
    Tape<A> tp;
    // repetitions 0 .. reps-2 forward, saving each one's input and shuffle-layer and cross-warp tapes
    for (int j = 0; j + 1 < reps; ++j) {
      A* sv = saved(j);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) sv[e] = v[e];
      const LaneLive live = pass_mask();
      parallel_forward_in_warp<A, kKeepShuffleTape, true>(a, ln, blocks.rep(j), v, tp, &live);
      if constexpr (kKeepShuffleTape) {
        A* sh = saved_shuffle(j);
#pragma unroll
        for (int s = 0; s < 5; ++s) {
          if (s < LS) sh[s * T] = tp.sh[s];
        }
      }
      A* xb = words();
      if (lane == 0) xb[wq] = v[0];
      __syncthreads();
      A tt[5];
      const A u = level_forward<true>(xwl, LW, xpos, pass_mask().cross_warp(), blocks.rep(j), qv ? xb[lane] : A(0), tt);
      const A mine = __shfl_sync(kFullMask, u, wq);
      if (lane == 0) v[0] = mine;
      if (wq == 0 && qv) {  // the block's copy (every warp computed the same; read after this row's later barriers)
        A* st = saved_cross_warp(j);
#pragma unroll
        for (int s = 0; s < 4; ++s) st[s] = s < LW ? tt[s] : A(0);
      }
    }
    {  // the last repetition: the reg kernel's row
      const int j = reps - 1;
      const A* bj = blocks.rep(j);
      const LaneLive live = pass_mask();
      const A g_start = gv[0];
      parallel_forward_in_warp<A, true, true>(a, ln, bj, v, tp, &live);
      if (acc_scale) {  // the chunk start of lane 0 gets its final value from the cross-warp layers below
#pragma unroll
        for (int e = 1; e < kChunk; ++e) acc_s[e] += gv[e] * v[e];
        if (lane != 0) acc_s[0] += gv[0] * v[0];
      }
      scale_chunk(static_cast<const A*>(a.scale), ln.base, d, gv);
      A* xb = words();
      if (lane == 0) {
        xb[wq] = v[0];
        xb[32 + wq] = gv[0];
      }
      __syncthreads();
      A tt[5];
      const A u = level_forward<true>(xwl, LW, xpos, pass_mask().cross_warp(), bj, qv ? xb[lane] : A(0), tt);
      const A mine = __shfl_sync(kFullMask, u, wq);
      if (acc_scale && lane == 0) acc_s[0] += g_start * mine;
      const A gmine = cross_warp_backward<true, true>(xwl, LW, xpos, pass_mask().cross_warp(), bj,
                                                      qv ? xb[32 + lane] : A(0), tt, wq, xw_owner,
                                                      cacc + j * rep_cacc, xw_pair);
      if (lane == 0) gv[0] = gmine;
      gv[0] = level_backward<true, true>(shl, LS, ln.t, pass_mask().shuffle(), bj, gv[0], tp.sh,
                                         [&](int, int, A ui, A uj, A gi, A gj) {
                                           if (acc_blocks) accumulate_outer(acc_sh, ui, uj, gi, gj);
                                         });
      in_thread_backward<true, true>(a, ln, bj, d, gv, tp, [&](int k, A ui, A uj, A gi, A gj) {
        if (acc_blocks) accumulate_outer(acc_in[k], ui, uj, gi, gj);
      }, &live);
    }
    // repetitions reps-2 .. 0 backward, their in-thread tapes (float32: and shuffle-layer tapes) recomputed from the
    // saved inputs
    for (int j = reps - 2; j >= 0; --j) {
      const A* bj = blocks.rep(j);
      const LaneLive live = pass_mask();
      A vr[1][kChunk];
      Tape<A> tr[1];
      const A* sv = saved(j);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) vr[0][e] = sv[e];
      if constexpr (kKeepShuffleTape) {
        in_thread_forward_rows<true, true>(a, ln, bj, vr, tr, &live);
        const A* sh = saved_shuffle(j);
#pragma unroll
        for (int s = 0; s < 5; ++s) tr[0].sh[s] = s < LS ? sh[s * T] : A(0);
      } else {
        parallel_forward_in_warp<A, true, true>(a, ln, bj, vr[0], tr[0], &live);
      }
      A tt[5];
      const A* st = saved_cross_warp(j);
#pragma unroll
      for (int s = 0; s < 5; ++s) tt[s] = s < 4 && s < LW ? st[s] : A(0);
      const Tape<A>& tp = tr[0];
      A* xb = words();
      if (lane == 0) xb[32 + wq] = gv[0];
      __syncthreads();
      A* cj = cacc + j * rep_cacc;
      const A gmine = cross_warp_backward<true, true>(xwl, LW, xpos, pass_mask().cross_warp(), bj,
                                                      qv ? xb[32 + lane] : A(0), tt, wq, xw_owner, cj, xw_pair);
      if (lane == 0) gv[0] = gmine;
      A up[1][4] = {{A(0), A(0), A(0), A(0)}};  // the shuffle-layer pair this lane holds as its upper lane
      gv[0] = level_backward<true, true>(shl, LS, ln.t, pass_mask().shuffle(), bj, gv[0], tp.sh,
                                         [&](int, int, A ui, A uj, A gi, A gj) {
                                           up[0][0] = ui, up[0][1] = uj, up[0][2] = gi, up[0][3] = gj;
                                         });
      if (acc_blocks && lane != 0) accumulate_pair_rows(cj + 4 * sh_pair, up);
      A* ia = iacc(j);
      in_thread_backward<true, true>(a, ln, bj, d, gv, tp, [&](int k, A ui, A uj, A gi, A gj) {
        if (acc_blocks) accumulate_pair(ia + 4 * k * T, ui, uj, gi, gj);
      }, &live);
    }
    if (gx != nullptr) store_chunk<S, true>(gx + out_at, ln.base, d, true, gv);
  }

  // the last repetition's shuffle-layer sums to the block's accumulators, then every sum to the partial row, as the
  // stacked kernel writes them (repetition j's pairs from 4 (d - 1) j; R == 1: the block's row of `partial`)
  if (acc_blocks) put_shuffle_sums(a, ln, cacc + (reps - 1) * rep_cacc, acc_sh);
  __syncthreads();
  A* dst = sums_row(args, ln, static_cast<A*>(nullptr), width);
  for (int j = 0; acc_blocks && j < reps; ++j) {
    const A* ia = iacc(j);
    put_block_sums(args, ln, dst + 4 * (args.d - 1) * j, [&](int k, int c) {
      return j + 1 == reps ? acc_in[k][c] : ia[4 * k * T + c];
    }, cacc + j * rep_cacc);
  }
  if (acc_scale) put_scale_sums(args, ln, dst, acc_s);
}

}  // namespace qgoft::cuda::detail
