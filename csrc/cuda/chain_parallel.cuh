// Kernels of the parallel layout (docs/MATH.md: layer r, 1-based, pairs (2^r k, 2^r k + 2^(r-1)),
// present when the second index is < d; pair index off[r] + k). Design and costs: docs/CUDA.md.
//
// Thread t of a row segment holds the elements base .. base + 7 (base = seg_base + 8 t):
//   layers 1-3           inside the thread,
//   layers 4 .. 3+LS     one word exchanged with a warp shuffle at lane distance 2^(r-4),
//                        LS = min(log2 T, 5),
//   layers 9 .. 3+log2 T (T > 32) the chunk starts of lane 0 of each warp go through shared memory,
//                        and warp 0 finishes them with shuffles,
//   top layers           (segmented rows) pairs of segment starts: a separate kernel (forward) or warp 0
//                        of every block (backward).
// The element that moves in layers >= 4 is always a thread's first element v[0]. The three cross-thread
// levels (shuffle, cross-warp, top) are the same computation on different participants: XLevel.
#pragma once

#include <cstddef>
#include <type_traits>

#include "chain_device.cuh"

namespace qgoft::cuda::detail {

constexpr unsigned kFullMask = 0xffffffffu;

template <class A>
struct Tape {
  A x[kLogChunk][kChunk];  // the chunk before in-thread layer 1, 2, 3
  A sh[5];                 // own v[0] before shuffle layer s
  A top[5];                // (warp 0) own exchanged value before cross-warp layer s
};

// One level of up to five cross-thread layers. Participant k of the level (a lane, or a warp's word)
// holds element base + (k << sh); its exchange layer s (partners at distance m = 2^s) pairs participant
// lo (lo % 2m == 0) with lo + m through block off[s] + ((base + (lo << sh)) >> (s + 1 + sh)), present when
// the upper element is < d. kTable: the block is read from the segment's shared-memory table
// (ParallelTable, S = table; base is the segment start) instead. Gradient accumulators of those pairs
// (backward; acc < 0: not accumulated): element acc + 4 * (n - (n >> (s + c0)) + (lo >> (s + 1))) of the
// kernel's accumulator array.
template <class A, bool kTable = false>
struct XLevel {
  int base = 0, sh = 0, d = 0;
  const int32_t* off = nullptr;  // into the kernel's ParallelArgs (off + 4, off + 9 or top_off)
  int table = 0;
  int acc = -1;
  int n = 0, c0 = 0;

  __device__ __forceinline__ int pair(int s, int lo) const {
    const int i = base + (lo << sh);
    if (i + ((1 << s) << sh) >= d) return -1;
    return block(s, lo, i);
  }
  // the same, the pair's existence not checked
  __device__ __forceinline__ int index(int s, int lo) const { return block(s, lo, base + (lo << sh)); }
  // the block of pair (lo, lo + 2^s); i: element base + (lo << sh)
  __device__ __forceinline__ int block(int s, int lo, int i) const {
    if constexpr (kTable) return ParallelTable::first(table, s + 1 + sh) + ((lo << sh) >> (s + 1 + sh));
    return off[s] + (i >> (s + 1 + sh));
  }
  __device__ __forceinline__ int acc_at(int s, int lo) const {
    return acc + 4 * (n - (n >> (s + c0)) + (lo >> (s + 1)));
  }
};

// A participant's roles in the layers of one level (bit s: layer s): in `live` it holds an element of an
// existing pair, in `upper` (a subset) the upper one. Computed once before a row loop (level_live) and passed
// to level_forward / level_backward in place of their `active` flag: the row loop then reads one bit per layer
// instead of checking the participant's position and the pair against d, and with the blocks in the
// segment's table (kTable) every participant reads its layer's block whether or not it takes part
// (lv.index(s, pos & ~m): inside the table for any participant pos of the level) and the roles select its
// update: no branch around the read.
struct LiveBits {
  unsigned live, upper;
};

// Where a participant's blocks of a level's layers are, with LiveBits: the segment's table (const A*, block
// lv.index(s, pos & ~m) of layer s), or a LaneBlocks: layer s's block at block s * stride from `at`, one
// address per participant (the reg backward's lane table, ParallelLaneTable; no index arithmetic per row).
template <class A>
struct LaneBlocks {
  const A* at;
  int stride;
};
template <class A, bool kTable>
__device__ __forceinline__ void live_block(const XLevel<A, kTable>& lv, const A* blocks, int s, int pos, A& g0, A& g1,
                                           A& g2, A& g3) {
  load_block_from<kTable>(blocks, lv.index(s, pos & ~(1 << s)), g0, g1, g2, g3);
}
template <class A, bool kTable>
__device__ __forceinline__ void live_block(const XLevel<A, kTable>&, LaneBlocks<A> lb, int s, int, A& g0, A& g1, A& g2,
                                           A& g3) {
  load_block_shared(lb.at, s * lb.stride, g0, g1, g2, g3);
}

// A level of a row segment whose participants are 2^c0 threads apart: the shuffle level (c0 = 0, layers
// 4 ..) or the cross-warp level (c0 = 5: lane 0 of each warp, layers 9 ..).
template <class A, bool kTable>
__device__ __forceinline__ XLevel<A, kTable> segment_level(const ParallelArgs& a, int seg_base, int c0) {
  XLevel<A, kTable> lv;
  lv.table = a.table;
  lv.base = seg_base;
  lv.sh = c0 + kLogChunk;
  lv.d = static_cast<int>(a.d);
  if constexpr (!kTable) lv.off = a.off + 4 + c0;
  lv.n = a.T;
  lv.c0 = c0;
  return lv;
}
template <class A, bool kTable>
__device__ __forceinline__ XLevel<A, kTable> shuffle_level(const ParallelArgs& a, int seg_base) {
  return segment_level<A, kTable>(a, seg_base, 0);
}
template <class A, bool kTable>
__device__ __forceinline__ XLevel<A, kTable> cross_warp_level(const ParallelArgs& a, int seg_base) {
  return segment_level<A, kTable>(a, seg_base, 5);
}
// Top level of a segmented row: participant q is segment q's start (counted in segments: the pair of
// segments lo, lo + m exists when lo + m < nseg).
template <class A>
__device__ __forceinline__ XLevel<A> top_level(const ParallelArgs& a) {
  XLevel<A> lv;
  lv.d = a.nseg;
  lv.off = a.top_off;
  lv.n = kMaxTopLanes;
  return lv;
}

// Participant `pos` of a level, from its `active` flag (taking part in the level): whether it may hold an
// element of a pair of layer s (pos % 2^s == 0).
__device__ __forceinline__ bool takes_part(bool active, int pos, int s) {
  return active && (pos & ((1 << s) - 1)) == 0;
}
// The LiveBits of participant `pos` in the first `layers` layers of a level.
template <class A, bool kTable>
__device__ __forceinline__ LiveBits level_live(const XLevel<A, kTable>& lv, int layers, int pos, bool active) {
  LiveBits live{0u, 0u};
#pragma unroll
  for (int s = 0; s < 5; ++s) {
    if (s < layers && takes_part(active, pos, s) && lv.pair(s, pos & ~(1 << s)) >= 0) {
      live.live |= 1u << s;
      if ((pos >> s) & 1) live.upper |= 1u << s;
    }
  }
  return live;
}

// a b + c d rounded as nvcc contracts that expression elsewhere in these kernels, fma(a, b, c d) with c d
// rounded first; written out, so that no rewrite of the expression (e.g. the two sides of a select merged
// into one expression of selected operands) moves the rounding to the other product. The host emulation
// rounds it as its compiler rounds the plain expression (no contraction).
template <class A>
__device__ __forceinline__ A dot2(A a, A b, A c, A d) {
#ifdef QGOFT_CUDA_HOST_SIM
  return a * b + c * d;
#else
  if constexpr (sizeof(A) == 8) return __fma_rn(a, b, __dmul_rn(c, d));
  return __fmaf_rn(a, b, __fmul_rn(c, d));
#endif
}

// The own half of rotate_pair (kTransposed: rotate_pair<true>) for the participant holding the lower or the
// upper element: its new value from block (g0, g1, g2, g3), its value v and its partner's w; the products
// in the order of the expressions of level_forward / level_backward's `bool` path.
template <bool kTransposed, class A>
__device__ __forceinline__ A own_half(bool upper, A g0, A g1, A g2, A g3, A v, A w) {
  if constexpr (kTransposed) return upper ? dot2(g2, w, g3, v) : dot2(g0, v, g1, w);
  return upper ? dot2(g1, w, g3, v) : dot2(g0, v, g2, w);
}

// level_forward's LiveBits path on N rows at once: the same participant of N rows that share the level's
// blocks and roles (the paired reg backward, chain_parallel_pair.cuh); each layer's block read once for all
// rows, the rows' shuffles and updates side by side (independent chains). v[r], tape[r]: row r's v and tape.
template <bool kTape, int N, class A, bool kTable, class Blocks>
__device__ __forceinline__ void level_forward_rows(const XLevel<A, kTable>& lv, int layers, int pos, LiveBits active,
                                                   Blocks blocks, A (&v)[N], A (&tape)[N][5]) {
  static_assert(kTable, "LiveBits read every participant's block: from the segment's table only");
#pragma unroll
  for (int s = 0; s < 5; ++s) {
    if (s < layers) {
      const int m = 1 << s;
      A w[N];
#pragma unroll
      for (int r = 0; r < N; ++r) {
        w[r] = __shfl_xor_sync(kFullMask, v[r], m);
        if constexpr (kTape) tape[r][s] = v[r];
      }
      A g0, g1, g2, g3;
      live_block(lv, blocks, s, pos, g0, g1, g2, g3);
      const bool upper = ((active.upper >> s) & 1u) != 0, live = ((active.live >> s) & 1u) != 0;
#pragma unroll
      for (int r = 0; r < N; ++r) {
        const A nv = own_half<false>(upper, g0, g1, g2, g3, v[r], w[r]);
        if (live) v[r] = nv;
      }
    }
  }
}

// Forward through the first `layers` layers of a level (all 32 lanes of the warp must call it);
// participant `pos` holds v; `active`: a bool (taking part in the level) or the participant's LiveBits.
// With kTape, tape[s] receives v as it was before layer s. blocks: the table (const A*), or with LiveBits a
// LaneBlocks (live_block).
template <bool kTape, class A, bool kTable, class Active, class Blocks>
__device__ __forceinline__ A level_forward(const XLevel<A, kTable>& lv, int layers, int pos, Active active,
                                           Blocks blocks, A v, A (&tape)[5]) {
  if constexpr (std::is_same_v<Active, LiveBits>) {  // one row of level_forward_rows
    A vr[1] = {v};
    A tr[1][5];
    level_forward_rows<kTape>(lv, layers, pos, active, blocks, vr, tr);
#pragma unroll
    for (int s = 0; s < 5; ++s) {
      if (kTape && s < layers) tape[s] = tr[0][s];
    }
    return vr[0];
  } else {
#pragma unroll
    for (int s = 0; s < 5; ++s) {
      if (s < layers) {
        const int m = 1 << s;
        const A w = __shfl_xor_sync(kFullMask, v, m);
        if constexpr (kTape) tape[s] = v;
        if (takes_part(active, pos, s)) {
          const bool upper = (pos & m) != 0;
          const int p = lv.pair(s, upper ? pos - m : pos);
          if (p >= 0) {
            A g0, g1, g2, g3;
            load_block_from<kTable>(blocks, p, g0, g1, g2, g3);
            v = upper ? g1 * w + g3 * v : g0 * v + g2 * w;  // the own half of rotate_pair
          }
        }
      }
    }
    return v;
  }
}

// level_backward's LiveBits path on N rows at once (as level_forward_rows): g[r], tape[r] row r's; acc(r, s, lo,
// ui, uj, gi, gj) receives row r's pair sums, rows in order within each layer.
template <bool kTape, bool kUpperAcc, int N, class A, bool kTable, class Blocks, class Acc>
__device__ __forceinline__ void level_backward_rows(const XLevel<A, kTable>& lv, int layers, int pos, LiveBits active,
                                                    Blocks blocks, A (&g)[N], const A (&tape)[N][5], Acc&& acc) {
  static_assert(kTable, "LiveBits read every participant's block: from the segment's table only");
#pragma unroll
  for (int s = 4; s >= 0; --s) {
    if (s < layers) {
      const int m = 1 << s;
      A gw[N], uw[N];
#pragma unroll
      for (int r = 0; r < N; ++r) {
        gw[r] = __shfl_xor_sync(kFullMask, g[r], m);
        uw[r] = A(0);
        if constexpr (kTape) uw[r] = __shfl_xor_sync(kFullMask, tape[r][s], m);
      }
      A g0, g1, g2, g3;
      live_block(lv, blocks, s, pos, g0, g1, g2, g3);
      const bool upper = ((active.upper >> s) & 1u) != 0, live = ((active.live >> s) & 1u) != 0;
#pragma unroll
      for (int r = 0; r < N; ++r) {
        if (upper) {
          if constexpr (kTape && kUpperAcc) acc(r, s, pos - m, uw[r], tape[r][s], gw[r], g[r]);
        } else if (live) {
          if constexpr (kTape && !kUpperAcc) acc(r, s, pos, tape[r][s], uw[r], g[r], gw[r]);
        }
        const A ng = own_half<true>(upper, g0, g1, g2, g3, g[r], gw[r]);
        if (live) g[r] = ng;
      }
    }
  }
}

// Backward through the layers of a level, last first: g is this participant's gradient; with kTape,
// tape[s] is its value before layer s and one participant of each pair (lo, lo + m) hands the pair's
// inputs and output gradients to acc(s, lo, ui, uj, gi, gj): the lower one, or with kUpperAcc the upper
// one (each participant is the upper one of at most one pair of the level, so that acc can keep one
// pair's sums in registers). `active` and `blocks`: as in level_forward.
template <bool kTape, bool kUpperAcc = false, class A, bool kTable, class Active, class Blocks, class Acc>
__device__ __forceinline__ A level_backward(const XLevel<A, kTable>& lv, int layers, int pos, Active active,
                                            Blocks blocks, A g, const A (&tape)[5], Acc&& acc) {
  if constexpr (std::is_same_v<Active, LiveBits>) {  // one row of level_backward_rows
    A gr[1] = {g};
    A tr[1][5];
#pragma unroll
    for (int s = 0; s < 5; ++s) {
      if (kTape && s < layers) tr[0][s] = tape[s];
    }
    level_backward_rows<kTape, kUpperAcc>(lv, layers, pos, active, blocks, gr, tr,
                                          [&](int, int s, int lo, A ui, A uj, A gi, A gj) {
                                            acc(s, lo, ui, uj, gi, gj);
                                          });
    return gr[0];
  } else {
#pragma unroll
    for (int s = 4; s >= 0; --s) {
      if (s < layers) {
        const int m = 1 << s;
        const A gw = __shfl_xor_sync(kFullMask, g, m);
        A uw = A(0);
        if constexpr (kTape) uw = __shfl_xor_sync(kFullMask, tape[s], m);
        if (takes_part(active, pos, s)) {
          const bool upper = (pos & m) != 0;
          const int lo = upper ? pos - m : pos;
          const int p = lv.pair(s, lo);
          if (p >= 0) {
            A g0, g1, g2, g3;
            load_block_from<kTable>(blocks, p, g0, g1, g2, g3);
            if (!upper) {
              if constexpr (kTape && !kUpperAcc) acc(s, lo, tape[s], uw, g, gw);
              g = g0 * g + g1 * gw;  // the own half of rotate_pair<true>
            } else {
              if constexpr (kTape && kUpperAcc) acc(s, lo, uw, tape[s], gw, g);
              g = g2 * gw + g3 * g;
            }
          }
        }
      }
    }
    return g;
  }
}

// The same, accumulating the block gradients into acc[lv.acc_at(s, lo)] (when lv.acc >= 0).
template <bool kTape, class A, bool kTable>
__device__ __forceinline__ A level_backward(const XLevel<A, kTable>& lv, int layers, int pos, bool active,
                                            const A* blocks, A* acc, A g, const A (&tape)[5]) {
  return level_backward<kTape>(lv, layers, pos, active, blocks, g, tape, [&](int s, int lo, A ui, A uj, A gi, A gj) {
    if (lv.acc >= 0) accumulate_pair(acc + lv.acc_at(s, lo), ui, uj, gi, gj);
  });
}

// The cross-warp level through shared memory: lane 0 of every warp stores its word at xch[idx], warp 0
// computes f(q, q < words, word q) for word q and stores the results back; returns this thread's new
// word (lane 0; the others keep `mine`). Must be reached by all threads of the block.
template <class A, class F>
__device__ __forceinline__ A via_warp0(A mine, int tid, int idx, int words, A* xch, F&& f) {
  const bool lane0 = (tid & 31) == 0;
  if (lane0) xch[idx] = mine;
  __syncthreads();
  if (tid < 32) {
    const bool qv = tid < words;
    const A u = f(tid, qv, qv ? xch[tid] : A(0));
    if (qv) xch[tid] = u;
  }
  __syncthreads();
  if (lane0) mine = xch[idx];
  return mine;
}

// Where a thread of a parallel kernel sits: row slot, thread t of the row segment, its chunk's first
// element (base) and the segment's (seg_base).
struct Lanes {
  int tid, slot, t, sigma, seg_base, base;
  __device__ __forceinline__ explicit Lanes(const ParallelArgs& a) {
    tid = threadIdx.x;
    slot = tid >> a.logT;
    t = tid & (a.T - 1);
    sigma = blockIdx.y;
    seg_base = sigma << (a.logT + kLogChunk);
    base = seg_base + (t << kLogChunk);
  }
};

// The shuffle layers of a row segment: LS = min(log2 T, 5).
__device__ __forceinline__ int shuffle_layers(const ParallelArgs& a) { return a.logT < 5 ? a.logT : 5; }

// Block of in-thread layer r (1 .. 3) for the pair that starts at chunk element e of this thread: in the
// global table, or (kTable) in the segment's shared-memory table.
template <bool kTable>
__device__ __forceinline__ int in_thread_pair(const ParallelArgs& a, const Lanes& ln, int r, int e) {
  if constexpr (kTable) return ParallelTable::first(a.table, r) + (e >> r) * a.T + ln.t;
  return a.off[r] + ((ln.base + e) >> r);
}

// Table variant: the block copies its segment's blocks of layers 1 .. log2 S from the global table
// `blocks` (one repetition's (d - 1, 4) blocks) into tab (ParallelTable layout; zeros for pairs past d,
// which are never read). The caller synchronises.
template <class A>
__device__ __forceinline__ void fill_table(const ParallelArgs& a, const A* blocks, int seg_base, A* tab) {
  const int S = a.table, d = static_cast<int>(a.d);
  for (int idx = threadIdx.x; idx < S - 1; idx += blockDim.x) {
    int r = 1;
    while (idx >= ParallelTable::first(S, r + 1)) ++r;
    int k = idx - ParallelTable::first(S, r);  // pair k of the segment's layer r
    if (r <= kLogChunk) k = (k % a.T) * (kChunk >> r) + k / a.T;
    const int i = seg_base + (k << r);
    A g0 = A(0), g1 = A(0), g2 = A(0), g3 = A(0);
    if (i + (1 << (r - 1)) < d) load_block(blocks, a.off[r] + (i >> r), g0, g1, g2, g3);
    A* e = tab + 4 * static_cast<int64_t>(idx);
    e[0] = g0;
    e[1] = g1;
    e[2] = g2;
    e[3] = g3;
  }
}

// In-thread pair k (layer 1 -> 0..3, layer 2 -> 4..5, layer 3 -> 6): layer li + 1 (0-based li), pairs
// starting at chunk element e.
QGOFT_HOST_DEVICE constexpr int in_thread_pair_number(int li, int e) {
  return kChunk - (kChunk >> li) + e / (2 << li);
}

// Row-invariant facts of a thread of a parallel kernel, computed once before a row loop (the reg backward)
// so that the loop reads bits instead of checking pairs against d and lane positions: bit k (0..6) in-thread
// pair k exists; bits kShuffle + s / kShuffle + 5 + s: the thread's LiveBits in the shuffle level
// (participant t; live / upper); bits kCrossWarp + s / kCrossWarp + 5 + s: in the cross-warp level as lane
// `lane` of its warp (participant lane, active when lane < words of the level).
struct LaneLive {
  static constexpr unsigned kInThread = (1u << (kChunk - 1)) - 1;  // the bits of the 7 in-thread pairs
  static constexpr int kShuffle = 8, kCrossWarp = 18;
  unsigned bits;
  __device__ __forceinline__ bool in_thread(int k) const { return ((bits >> k) & 1u) != 0; }
  __device__ __forceinline__ LiveBits shuffle() const { return level(kShuffle); }
  __device__ __forceinline__ LiveBits cross_warp() const { return level(kCrossWarp); }
  __device__ __forceinline__ LiveBits level(int at) const { return {(bits >> at) & 31u, (bits >> (at + 5)) & 31u}; }
  static __device__ __forceinline__ unsigned place(LiveBits live, int at) {
    return (live.live | (live.upper << 5)) << at;
  }
};

// The LaneLive of thread ln (lane: ln.t % 32) of a row segment. Its cross-warp bits: as participant `lane`
// of its row's level (the reg backward: every warp computes the level for its row, lanes < T/32 active), or
// with `words` > 0 as participant lane % (T/32) of the level of warp 0's lanes < words (the forward's
// via_warp0: the words of R rows in one warp).
template <class A, bool kTable>
__device__ __forceinline__ LaneLive lane_live(const ParallelArgs& a, const Lanes& ln, int lane, int words = 0) {
  const int d = static_cast<int>(a.d);
  unsigned bits = 0;
#pragma unroll
  for (int li = 0; li < kLogChunk; ++li) {
#pragma unroll
    for (int e = 0; e < kChunk; e += 2 << li) {
      if (ln.base + e + (1 << li) < d) bits |= 1u << in_thread_pair_number(li, e);
    }
  }
  const int LS = shuffle_layers(a);
  bits |= LaneLive::place(level_live(shuffle_level<A, kTable>(a, ln.seg_base), LS, ln.t, true), LaneLive::kShuffle);
  if (a.logT > 5) {
    const XLevel<A, kTable> lv = cross_warp_level<A, kTable>(a, ln.seg_base);
    const int pos = words > 0 ? lane & ((a.T >> 5) - 1) : lane;
    bits |= LaneLive::place(level_live(lv, a.logT - 5, pos, lane < (words > 0 ? words : a.T >> 5)),
                            LaneLive::kCrossWarp);
  }
  return {bits};
}

// The in-thread layers 1-3 of a thread's chunk in N rows (forward direction), each block read once for all rows;
// kTape: tp[r].x records row r's chunk before each layer. live: the thread's LaneLive, or null (the pairs are
// checked against d).
template <bool kTape, bool kTable, int N, class A>
__device__ __forceinline__ void in_thread_forward_rows(const ParallelArgs& a, const Lanes& ln, const A* blocks,
                                                       A (&v)[N][kChunk], Tape<A> (&tp)[N], const LaneLive* live) {
  const int d = static_cast<int>(a.d);
#pragma unroll
  for (int li = 0; li < kLogChunk; ++li) {
    if constexpr (kTape) {
#pragma unroll
      for (int r = 0; r < N; ++r) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) tp[r].x[li][e] = v[r][e];
      }
    }
    const int h = 1 << li;
#pragma unroll
    for (int e = 0; e < kChunk; e += 2 * h) {
      const int i = ln.base + e;
      const bool exists = live != nullptr ? live->in_thread(in_thread_pair_number(li, e)) : i + h < d;
      if (exists) {
        A g0, g1, g2, g3;
        load_block_from<kTable>(blocks, in_thread_pair<kTable>(a, ln, li + 1, e), g0, g1, g2, g3);
#pragma unroll
        for (int r = 0; r < N; ++r) rotate_values<false>(g0, g1, g2, g3, v[r][e], v[r][e + h]);
      }
    }
  }
}

// Applies the layers inside a warp (in-thread layers 1-3, shuffle layers 4 .. 3 + min(log2 T, 5)) to a
// row segment (forward direction), optionally recording the tape (tp.x, tp.sh). live: the thread's
// LaneLive, or null (the pairs are checked against d); sh_blocks (with live): where the shuffle layers'
// blocks are (level_forward), nullptr: in `blocks`.
template <class A, bool kTape, bool kTable, class ShBlocks = std::nullptr_t>
__device__ __forceinline__ void parallel_forward_in_warp(const ParallelArgs& a, const Lanes& ln, const A* blocks,
                                                         A (&v)[kChunk], Tape<A>& tp,
                                                         const LaneLive* live = nullptr,
                                                         ShBlocks sh_blocks = nullptr) {
  {  // in-thread layers 1-3: one row of in_thread_forward_rows
    A vr[1][kChunk];
    Tape<A> tr[1];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) vr[0][e] = v[e];
    in_thread_forward_rows<kTape, kTable>(a, ln, blocks, vr, tr, live);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) v[e] = vr[0][e];
    if constexpr (kTape) {
#pragma unroll
      for (int li = 0; li < kLogChunk; ++li) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) tp.x[li][e] = tr[0].x[li][e];
      }
    }
  }
  const int LS = shuffle_layers(a);
  const XLevel<A, kTable> lv = shuffle_level<A, kTable>(a, ln.seg_base);
  if constexpr (kTable) {  // LiveBits: table variants only
    if (live != nullptr) {
      if constexpr (std::is_same_v<ShBlocks, std::nullptr_t>) {
        v[0] = level_forward<kTape>(lv, LS, ln.t, live->shuffle(), blocks, v[0], tp.sh);
      } else {
        v[0] = level_forward<kTape>(lv, LS, ln.t, live->shuffle(), sh_blocks, v[0], tp.sh);
      }
      return;
    }
  }
  v[0] = level_forward<kTape>(lv, LS, ln.t, true, blocks, v[0], tp.sh);
}

// Applies layers 1 .. log2(8 T) to a row segment (forward direction), optionally recording the tape.
// Must be reached by all threads of the block (shuffles with the full mask, __syncthreads).
// blocks: the global table, or (kTable) the segment's shared-memory table. live (kTable only): the thread's
// LaneLive (lane_live with words = R T / 32), or null (the pairs are checked against d).
template <class A, bool kTape, bool kTable>
__device__ __forceinline__ void parallel_forward_local(const ParallelArgs& a, const Lanes& ln, const A* blocks,
                                                       A (&v)[kChunk], A* xch, Tape<A>& tp,
                                                       const LaneLive* live = nullptr) {
  parallel_forward_in_warp<A, kTape, kTable>(a, ln, blocks, v, tp, live);
  if (a.logT > 5) {
    const int nw = a.T >> 5;
    const XLevel<A, kTable> lv = cross_warp_level<A, kTable>(a, ln.seg_base);
    v[0] = via_warp0(v[0], ln.tid, ln.slot * nw + (ln.t >> 5), a.R * nw, xch, [&](int q, bool qv, A u) {
      if constexpr (kTable) {
        if (live != nullptr) return level_forward<kTape>(lv, a.logT - 5, q & (nw - 1), live->cross_warp(), blocks, u, tp.top);
      }
      return level_forward<kTape>(lv, a.logT - 5, q & (nw - 1), qv, blocks, u, tp.top);
    });
  }
}

// Where repetition j's blocks are: in the global (P, 4) table, or (kTable) in the shared-memory tables
// (one ParallelTable per repetition).
template <class A>
struct StackBlocks {
  const A* base;
  int64_t stride;  // accumulation-type elements between repetitions
  __device__ __forceinline__ const A* rep(int j) const { return base + j * stride; }
};

// kTable: copies every repetition's segment table into tab (consecutive, 4 (S - 1) elements each) and
// returns them; otherwise the global table. The caller synchronises.
template <class A, bool kTable>
__device__ __forceinline__ StackBlocks<A> stack_blocks(const ParallelArgs& a, const Lanes& ln, A* tab) {
  const A* global = static_cast<const A*>(a.blocks);
  const int64_t rep_global = 4 * (a.d - 1);
  if constexpr (kTable) {
    const int64_t rep_table = 4 * ParallelTable::blocks(a.table);
    for (int j = 0; j < a.reps; ++j) fill_table(a, global + j * rep_global, ln.seg_base, tab + j * rep_table);
    return {tab, rep_table};
  }
  return {global, rep_global};
}

// The end of a forward row's segment (the plain and the prefetching forward): a segmented row's segment start
// to `top` (thread 0 of the segment), then, when the launch stores (a.store), the scale and the chunk to y.
template <class S, bool kVec, class A>
__device__ __forceinline__ void finish_forward_row(const ParallelArgs& a, const Lanes& ln, int64_t row, bool valid,
                                                   A (&v)[kChunk]) {
  const int d = static_cast<int>(a.d);
  if (a.nseg > 1 && ln.t == 0 && valid) static_cast<A*>(a.top)[row * a.nseg + ln.sigma] = v[0];
  if (a.store) {
    scale_chunk(static_cast<const A*>(a.scale), ln.base, d, v);
    store_chunk<S, kVec>(static_cast<S*>(a.out) + row * d, ln.base, d, valid, v);
  }
}

// Whether the forward of `a` runs parallel_forward_kernel's instantiation with the repetition loop (kRepLoop): a
// stack (reps > 1), and the table variant for any reps; the `base` forward of a single layout runs it without
// the loop (the loop cost its row ~45 SASS instructions against the sources before the restructure; the table
// variant's row was not shorter without it). The launchers' and the emulation's one rule.
QGOFT_HOST_DEVICE inline bool forward_rep_loop(const ParallelArgs& a) { return a.reps > 1 || a.table > 0; }

// Forward: y = scale * chain(x) on row segments (blockIdx.y = segment), the layout's repetitions (a.reps;
// > 1 only with whole rows, nseg == 1) in order over the registers (kRepLoop; without it a.reps == 1:
// forward_rep_loop). Segmented rows also write the local result of every segment start to `top`
// (parallel_top_forward_kernel finishes them).
// kTable: the block's segment of the block table (of every repetition) is copied to shared memory first
// (after xch); its segments have at most 4096 elements (512 threads), three blocks per SM (float64: its
// 128 KiB table allows one; stacks: their tables allow fewer).
template <class S, bool kVec, bool kTable, bool kRepLoop>
__global__ void __launch_bounds__(kTable ? 512 : 1024, kTable && sizeof(S) < 8 ? 3 : 1) parallel_forward_kernel(const ParallelArgs a) {
  using A = typename Elem<S>::A;
  QGOFT_DYNAMIC_SMEM(A, xch);
  const Lanes ln(a);
  const StackBlocks<A> blocks = stack_blocks<A, kTable>(a, ln, xch + 32);
  if constexpr (kTable) __syncthreads();
  const int d = static_cast<int>(a.d);
  const S* x = static_cast<const S*>(a.x);
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row = g * a.R + ln.slot;
    const bool valid = row < a.rows;
    A v[kChunk];
    load_chunk<S, kVec>(x + row * a.x_ld, ln.base, d, valid, v);
    Tape<A> tp;
    if constexpr (kRepLoop) {
      for (int j = 0; j < a.reps; ++j) parallel_forward_local<A, false, kTable>(a, ln, blocks.rep(j), v, xch, tp);
    } else {
      parallel_forward_local<A, false, kTable>(a, ln, blocks.rep(0), v, xch, tp);
    }
    finish_forward_row<S, kVec>(a, ln, row, valid, v);
  }
}

// Segmented forward, second step: the top layers on the segment starts of each row (one warp per row,
// lane q = segment q), then the scale; overwrites y at the segment starts.
template <class S>
__global__ void __launch_bounds__(32 * kTopRowsPerBlock) parallel_top_forward_kernel(const ParallelArgs a) {
  using A = typename Elem<S>::A;
  const A* blocks = static_cast<const A*>(a.blocks);
  const A* scale = static_cast<const A*>(a.scale);
  const A* top = static_cast<const A*>(a.top);
  S* y = static_cast<S*>(a.out);
  const int q = threadIdx.x & 31;
  const bool qv = q < a.nseg;
  const int c = q << (a.logT + kLogChunk);
  const XLevel<A> lv = top_level<A>(a);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kTopRowsPerBlock + (threadIdx.x >> 5);
       row < a.rows; row += static_cast<int64_t>(gridDim.x) * kTopRowsPerBlock) {
    A unused[5];
    A u = level_forward<false>(lv, a.top_layers, q, qv, blocks, qv ? top[row * a.nseg + q] : A(0), unused);
    if (qv) {
      if (scale != nullptr) u *= __ldg(scale + c);
      y[row * a.d + c] = Elem<S>::from(u);
    }
  }
}

// Backward through the top layers of a segmented row (warp 0 of every backward block, lane q = segment
// q): recomputes the segment starts' values from the forward kernel's `top` results (kGrads), adds the
// scale gradient of the segment starts and back-propagates their gradients; returns segment `sigma`'s
// gradient (in every lane). Only blocks of segment 0 accumulate the top pairs' gradients (tacc).
// kStartLoaded: the caller loaded lane q's segment start gradient (grad at q << log2 S, lanes q < nseg of valid
// rows) into `start`; otherwise it is loaded here.
template <class S, bool kGrads, bool kStartLoaded = false>
__device__ __forceinline__ typename Elem<S>::A top_backward(const ParallelArgs& a, int64_t row, bool valid,
                                                            int sigma, typename Elem<S>::A* tacc,
                                                            typename Elem<S>::A start = {}) {
  using A = typename Elem<S>::A;
  const A* blocks = static_cast<const A*>(a.blocks);
  const A* scale = static_cast<const A*>(a.scale);
  const S* grad = static_cast<const S*>(a.grad);
  const int q = threadIdx.x & 31;  // warp 0: the same; tells the compiler q < 32
  const bool qv = q < a.nseg && valid;
  XLevel<A> lv = top_level<A>(a);
  A u = A(0);
  A tt[5];
  if constexpr (kGrads) {
    u = level_forward<true>(lv, a.top_layers, q, qv, blocks,
                            qv ? static_cast<const A*>(a.top)[row * a.nseg + q] : A(0), tt);
  }
  const int c = q << (a.logT + kLogChunk);
  A gq;
  if constexpr (kStartLoaded) {
    gq = qv ? start : A(0);
  } else {
    gq = qv ? Elem<S>::to(grad[row * a.grad_ld + c]) : A(0);
  }
  if (kGrads && a.want_scale && sigma == 0 && qv) tacc[4 * (kMaxTopLanes - 1) + q] += gq * u;
  if (scale != nullptr && qv) gq *= __ldg(scale + c);
  if (kGrads && a.want_blocks && sigma == 0) lv.acc = 0;
  gq = level_backward<kGrads>(lv, a.top_layers, q, qv, blocks, tacc, gq, tt);
  return __shfl_sync(kFullMask, gq, sigma);
}

// End of the backward, in pieces shared with the stacked-layout kernels (chain_stack.cuh). Every thread
// writes the sums it owns into its slot's row of sums (sums_row: R > 1, the block's per-slot rows `red` in
// shared memory, then summed in slot order by reduce_slot_rows; R == 1: partial row blockIdx.x).
template <class A>
__device__ __forceinline__ A* sums_row(const ParallelArgs& a, const Lanes& ln, A* red, int width) {
  return a.R > 1 ? red + static_cast<int64_t>(ln.slot) * width
                 : static_cast<A*>(a.partial) + static_cast<int64_t>(blockIdx.x) * a.partial_ld;
}

// The block sums of one layout repetition (pairs 0 .. d - 2 of dst): in-thread pair k (layer 1 -> 0..3,
// layer 2 -> 4..5, layer 3 -> 6) entry c from in_sum(k, c), cross-thread pairs of layer c + 4 from cacc
// ([R][T-1][4]; thread t owns local pair t).
template <class A, class InSum>
__device__ __forceinline__ void put_block_sums(const ParallelArgs& a, const Lanes& ln, A* dst, InSum&& in_sum,
                                               const A* cacc) {
  const int T = a.T, d = static_cast<int>(a.d);
#pragma unroll
  for (int li = 0; li < kLogChunk; ++li) {
    const int h = 1 << li;
#pragma unroll
    for (int e = 0; e < kChunk; e += 2 * h) {
      const int i = ln.base + e;
      constexpr int kFirst[3] = {0, 4, 6};
      if (i + h < d) {
        A* out = dst + 4 * (a.off[li + 1] + (i >> (li + 1)));
#pragma unroll
        for (int c = 0; c < 4; ++c) out[c] = in_sum(kFirst[li] + e / (2 * h), c);
      }
    }
  }
#pragma unroll
  for (int c = 0; c < 10; ++c) {
    if (c < a.logT && ln.t < (T >> (c + 1))) {
      const int i = ln.seg_base + (ln.t << (c + 4));
      if (i + (kChunk << c) < d) {
        const A* ca = cacc + 4 * (ln.slot * (T - 1) + (T - (T >> c)) + ln.t);
        A* out = dst + 4 * (a.off[c + 4] + (i >> (c + 4)));
#pragma unroll
        for (int k = 0; k < 4; ++k) out[k] = ca[k];
      }
    }
  }
}

// The scale sums of this thread's elements (after the 4 P block entries; segmented rows: not the segment
// starts, which warp 0 of segment 0 owns).
template <class A>
__device__ __forceinline__ void put_scale_sums(const ParallelArgs& a, const Lanes& ln, A* dst,
                                               const A (&acc_s)[kChunk]) {
  const int d = static_cast<int>(a.d), P = static_cast<int>(a.num_pairs);
  const bool segmented = a.nseg > 1;
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    if (ln.base + e < d && !(segmented && ln.t == 0 && e == 0)) dst[4 * P + ln.base + e] = acc_s[e];
  }
}

// R > 1: after a barrier, the slot rows `red` summed in slot order into partial row blockIdx.x.
template <class A>
__device__ __forceinline__ void reduce_slot_rows(const ParallelArgs& a, const Lanes& ln, const A* red, int width) {
  if (a.R <= 1) return;
  __syncthreads();
  A* out = static_cast<A*>(a.partial) + static_cast<int64_t>(blockIdx.x) * a.partial_ld;
  const int P = static_cast<int>(a.num_pairs);
  const int begin = a.want_blocks ? 0 : 4 * P, end = a.want_scale ? width : 4 * P;
  for (int k = begin + ln.tid; k < end; k += blockDim.x) {
    A s = red[k];
    for (int r = 1; r < a.R; ++r) s += red[static_cast<int64_t>(r) * width + k];
    out[k] = s;
  }
}

// The single layout's end of the backward: in-thread pairs from registers, cross-thread pairs from cacc,
// the top pairs and the segment starts' scale sums from tacc (warp 0 of segment 0).
template <class A>
__device__ __forceinline__ void parallel_write_sums(const ParallelArgs& a, const Lanes& ln,
                                                    const ParallelBackwardSmem& layout, A* sm,
                                                    const A (&acc_in)[kChunk - 1][4],
                                                    const A (&acc_s)[kChunk]) {
  const int P = static_cast<int>(a.num_pairs);
  const int width = 4 * P + static_cast<int>(a.d);
  const A* tacc = sm + layout.tacc;
  A* red = sm + layout.red;
  A* dst = sums_row(a, ln, red, width);
  if (a.want_blocks) put_block_sums(a, ln, dst, [&](int k, int c) { return acc_in[k][c]; }, sm + layout.cacc);
  if (a.want_scale) put_scale_sums(a, ln, dst, acc_s);
  if (a.nseg > 1 && ln.sigma == 0 && ln.tid < 32) {
    const int q = ln.tid;
    if (a.want_blocks) {
#pragma unroll
      for (int s = 0; s < 5; ++s) {
        const int m = 1 << s;
        if (s < a.top_layers && (q & (2 * m - 1)) == 0 && q + m < a.nseg) {
          const A* ca = tacc + 4 * ((kMaxTopLanes - (kMaxTopLanes >> s)) + (q >> (s + 1)));
          A* out = dst + 4 * (a.top_off[s] + (q >> (s + 1)));
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = ca[k];
        }
      }
    }
    if (a.want_scale && q < a.nseg) dst[4 * P + (q << (a.logT + kLogChunk))] = tacc[4 * (kMaxTopLanes - 1) + q];
  }
  reduce_slot_rows(a, ln, red, width);
}

// in_thread_backward on N rows at once, each block read once for all rows: gv[r], tp[r] row r's; acc(r, k, ui, uj,
// gi, gj) receives row r's sums of in-thread pair k, rows in order for each pair.
template <bool kTape, bool kTable, int N, class A, class Acc>
__device__ __forceinline__ void in_thread_backward_rows(const ParallelArgs& a, const Lanes& ln, const A* blocks, int d,
                                                        A (&gv)[N][kChunk], const Tape<A> (&tp)[N], Acc&& acc,
                                                        const LaneLive* live) {
#pragma unroll
  for (int li = kLogChunk - 1; li >= 0; --li) {
    const int h = 1 << li;
#pragma unroll
    for (int e = 0; e < kChunk; e += 2 * h) {
      const int i = ln.base + e;
      if (live != nullptr ? live->in_thread(in_thread_pair_number(li, e)) : i + h < d) {
        A g0, g1, g2, g3;
        load_block_from<kTable>(blocks, in_thread_pair<kTable>(a, ln, li + 1, e), g0, g1, g2, g3);
#pragma unroll
        for (int r = 0; r < N; ++r) {
          if constexpr (kTape) {
            acc(r, in_thread_pair_number(li, e), tp[r].x[li][e], tp[r].x[li][e + h], gv[r][e], gv[r][e + h]);
          }
          rotate_values<true>(g0, g1, g2, g3, gv[r][e], gv[r][e + h]);
        }
      }
    }
  }
}

// Backward through the in-thread layers 3, 2, 1 of a thread's chunk (gv: the gradient of layer 3's
// output in, of layer 1's input out). With kTape, in-thread pair k (layer 1 -> 0..3, layer 2 -> 4..5,
// layer 3 -> 6; in_thread_pair_number) hands its inputs (from the tape) and output gradients to
// acc(k, ui, uj, gi, gj). d: the caller's row width, hoisted out of its row loop; live: the thread's
// LaneLive, or null (the pairs are checked against d).
template <bool kTape, bool kTable, class A, class Acc>
__device__ __forceinline__ void in_thread_backward(const ParallelArgs& a, const Lanes& ln, const A* blocks, int d,
                                                   A (&gv)[kChunk], const Tape<A>& tp, Acc&& acc,
                                                   const LaneLive* live = nullptr) {
  A gr[1][kChunk];  // one row of in_thread_backward_rows
  const Tape<A> tr[1] = {tp};
#pragma unroll
  for (int e = 0; e < kChunk; ++e) gr[0][e] = gv[e];
  in_thread_backward_rows<kTape, kTable>(a, ln, blocks, d, gr, tr,
                                         [&](int, int k, A ui, A uj, A gi, A gj) { acc(k, ui, uj, gi, gj); }, live);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) gv[e] = gr[0][e];
}

// Backward through layers log2(8 T) .. 1 of a row segment (cross-warp, shuffle, in-thread): the reverse of
// parallel_forward_local. gv: the gradient of the segment's output (in: after the scale and the top
// layers; out: grad of the segment's input); tp: the forward's tape (kTape). With acc_blocks, the rows of
// valid slots accumulate the cross-thread pairs' gradients into cacc ([R][T-1][4]) and in-thread pair k
// (as in put_block_sums) its entry c into acc[k kstride + c cstride] (the caller's register array: 4, 1).
// T, R, d and LS = min(log2 T, 5) come from the caller's values hoisted out of the row loop (recomputing them
// here from `a` moved the single layout's backward from 0 to 20-140 spill bytes at its 128-register cap).
// Must be reached by all threads of the block.
template <bool kTape, class A, bool kTable>
__device__ __forceinline__ void parallel_backward_local(const ParallelArgs& a, const Lanes& ln, const A* blocks,
                                                        int64_t group, bool valid, bool acc_blocks,
                                                        A (&gv)[kChunk], const Tape<A>& tp, A* xch, A* cacc,
                                                        A* acc, int kstride, int cstride, int T, int R, int d,
                                                        int LS) {
  if (a.logT > 5) {  // cross-warp layers, reversed
    const int nw = T >> 5;
    gv[0] = via_warp0(gv[0], ln.tid, ln.slot * nw + (ln.t >> 5), R * nw, xch, [&](int q, bool qv, A gq) {
      XLevel<A, kTable> lv = cross_warp_level<A, kTable>(a, ln.seg_base);
      const int qslot = q >> (a.logT - 5);
      if (acc_blocks && qv && group * R + qslot < a.rows) lv.acc = 4 * qslot * (T - 1);
      return level_backward<kTape>(lv, a.logT - 5, q & (nw - 1), qv, blocks, cacc, gq, tp.top);
    });
  }
  {  // shuffle layers, reversed
    XLevel<A, kTable> lv = shuffle_level<A, kTable>(a, ln.seg_base);
    if (acc_blocks && valid) lv.acc = 4 * ln.slot * (T - 1);
    gv[0] = level_backward<kTape>(lv, LS, ln.t, true, blocks, cacc, gv[0], tp.sh);
  }
  in_thread_backward<kTape, kTable>(a, ln, blocks, d, gv, tp, [&](int k, A ui, A uj, A gi, A gj) {
    if (acc_blocks && valid) accumulate_outer(acc + k * kstride, ui, uj, gi, gj, cstride);
  });
}

// Backward: grad_x = chain^T(scale * grad) and (kGrads) the parameter gradients of the rows this block
// owns (groups blockIdx.x, blockIdx.x + gridDim.x, ... of segment blockIdx.y) into partial row
// blockIdx.x. Accumulators: in-thread pairs in registers, cross-thread pairs in shared memory, each
// owned by one thread (no atomics); row slots of a block are summed in slot order at the end.
template <class S, bool kVec, bool kGrads, bool kTable>
__global__ void __launch_bounds__(512) parallel_backward_kernel(const ParallelArgs a) {
  using A = typename Elem<S>::A;
  QGOFT_DYNAMIC_SMEM(A, sm);
  const Lanes ln(a);
  const int T = a.T, R = a.R;
  const bool segmented = a.nseg > 1;
  const int d = static_cast<int>(a.d);
  const int P = static_cast<int>(a.num_pairs);
  const int width = 4 * P + d;
  const ParallelBackwardSmem layout(R, T, a.nseg, width, kGrads, kTable ? a.table : 0);
  A* xch = sm;
  A* cacc = sm + layout.cacc;  // [R][T-1][4]: cross-thread pairs of each slot
  A* tacc = sm + layout.tacc;  // [31][4] top pairs, then [32] segment-start scale
  const A* blocks = static_cast<const A*>(a.blocks);  // layers 1 .. log2 S (global or the table)
  if constexpr (kTable) {
    fill_table(a, static_cast<const A*>(a.blocks), ln.seg_base, sm + layout.tab);
    blocks = sm + layout.tab;
  }
  const S* x = static_cast<const S*>(a.x);
  const S* grad = static_cast<const S*>(a.grad);
  S* gx = static_cast<S*>(a.out);
  const bool acc_blocks = kGrads && a.want_blocks;
  const bool acc_scale = kGrads && a.want_scale;
  // The `base` adjoint loads warp 0's segment start gradients (segmented rows) beside the row's chunk instead of in
  // top_backward: there warp 0 issued that load only after waiting for the chunk, two memory latencies one after
  // the other on every block's way to the cross-warp barrier. (The table variant keeps them in top_backward: at its
  // 64-register cap its bf16 row spilled with them here, 4 bytes, span 425 -> 449 SASS instructions.)
  constexpr bool kAdjointStarts = !kGrads && !kTable;

  A acc_in[kChunk - 1][4];  // in-thread pairs: layer 1 -> 0..3, layer 2 -> 4..5, layer 3 -> 6
  A acc_s[kChunk];
#pragma unroll
  for (int k = 0; k < kChunk - 1; ++k) acc_in[k][0] = acc_in[k][1] = acc_in[k][2] = acc_in[k][3] = A(0);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) acc_s[e] = A(0);
  if constexpr (kGrads) {
    for (int k = ln.tid; k < static_cast<int>(layout.red - layout.cacc); k += blockDim.x) cacc[k] = A(0);
  }
  __syncthreads();

  const int LS = shuffle_layers(a);
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row = g * R + ln.slot;
    const bool valid = row < a.rows;
    A gv[kChunk];
    A start = A(0);
    Tape<A> tp;
    if constexpr (kGrads) {  // recompute the forward, recording the tape
      // The block's next row is asked for in L2 (x and grad) and grad is loaded after the forward: at the register
      // cap the compiler issues a load only shortly before its first use, so grad loaded here went out after the
      // wait for x (two memory latencies per row) and x's two 16-byte halves (float) one after the other; from L2
      // those waits are short.
      const int64_t next = row + static_cast<int64_t>(gridDim.x) * R;
      prefetch_chunk(x + next * a.x_ld, ln.base, d, next < a.rows);
      prefetch_chunk(grad + next * a.grad_ld, ln.base, d, next < a.rows);
      if (ln.tid < a.nseg && segmented) {  // and the segment starts' top words that top_backward reads (its lanes)
        prefetch_chunk(static_cast<const A*>(a.top) + next * a.nseg, ln.tid, a.nseg, next < a.rows);
      }
      A v[kChunk];
      load_chunk<S, kVec>(x + row * a.x_ld, ln.base, d, valid, v);
      parallel_forward_local<A, true, kTable>(a, ln, blocks, v, xch, tp);
      load_chunk<S, kVec>(grad + row * a.grad_ld, ln.base, d, valid, gv);
      if (acc_scale && valid) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          if (!(segmented && ln.t == 0 && e == 0)) acc_s[e] += gv[e] * v[e];
        }
      }
    } else {
      if constexpr (kAdjointStarts) {  // warp 0's segment start gradients beside the chunk (kAdjointStarts)
        if (ln.tid < a.nseg && segmented && valid) {
          start = Elem<S>::to(grad[row * a.grad_ld + (ln.tid << (a.logT + kLogChunk))]);
        }
      }
      load_chunk<S, kVec>(grad + row * a.grad_ld, ln.base, d, valid, gv);
    }
    scale_chunk(static_cast<const A*>(a.scale), ln.base, d, gv);

    if (segmented && ln.tid < 32) {
      const A mine = top_backward<S, kGrads, kAdjointStarts>(a, row, valid, ln.sigma, tacc, start);
      if (ln.tid == 0) gv[0] = mine;
    }
    parallel_backward_local<kGrads, A, kTable>(a, ln, blocks, g, valid, acc_blocks, gv, tp, xch, cacc, &acc_in[0][0], 4, 1,
                                               T, R, d, LS);
    if (gx != nullptr) store_chunk<S, kVec>(gx + row * d, ln.base, d, valid, gv);
  }

  if constexpr (kGrads) {
    __syncthreads();
    parallel_write_sums(a, ln, layout, sm, acc_in, acc_s);
  }
}

}  // namespace qgoft::cuda::detail
