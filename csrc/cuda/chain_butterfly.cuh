// The forward of layouts.butterfly(d), d = 2^n (layer r = 1 .. n pairs i with i XOR 2^(r-1), pairs of a layer in
// ascending i), and of stack(butterfly(d), k), on the register path (docs/CUDA.md, "The butterfly forward on the register path"; planned by
// plan_forward under QGOFT_CUDA_XOR=fused); the butterfly's backward at the end (butterfly_backward_kernel, "The
// butterfly backward on the register path"). Every row needs the whole block table (n d / 2 blocks: 384 KiB in float32
// at d = 4096), so a thread works on kR rows at once and every block it loads serves all of them:
//  * a sub-block of T = d / 8 threads holds kR rows (blocks of butterfly_threads(n) threads: Q = blockDim / T
//    sub-blocks, each with its own rows); a persistent grid walks the row groups of Q kR rows;
//  * the layers go in rounds of 3 index bits: in round m a thread holds, for each of its rows, the 8 elements whose
//    indices differ in the window bits w .. w + 2 (w = min(3m, n - 3)), its other bits being the thread's index t
//    (butterfly_element), so the round's layers (bits 3m .. min(3m + 2, n - 1)) are in-thread: 4 pairs per layer,
//    each pair's block loaded once for the kR rows;
//  * between rounds the sub-block's rows go through shared memory (the accumulation type; one buffer, a barrier
//    before the writes and one after), at bank-swizzled positions (butterfly_slot);
//  * round 0's window is bits 0-2, so rows are loaded as 8 consecutive elements per thread (16-byte words where
//    kVec); the last round's window is the top 3 bits, a thread's elements t + e d / 8: scalar stores (a warp
//    writes 32 consecutive elements), times the scale. Rows past the row count are zeros and never stored; the
//    next row group's rows are asked into L2 before the current one is computed.
// Same products (rotate_values) in the same order (layer by layer, the scale last) as the general forward.
#pragma once

#include "chain_device.cuh"

namespace qgoft::cuda::detail {

// The instantiation with n = kButterflyMaxLogD as a constant (d = 4096: every index, window and row offset known at
// compile time), or any d (kLogD = 0); one rule for the launcher and the host emulation.
QGOFT_HOST_DEVICE inline bool butterfly_fixed_width(const GeneralArgs& a) { return a.d == (1 << kButterflyMaxLogD); }

// Element index of a thread's value e (0 .. 7) for window w: t's bits below w, e at bits w .. w + 2, t's other bits
// above; as base(t, w) + e 2^w.
__device__ __forceinline__ int butterfly_window_base(int t, int w) {
  return (t & ((1 << w) - 1)) | ((t >> w) << (w + kLogChunk));
}

// Shared-memory position of element i of a row: i with bits 5, 6, 7 mixed into the bank bits 0-4 (XOR with
// 00001, 01010, 10100), a permutation of every 32 aligned elements; in every window of d >= 256 the 32 lanes of a warp
// (for a fixed value e and row) then reach 32 different banks.
__device__ __forceinline__ int butterfly_slot(int i) {
  const int h = i >> 5;
  return i ^ ((h & 1) ^ (((h >> 1) & 1) * 0x0a) ^ (((h >> 2) & 1) * 0x14));
}

// The layer on index bit b = w + kK of window (base, w): pairs (e, e + 2^kK) of the thread's values, pair index
// b d / 2 + (lower element without bit b), each block loaded once and applied to the kR rows. With base = lo +
// hi 2^(w+3) (lo < 2^w), the lower element base + e 2^w without bit b is lo + hi 2^(w+2) + e' 2^w, e' being e
// without bit kK: one index per layer, the pairs at constant offsets from it.
// butterfly_first_pair: that index (the pair of value e = 0); butterfly_pair: pair e's (bit kK of e clear).
__device__ __forceinline__ int butterfly_first_pair(int b, int base, int w, int d) {
  return b * (d >> 1) + (base & ((1 << w) - 1)) + ((base >> (w + kLogChunk)) << (w + kLogChunk - 1));
}
template <int kK>
__device__ __forceinline__ int butterfly_pair(int first, int e, int w) {
  return first + ((((e >> (kK + 1)) << kK) | (e & ((1 << kK) - 1))) << w);
}
template <int kK, int kR, class A>
__device__ __forceinline__ void butterfly_layer(const A* blocks, int b, int base, int w, int d, A (&v)[kR][kChunk]) {
  const int first = butterfly_first_pair(b, base, w, d);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    if (e & (1 << kK)) continue;
    const int p = butterfly_pair<kK>(first, e, w);
    A g0, g1, g2, g3;
    load_block(blocks, p, g0, g1, g2, g3);
#pragma unroll
    for (int r = 0; r < kR; ++r) rotate_values(g0, g1, g2, g3, v[r][e], v[r][e | (1 << kK)]);
  }
}

// f(e, slot) for each of a thread's values e in window w: slot, the shared-memory position of its element.
template <class F>
__device__ __forceinline__ void butterfly_slots(int t, int w, F&& f) {
  const int base = butterfly_window_base(t, w);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) f(e, butterfly_slot(base + (e << w)));
}

// The sub-block's rows (buf: [kR][d]) from window `from` to window `to`: a barrier (the last reads of buf are done),
// every thread writes its values, a barrier, every thread reads its values of the new window.
template <int kR, class A>
__device__ __forceinline__ void butterfly_exchange(A* buf, int d, int t, int from, int to, A (&v)[kR][kChunk]) {
  __syncthreads();
  butterfly_slots(t, from, [&](int e, int s) {
#pragma unroll
    for (int r = 0; r < kR; ++r) buf[r * d + s] = v[r][e];
  });
  __syncthreads();
  butterfly_slots(t, to, [&](int e, int s) {
#pragma unroll
    for (int r = 0; r < kR; ++r) v[r][e] = buf[r * d + s];
  });
}

// v[r][e] *= scale[t + e 2^top]: the scale on a thread's values of the last round's window (top), read per group as
// needed (opaque: not held across the row-group loop).
template <int kR, class A>
__device__ __forceinline__ void butterfly_scale_top(const A* scale, int t, int top, A (&v)[kR][kChunk]) {
  const A* sc = opaque(scale);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    const A s = __ldg(sc + t + (e << top));
#pragma unroll
    for (int r = 0; r < kR; ++r) v[r][e] *= s;
  }
}

// A thread's place in the butterfly kernels: n = log2 d (kLogD, or from a.d), W = n - 3 bits of its index lane_t in
// its sub-block of d / 8 threads, its sub-block sub of the block's Q, the rounds and the last round's window top.
template <int kLogD>
struct ButterflyThread {
  int n, d, W, lane_t, sub, Q, rounds, top;
  __device__ __forceinline__ explicit ButterflyThread(const GeneralArgs& a)
      : n(kLogD > 0 ? kLogD : ceil_log2(a.d)),
        d(1 << n),
        W(n - kLogChunk),
        lane_t(static_cast<int>(threadIdx.x) & ((1 << W) - 1)),
        sub(static_cast<int>(threadIdx.x) >> W),
        Q(static_cast<int>(blockDim.x) >> W),
        rounds(butterfly_rounds(n)),
        top(n - kLogChunk) {}
};

// kLogD: log2 d as a constant (butterfly_fixed_width), or 0 for any d = 2^n, kButterflyMinLogD <= n <=
// kButterflyMaxLogD. a: rows, d, x (x_ld), out (contiguous), blocks, scale, groups = ceil(rows / (Q R)), R = kR;
// num_pairs = k n d / 2 for stack(butterfly(d), k), whose repetitions run one after the other on the same rows.
template <class S, bool kVec, int kLogD>
__global__ void __launch_bounds__(kButterflyMaxThreads, 1) butterfly_forward_kernel(const GeneralArgs a) {
  using A = typename Elem<S>::A;
  constexpr int kR = butterfly_rows(sizeof(A));
  constexpr int kMaxRounds = butterfly_rounds(kButterflyMaxLogD);
  QGOFT_DYNAMIC_SMEM(A, smem);
  const ButterflyThread<kLogD> bt(a);
  const int n = bt.n, d = bt.d, W = bt.W, lane_t = bt.lane_t, sub = bt.sub, Q = bt.Q, rounds = bt.rounds;
  A* buf = smem + static_cast<int64_t>(sub) * kR * d;
  const S* x = static_cast<const S*>(a.x);
  S* out = static_cast<S*>(a.out);
  const A* table = static_cast<const A*>(a.blocks);
  const A* scale = static_cast<const A*>(a.scale);
  const int top = bt.top;  // the last round's window: element t + e 2^top
  const int pairs_per_rep = n << (n - 1);  // one butterfly's n d / 2 pairs
  const int reps = static_cast<int>(a.num_pairs / pairs_per_rep);
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row0 = (g * Q + sub) * kR;
    // the thread's index, opaque (and masked again: its range stays known): what the loop derives from it (element
    // positions, pair indices, shared-memory slots) is computed where it is used (hoisted out of the loop, it spilled)
    auto thread_index = [&]() { return static_cast<int>(opaque(static_cast<unsigned>(lane_t))) & ((1 << W) - 1); };
    const int t = thread_index();
    A v[kR][kChunk];
#pragma unroll
    for (int r = 0; r < kR; ++r) load_chunk<S, kVec>(x + (row0 + r) * a.x_ld, t * kChunk, d, row0 + r < a.rows, v[r]);
    const int64_t next0 = ((g + gridDim.x) * Q + sub) * kR;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      prefetch_chunk(x + (next0 + r) * a.x_ld, t * kChunk, d, g + gridDim.x < a.groups && next0 + r < a.rows);
    }
    // repetition j of stack(butterfly(d), reps) reads blocks j n d / 2 ..; from the second on, the rows go back from
    // the last round's window to window 0 first
    for (int j = 0; j < reps; ++j) {
      // the blocks' addresses are the same for every group and repetition: opaque, so that their loads stay in the
      // rounds that use them instead of being hoisted out of the loops (48 blocks per thread at d = 4096 do not fit
      // its registers); the thread's index likewise
      const A* rep_blocks = opaque(table) + static_cast<int64_t>(j) * 4 * pairs_per_rep;
      const int tj = thread_index();
      int w = 0;
      if (j > 0 && top > 0) butterfly_exchange<kR>(buf, d, tj, top, 0, v);
#pragma unroll
      for (int m = 0; m < kMaxRounds; ++m) {
        if (m < rounds) {
          const int to = 3 * m < top ? 3 * m : top;
          if (m > 0) butterfly_exchange<kR>(buf, d, tj, w, to, v);
          w = to;
          // bits 3m .. w + 2 (w + 2 <= n - 1; w < 3m only in a last round whose window overlaps the previous one)
          const int base = butterfly_window_base(tj, w);
          if (w == 3 * m) butterfly_layer<0, kR>(rep_blocks, w, base, w, d, v);
          if (w + 1 >= 3 * m) butterfly_layer<1, kR>(rep_blocks, w + 1, base, w, d, v);
          butterfly_layer<2, kR>(rep_blocks, w + 2, base, w, d, v);
        }
      }
    }
    // the stores' thread index and rows, derived anew (held across the rounds, they were spilled)
    const int ts = thread_index();
    const int64_t rows0 = (g * Q + (static_cast<int>(opaque(threadIdx.x)) >> W)) * kR;
    if (scale != nullptr) butterfly_scale_top<kR>(scale, ts, top, v);
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (rows0 + r >= a.rows) continue;
      S* y = out + (rows0 + r) * d;
#pragma unroll
      for (int e = 0; e < kChunk; ++e) y[ts + (e << top)] = Elem<S>::from(v[r][e]);
    }
  }
}

// at[0 .. 3] += s (first: = s), at 16-byte aligned in global memory (a partial row written by its owner thread only:
// plain loads, not the read-only path).
template <class A>
__device__ __forceinline__ void add_sums(A* at, const A (&s)[4], bool first) {
  QGOFT_CHECK_ALIGN16(at);
  if constexpr (std::is_same_v<A, float>) {
    float4* q = reinterpret_cast<float4*>(at);
    float4 c = first ? make_float4(0.f, 0.f, 0.f, 0.f) : *q;
    c.x += s[0];
    c.y += s[1];
    c.z += s[2];
    c.w += s[3];
    *q = c;
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) at[c] = first ? s[c] : at[c] + s[c];
  }
}

// The backward of the layer on index bit b = w + kK of window (base, w) (see butterfly_layer): for each of the thread's
// 4 pairs, with kGrads the pair's sums u (x) g over the kR rows (row order; u: the layer's input, g: the gradient of
// its output) added to its 4 entries of the partial row `sums` (angle_sums: combined into the angle's sum, added to
// its one entry; set in the block's first group: `first`), then g <- G g; the general backward's products in its
// order.
template <int kK, int kR, bool kGrads, class A>
__device__ __forceinline__ void butterfly_layer_backward(const A* blocks, int b, int base, int w, int d,
                                                         const A (&u)[kR][kChunk], A (&g)[kR][kChunk], A* sums,
                                                         bool first, bool angle_sums) {
  const int first_pair = butterfly_first_pair(b, base, w, d);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    if (e & (1 << kK)) continue;
    constexpr int kBit = 1 << kK;
    const int p = butterfly_pair<kK>(first_pair, e, w);
    A g0, g1, g2, g3;
    load_block(blocks, p, g0, g1, g2, g3);
    if (kGrads && sums != nullptr) {
      A s[4] = {A(0), A(0), A(0), A(0)};
#pragma unroll
      for (int r = 0; r < kR; ++r) accumulate_outer(s, u[r][e], u[r][e | kBit], g[r][e], g[r][e | kBit]);
      if (angle_sums) {  // the block is (c, -s, s, c): d theta as reduce_partials_kernel combines the sums
        const A t = -g2 * s[0] - g0 * s[1] + g0 * s[2] - g2 * s[3];
        sums[p] = first ? t : sums[p] + t;
      } else {
        add_sums(sums + 4 * static_cast<int64_t>(p), s, first);
      }
    }
#pragma unroll
    for (int r = 0; r < kR; ++r) rotate_values<true>(g0, g1, g2, g3, g[r][e], g[r][e | kBit]);
  }
}

// The thread's values of window w from / into a sub-block's buffer ([kR][d], butterfly_slot positions).
template <int kR, class A>
__device__ __forceinline__ void butterfly_put(A* buf, int d, int t, int w, const A (&v)[kR][kChunk]) {
  butterfly_slots(t, w, [&](int e, int s) {
#pragma unroll
    for (int r = 0; r < kR; ++r) buf[r * d + s] = v[r][e];
  });
}
template <int kR, class A>
__device__ __forceinline__ void butterfly_get(const A* buf, int d, int t, int w, A (&v)[kR][kChunk]) {
  butterfly_slots(t, w, [&](int e, int s) {
#pragma unroll
    for (int r = 0; r < kR; ++r) v[r][e] = buf[r * d + s];
  });
}

// The backward of layouts.butterfly(d), d = 2^n (docs/CUDA.md, "The butterfly backward on the register path"): the
// forward's sub-blocks of T = d / 8 threads and rounds of 3 index bits, kR = butterfly_backward_rows rows per thread, a
// persistent grid over row groups of Q kR rows. Per group: (kGrads) x's rows and the forward recomputed, the exchange
// before round m writing round m's input into buffer m (m >= 1); grad read in the last round's window, the scale's
// sums, g *= scale; rounds M-1 .. 0 backward, each layer's input recomputed in registers from the round's input
// (buffer m, the thread's own slots; round 0: x read again) by the round's earlier layers, the pairs' sums added to
// the sub-block's own partial row (slot blockIdx.x Q + sub: every pair and scale entry has one owner thread), g
// back-propagated; g to the previous round's window through buffer m; dx stored from window 0. kLogD: log2 d as a
// constant, or 0 (the only instantiation: with n a constant, sm_90, it spilled 1.5 KB at 128 registers). a: rows, d,
// x (x_ld), grad (grad_ld), out (contiguous, may be null), blocks, scale, groups, partial (partial_ld; kGrads),
// want_blocks, want_scale, angle_sums.
template <class S, bool kVec, bool kGrads, int kLogD>
__global__ void __launch_bounds__(kButterflyMaxThreads, 1) butterfly_backward_kernel(const GeneralArgs a) {
  using A = typename Elem<S>::A;
  constexpr int kR = butterfly_backward_rows(sizeof(A));
  constexpr int kMaxRounds = butterfly_rounds(kButterflyMaxLogD);
  QGOFT_DYNAMIC_SMEM(A, smem);
  const ButterflyThread<kLogD> bt(a);
  const int d = bt.d, W = bt.W, lane_t = bt.lane_t, sub = bt.sub, Q = bt.Q, rounds = bt.rounds;
  const int top = bt.top;  // the last round's window: element t + e 2^top
  // buffer m (1 .. rounds - 1) of the sub-block: round m's input, then the gradient on its way to round m - 1
  A* const bufs = smem + static_cast<int64_t>(sub) * kR * d;
  const int64_t buf_stride = static_cast<int64_t>(Q) * kR * d;
  const S* x = static_cast<const S*>(a.x);
  const S* grad = static_cast<const S*>(a.grad);
  S* out = static_cast<S*>(a.out);
  const A* table = static_cast<const A*>(a.blocks);
  const A* scale = static_cast<const A*>(a.scale);
  A* const row_sums = kGrads ? static_cast<A*>(a.partial) + (static_cast<int64_t>(blockIdx.x) * Q + sub) * a.partial_ld
                             : nullptr;
  A* const pair_sums = kGrads && a.want_blocks ? row_sums : nullptr;
  const bool angle_sums = a.angle_sums != 0;  // one angle sum per pair (ButterflySums)
  A* const scale_sums = kGrads && a.want_scale && scale != nullptr
                            ? row_sums + ButterflySums(a.num_pairs, a.d, angle_sums).scale
                            : nullptr;
  auto thread_index = [&]() { return static_cast<int>(opaque(static_cast<unsigned>(lane_t))) & ((1 << W) - 1); };
  auto window = [&](int m) { return 3 * m < top ? 3 * m : top; };
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const bool first = g == blockIdx.x;
    const int64_t row0 = (g * Q + sub) * kR;
    // the previous group's last reads of buffer 1 (the gradient into window 0) before this group's writes
    if (rounds > 1) __syncthreads();
    const int64_t next0 = ((g + gridDim.x) * Q + sub) * kR;
    {
      const int t = thread_index();
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        const bool valid = g + gridDim.x < a.groups && next0 + r < a.rows;
        prefetch_chunk(grad + (next0 + r) * a.grad_ld, t * kChunk, d, valid);
        if (kGrads) prefetch_chunk(x + (next0 + r) * a.x_ld, t * kChunk, d, valid);
      }
    }
    A u[kR][kChunk];
    if constexpr (kGrads) {
      const int t = thread_index();
#pragma unroll
      for (int r = 0; r < kR; ++r) load_chunk<S, kVec>(x + (row0 + r) * a.x_ld, t * kChunk, d, row0 + r < a.rows, u[r]);
      int w = 0;
#pragma unroll
      for (int m = 0; m < kMaxRounds; ++m) {
        if (m < rounds) {
          const A* blocks = opaque(table);
          const int tm = thread_index();
          const int to = window(m);
          if (m > 0) {
            A* buf = bufs + (m - 1) * buf_stride;
            butterfly_put<kR>(buf, d, tm, w, u);
            __syncthreads();
            butterfly_get<kR>(buf, d, tm, to, u);
          }
          w = to;
          const int base = butterfly_window_base(tm, w);
          if (w == 3 * m) butterfly_layer<0, kR>(blocks, w, base, w, d, u);
          if (w + 1 >= 3 * m) butterfly_layer<1, kR>(blocks, w + 1, base, w, d, u);
          butterfly_layer<2, kR>(blocks, w + 2, base, w, d, u);
        }
      }
    }
    // the gradient of the output, in the last round's window; the scale's sums (u: the output before the scale)
    A gr[kR][kChunk];
    {
      const int t = thread_index();
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        const bool valid = row0 + r < a.rows;
        const S* gr_row = grad + (row0 + r) * a.grad_ld;
#pragma unroll
        for (int e = 0; e < kChunk; ++e) gr[r][e] = valid ? Elem<S>::to(gr_row[t + (e << top)]) : A(0);
      }
      if (kGrads && scale_sums != nullptr) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          A s = A(0);
#pragma unroll
          for (int r = 0; r < kR; ++r) s += gr[r][e] * u[r][e];
          A* at = scale_sums + t + (e << top);
          *at = first ? s : *at + s;
        }
      }
      if (scale != nullptr) butterfly_scale_top<kR>(scale, t, top, gr);
    }
#pragma unroll
    for (int mm = kMaxRounds - 1; mm >= 0; --mm) {
      if (mm < rounds) {
        const int m = mm;
        const int w = window(m);
        const int lo = 3 * m - w;  // the round's first layer (kK): 0, or more where its window overlaps the previous
        // one pass per layer of the round, from its last: (kGrads) u <- the input of the layer, then the layer's
        // backward. The thread index and the table are taken anew per pass: what derives from them (slots, pair
        // indices, blocks) is not held across passes (held, it was spilled). The round's input is buffer m (the
        // thread's own slots), round 0's x. Own slots that are dead by now keep values for the later passes
        // (stashes; each thread writes and reads only its own slots of a window, so no barrier): the input of layer 1
        // (after layer 0), which pass 1 then reads instead of recomputing layer 0, in buffer m + 1's slots of window w
        // (their gradient was read before this round; round 0: buffer 2, dead since the last barrier); round 0's x,
        // read from global memory once, in buffer 1's slots of window 0 (their gradient was read before round 0).
        A* const stash_u1 = m > 0 ? (m + 1 < rounds ? bufs + m * buf_stride : nullptr)
                                  : (rounds > 2 ? bufs + buf_stride : nullptr);
        A* const stash_x = m == 0 && rounds > 1 ? bufs : nullptr;
        {
          const int tp = thread_index();
          const A* blocks = opaque(table);
          const int base = butterfly_window_base(tp, w);
          if constexpr (kGrads) {
            if (m > 0) {
              butterfly_get<kR>(bufs + (m - 1) * buf_stride, d, tp, w, u);
            } else {
#pragma unroll
              for (int r = 0; r < kR; ++r) {
                load_chunk<S, kVec>(x + (row0 + r) * a.x_ld, tp * kChunk, d, row0 + r < a.rows, u[r]);
              }
              if (stash_x != nullptr) butterfly_put<kR>(stash_x, d, tp, 0, u);
            }
            if (lo == 0) {
              butterfly_layer<0, kR>(blocks, w, base, w, d, u);
              if (stash_u1 != nullptr) butterfly_put<kR>(stash_u1, d, tp, w, u);
            }
            if (lo <= 1) butterfly_layer<1, kR>(blocks, w + 1, base, w, d, u);
          }
          butterfly_layer_backward<2, kR, kGrads>(blocks, w + 2, base, w, d, u, gr, pair_sums, first, angle_sums);
        }
        // u <- the round's input (buffer m, stashed x, or x from global memory)
        auto round_input = [&](int tp) {
          if (m > 0) {
            butterfly_get<kR>(bufs + (m - 1) * buf_stride, d, tp, w, u);
          } else if (stash_x != nullptr) {
            butterfly_get<kR>(stash_x, d, tp, 0, u);
          } else {
#pragma unroll
            for (int r = 0; r < kR; ++r) {
              load_chunk<S, kVec>(x + (row0 + r) * a.x_ld, tp * kChunk, d, row0 + r < a.rows, u[r]);
            }
          }
        };
        if (lo <= 1) {
          const int tp = thread_index();
          const A* blocks = opaque(table);
          const int base = butterfly_window_base(tp, w);
          if constexpr (kGrads) {
            if (lo == 0 && stash_u1 != nullptr) {
              butterfly_get<kR>(stash_u1, d, tp, w, u);
            } else {
              round_input(tp);
              if (lo == 0) butterfly_layer<0, kR>(blocks, w, base, w, d, u);
            }
          }
          butterfly_layer_backward<1, kR, kGrads>(blocks, w + 1, base, w, d, u, gr, pair_sums, first, angle_sums);
        }
        if (lo == 0) {
          const int tp = thread_index();
          const A* blocks = opaque(table);
          const int base = butterfly_window_base(tp, w);
          if constexpr (kGrads) round_input(tp);
          butterfly_layer_backward<0, kR, kGrads>(blocks, w, base, w, d, u, gr, pair_sums, first, angle_sums);
        }
        if (m > 0) {  // the gradient into the previous round's window: own slots of window w (read just before)
          const int tp = thread_index();
          A* const buf = bufs + (m - 1) * buf_stride;
          butterfly_put<kR>(buf, d, tp, w, gr);
          __syncthreads();
          butterfly_get<kR>(buf, d, tp, window(m - 1), gr);
        }
      }
    }
    if (out != nullptr) {
      const int ts = thread_index();
      const int64_t rows0 = (g * Q + (static_cast<int>(opaque(threadIdx.x)) >> W)) * kR;
#pragma unroll
      for (int r = 0; r < kR; ++r) store_chunk<S, kVec>(out + (rows0 + r) * d, ts * kChunk, d, rows0 + r < a.rows, gr[r]);
    }
  }
}

}  // namespace qgoft::cuda::detail
