// Device code of the CUDA Givens-chain kernels, included by one translation unit per activation dtype
// (chain_<dtype>.cu), which instantiates the launchers with QGOFT_DEFINE_CHAIN_LAUNCHERS. Torch-free:
// raw pointers and the argument structs of chain_cuda.h. Design notes: docs/CUDA.md.
//
// Arithmetic: float32 for float32/bfloat16/float16 activations (explicit conversion intrinsics, never
// implicit half conversions), float64 for float64. nvcc contracts a*b + c*d into an FMA; results agree
// with the CPU kernels (compiled without contraction) to rounding, not bitwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "chain_cuda.h"
#include "chain_sizes.h"

// Dynamic shared memory, and a check of the 16-byte vector accesses' alignment (host emulation only).
#ifdef QGOFT_CUDA_HOST_SIM
#define QGOFT_DYNAMIC_SMEM(name) unsigned char* name = ::qgoft_sim::dynamic_smem()
#define QGOFT_CHECK_ALIGN16(p) ::qgoft_sim::check_align16(p)
#else
#define QGOFT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define QGOFT_CHECK_ALIGN16(p) ((void)0)
#endif

namespace qgoft::cuda::detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Activation element types: conversion to/from the accumulation type A and 8-element vector I/O
// (16-byte accesses; only used when the row pointers are 16-byte aligned and d % 8 == 0).
// ---------------------------------------------------------------------------------------------
template <class S>
struct Elem;

template <>
struct Elem<float> {
  using A = float;
  static __device__ __forceinline__ A to(float v) { return v; }
  static __device__ __forceinline__ float from(A v) { return v; }
  static __device__ __forceinline__ void load8(const float* p, A (&v)[kChunk]) {
    QGOFT_CHECK_ALIGN16(p);
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  static __device__ __forceinline__ void store8(float* p, const A (&v)[kChunk]) {
    QGOFT_CHECK_ALIGN16(p);
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <>
struct Elem<double> {
  using A = double;
  static __device__ __forceinline__ A to(double v) { return v; }
  static __device__ __forceinline__ double from(A v) { return v; }
  static __device__ __forceinline__ void load8(const double* p, A (&v)[kChunk]) {
    QGOFT_CHECK_ALIGN16(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const double2 a = __ldg(reinterpret_cast<const double2*>(p) + k);
      v[2 * k] = a.x;
      v[2 * k + 1] = a.y;
    }
  }
  static __device__ __forceinline__ void store8(double* p, const A (&v)[kChunk]) {
    QGOFT_CHECK_ALIGN16(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) reinterpret_cast<double2*>(p)[k] = make_double2(v[2 * k], v[2 * k + 1]);
  }
};

// 16-bit types: 8 elements = one uint4; element 2k is the low half of word k (little endian).
template <class H, float (*ToF)(H), H (*FromF)(float), H (*FromBits)(unsigned short),
          unsigned short (*ToBits)(H)>
struct Elem16 {
  using A = float;
  static __device__ __forceinline__ A to(H v) { return ToF(v); }
  static __device__ __forceinline__ H from(A v) { return FromF(v); }
  static __device__ __forceinline__ float lo(unsigned w) {
    return ToF(FromBits(static_cast<unsigned short>(w & 0xffffu)));
  }
  static __device__ __forceinline__ float hi(unsigned w) {
    return ToF(FromBits(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ unsigned pack(float a, float b) {
    return static_cast<unsigned>(ToBits(FromF(a))) | (static_cast<unsigned>(ToBits(FromF(b))) << 16);
  }
  static __device__ __forceinline__ void load8(const H* p, A (&v)[kChunk]) {
    QGOFT_CHECK_ALIGN16(p);
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    v[0] = lo(u.x); v[1] = hi(u.x); v[2] = lo(u.y); v[3] = hi(u.y);
    v[4] = lo(u.z); v[5] = hi(u.z); v[6] = lo(u.w); v[7] = hi(u.w);
  }
  static __device__ __forceinline__ void store8(H* p, const A (&v)[kChunk]) {
    QGOFT_CHECK_ALIGN16(p);
    *reinterpret_cast<uint4*>(p) =
        make_uint4(pack(v[0], v[1]), pack(v[2], v[3]), pack(v[4], v[5]), pack(v[6], v[7]));
  }
};

__device__ __forceinline__ float bf16_to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ __nv_bfloat16 f_to_bf16(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ __nv_bfloat16 bits_to_bf16(unsigned short b) { return __ushort_as_bfloat16(b); }
__device__ __forceinline__ unsigned short bf16_to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ float h_to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ __half f_to_h(float v) { return __float2half_rn(v); }
__device__ __forceinline__ __half bits_to_h(unsigned short b) { return __ushort_as_half(b); }
__device__ __forceinline__ unsigned short h_to_bits(__half v) { return __half_as_ushort(v); }

template <>
struct Elem<__nv_bfloat16>
    : Elem16<__nv_bfloat16, bf16_to_f, f_to_bf16, bits_to_bf16, bf16_to_bits> {};
template <>
struct Elem<__half> : Elem16<__half, h_to_f, f_to_h, bits_to_h, h_to_bits> {};

// Block p (g00, g01, g10, g11) of the (P, 4) accumulation-type table.
__device__ __forceinline__ void load_block(const float* b, int64_t p, float& g0, float& g1,
                                           float& g2, float& g3) {
  QGOFT_CHECK_ALIGN16(b + 4 * p);
  const float4 v = __ldg(reinterpret_cast<const float4*>(b) + p);
  g0 = v.x; g1 = v.y; g2 = v.z; g3 = v.w;
}
__device__ __forceinline__ void load_block(const double* b, int64_t p, double& g0, double& g1,
                                           double& g2, double& g3) {
  QGOFT_CHECK_ALIGN16(b + 4 * p);
  const double2 u = __ldg(reinterpret_cast<const double2*>(b) + 2 * p);
  const double2 v = __ldg(reinterpret_cast<const double2*>(b) + 2 * p + 1);
  g0 = u.x; g1 = u.y; g2 = v.x; g3 = v.y;
}

template <class S, bool kVec>
__device__ __forceinline__ void load_chunk(const S* row, int base, int d, bool valid,
                                           typename Elem<S>::A (&v)[kChunk]) {
  using A = typename Elem<S>::A;
  if constexpr (kVec) {  // d % 8 == 0: a chunk lies entirely inside or outside the row
    if (valid && base < d) {
      Elem<S>::load8(row + base, v);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) v[e] = A(0);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) v[e] = (valid && base + e < d) ? Elem<S>::to(row[base + e]) : A(0);
  }
}

template <class S, bool kVec>
__device__ __forceinline__ void store_chunk(S* row, int base, int d, bool valid,
                                            const typename Elem<S>::A (&v)[kChunk]) {
  if (!valid) return;
  if constexpr (kVec) {
    if (base < d) Elem<S>::store8(row + base, v);
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      if (base + e < d) row[base + e] = Elem<S>::from(v[e]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Parallel layout (DESIGN.md Sec. 3): layer r (1-based) pairs (2^r k, 2^r k + 2^(r-1)), present when
// the second index is < d; pair index off[r] + k.
//
// Thread t of a row segment holds the elements base .. base + 7 (base = seg_base + 8 t):
//   layers 1-3           inside the thread,
//   layers 4 .. 3+LS     one word exchanged with a warp shuffle at lane distance 2^(r-4),
//                        LS = min(log2 T, 5),
//   layers 9 .. 3+log2 T (T > 32) the chunk starts of lane 0 of each warp go through shared memory,
//                        and warp 0 finishes them with shuffles,
//   top layers           (segmented rows) pairs of segment starts: a separate kernel (forward) or warp 0
//                        of every block (backward).
// The element that moves in layers >= 4 is always a thread's first element v[0].
// ---------------------------------------------------------------------------------------------
template <class A>
struct Tape {
  A x[kLogChunk][kChunk];  // the chunk before in-thread layer 1, 2, 3
  A sh[5];                 // own v[0] before shuffle layer s
  A top[5];                // (warp 0) own exchanged value before cross-warp layer s
};

// Applies layers 1 .. log2(8 T) to a row segment (forward direction), optionally recording the tape.
// Must be reached by all threads of the block (shuffles with the full mask, __syncthreads).
template <class A, bool kTape>
__device__ __forceinline__ void parallel_forward_local(const ParallelArgs& a, A (&v)[kChunk],
                                                       int seg_base, int base, int t,
                                                       int slot, int tid, A* xch, Tape<A>& tp) {
  const A* blocks = static_cast<const A*>(a.blocks);
  const int d = static_cast<int>(a.d);
#pragma unroll
  for (int li = 0; li < kLogChunk; ++li) {
    if constexpr (kTape) {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) tp.x[li][e] = v[e];
    }
    const int h = 1 << li;
#pragma unroll
    for (int e = 0; e < kChunk; e += 2 * h) {
      const int i = base + e;
      if (i + h < d) {
        A g0, g1, g2, g3;
        load_block(blocks, a.off[li + 1] + (i >> (li + 1)), g0, g1, g2, g3);
        const A xi = v[e], xj = v[e + h];
        v[e] = g0 * xi + g2 * xj;
        v[e + h] = g1 * xi + g3 * xj;
      }
    }
  }
  const int LS = a.logT < 5 ? a.logT : 5;
#pragma unroll
  for (int s = 0; s < 5; ++s) {
    if (s < LS) {
      const int m = 1 << s;
      const A w = __shfl_xor_sync(kFullMask, v[0], m);
      if constexpr (kTape) tp.sh[s] = v[0];
      if ((t & (m - 1)) == 0) {
        const bool upper = (t & m) != 0;
        const int h = m << kLogChunk;
        const int i = upper ? base - h : base;
        if (i + h < d) {
          A g0, g1, g2, g3;
          load_block(blocks, a.off[s + 4] + (i >> (s + 4)), g0, g1, g2, g3);
          v[0] = upper ? g1 * w + g3 * v[0] : g0 * v[0] + g2 * w;
        }
      }
    }
  }
  if (a.logT > 5) {
    const int LW = a.logT - 5, nw = a.T >> 5;
    const int lane = tid & 31, wr = t >> 5;
    if (lane == 0) xch[slot * nw + wr] = v[0];
    __syncthreads();
    if (tid < 32) {
      const int q = tid;
      const bool qv = q < a.R * nw;
      const int qw = q & (nw - 1);
      A u = qv ? xch[q] : A(0);
      const int qbase = seg_base + (qw << (5 + kLogChunk));
#pragma unroll
      for (int s = 0; s < 5; ++s) {
        if (s < LW) {
          const int m = 1 << s;
          const A w = __shfl_xor_sync(kFullMask, u, m);
          if constexpr (kTape) tp.top[s] = u;
          if (qv && (qw & (m - 1)) == 0) {
            const bool upper = (qw & m) != 0;
            const int h = m << (5 + kLogChunk);
            const int i = upper ? qbase - h : qbase;
            if (i + h < d) {
              A g0, g1, g2, g3;
              load_block(blocks, a.off[s + 9] + (i >> (s + 9)), g0, g1, g2, g3);
              u = upper ? g1 * w + g3 * u : g0 * u + g2 * w;
            }
          }
        }
      }
      if (qv) xch[q] = u;
    }
    __syncthreads();
    if (lane == 0) v[0] = xch[slot * nw + wr];
  }
}

// Forward: y = scale * chain(x) on row segments (blockIdx.y = segment). Segmented rows also write
// the local result of every segment start to `top` (parallel_top_forward_kernel finishes them).
template <class S, bool kVec>
__global__ void __launch_bounds__(1024) parallel_forward_kernel(const ParallelArgs a) {
  using A = typename Elem<S>::A;
  QGOFT_DYNAMIC_SMEM(smem_raw);
  A* xch = reinterpret_cast<A*>(smem_raw);
  const int tid = threadIdx.x;
  const int slot = tid >> a.logT, t = tid & (a.T - 1);
  const int sigma = blockIdx.y;
  const int seg_base = sigma << (a.logT + kLogChunk);
  const int base = seg_base + (t << kLogChunk);
  const int d = static_cast<int>(a.d);
  const S* x = static_cast<const S*>(a.x);
  S* y = static_cast<S*>(a.out);
  const A* scale = static_cast<const A*>(a.scale);
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row = g * a.R + slot;
    const bool valid = row < a.rows;
    A v[kChunk];
    load_chunk<S, kVec>(x + row * a.x_ld, base, d, valid, v);
    Tape<A> tp;
    parallel_forward_local<A, false>(a, v, seg_base, base, t, slot, tid, xch, tp);
    if (a.nseg > 1 && t == 0 && valid) static_cast<A*>(a.top)[row * a.nseg + sigma] = v[0];
    if (a.store) {
      if (scale != nullptr) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          if (base + e < d) v[e] *= __ldg(scale + base + e);
        }
      }
      store_chunk<S, kVec>(y + row * d, base, d, valid, v);
    }
  }
}

// The top layers of a segmented row (strides 1, 2, .., 16 between segment starts; one warp per row,
// lane q holds segment q's start value u, qv: q < nseg). All 32 lanes must call it. With kTape,
// tape[s] receives u as it was before top layer s (for the backward's recompute).
template <bool kTape, class A>
__device__ __forceinline__ A top_layers_forward(A u, int q, bool qv, const ParallelArgs& a,
                                                const A* blocks, A* tape) {
#pragma unroll
  for (int s = 0; s < 5; ++s) {
    if constexpr (kTape) tape[s] = u;
    if (s < a.top_layers) {
      const int m = 1 << s;
      const A w = __shfl_xor_sync(kFullMask, u, m);
      if (qv && (q & (m - 1)) == 0) {
        const bool upper = (q & m) != 0;
        const int iq = upper ? q - m : q;
        if (iq + m < a.nseg) {
          A g0, g1, g2, g3;
          load_block(blocks, a.top_off[s] + (iq >> (s + 1)), g0, g1, g2, g3);
          u = upper ? g1 * w + g3 * u : g0 * u + g2 * w;
        }
      }
    }
  }
  return u;
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
  const int logS = a.logT + kLogChunk;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kTopRowsPerBlock + (threadIdx.x >> 5);
       row < a.rows; row += static_cast<int64_t>(gridDim.x) * kTopRowsPerBlock) {
    const bool qv = q < a.nseg;
    A u = top_layers_forward<false>(qv ? top[row * a.nseg + q] : A(0), q, qv, a, blocks,
                                    static_cast<A*>(nullptr));
    if (qv) {
      const int c = q << logS;
      if (scale != nullptr) u *= __ldg(scale + c);
      y[row * a.d + c] = Elem<S>::from(u);
    }
  }
}

// Backward: grad_x = chain^T(scale * grad) and (kGrads) the parameter gradients of the rows this block
// owns (groups blockIdx.x, blockIdx.x + gridDim.x, ... of segment blockIdx.y) into partial row
// blockIdx.x. Accumulators: in-thread pairs in registers, cross-thread pairs in shared memory, each
// owned by one thread (no atomics); row slots of a block are summed in slot order at the end.
template <class S, bool kVec, bool kGrads>
__global__ void __launch_bounds__(512) parallel_backward_kernel(const ParallelArgs a) {
  using A = typename Elem<S>::A;
  QGOFT_DYNAMIC_SMEM(smem_raw);
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int tid = threadIdx.x;
  const int T = a.T, R = a.R;
  const int slot = tid >> a.logT, t = tid & (T - 1);
  const int sigma = blockIdx.y;
  const bool segmented = a.nseg > 1;
  const int d = static_cast<int>(a.d);
  const int P = static_cast<int>(a.num_pairs);
  const int width = 4 * P + d;
  const ParallelBackwardSmem layout(R, T, a.nseg, width, kGrads);
  A* xch = sm;
  A* cacc = sm + layout.cacc;  // [R][T-1][4]: cross-thread pairs of each slot
  A* tacc = sm + layout.tacc;  // [31][4] top pairs, then [32] segment-start scale
  A* red = sm + layout.red;    // [R][width] (R > 1)
  const int seg_base = sigma << (a.logT + kLogChunk);
  const int base = seg_base + (t << kLogChunk);
  const A* blocks = static_cast<const A*>(a.blocks);
  const A* scale = static_cast<const A*>(a.scale);
  const S* x = static_cast<const S*>(a.x);
  const S* grad = static_cast<const S*>(a.grad);
  S* gx = static_cast<S*>(a.out);
  const bool acc_blocks = kGrads && a.want_blocks;
  const bool acc_scale = kGrads && a.want_scale;

  A acc_in[kChunk - 1][4];
  A acc_s[kChunk];
#pragma unroll
  for (int k = 0; k < kChunk - 1; ++k) acc_in[k][0] = acc_in[k][1] = acc_in[k][2] = acc_in[k][3] = A(0);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) acc_s[e] = A(0);
  if constexpr (kGrads) {
    for (int k = tid; k < static_cast<int>(layout.red - layout.cacc); k += blockDim.x) cacc[k] = A(0);
  }
  __syncthreads();

  const int LS = a.logT < 5 ? a.logT : 5;
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row = g * R + slot;
    const bool valid = row < a.rows;
    A gv[kChunk];
    load_chunk<S, kVec>(grad + row * a.grad_ld, base, d, valid, gv);
    Tape<A> tp;
    if constexpr (kGrads) {
      A v[kChunk];
      load_chunk<S, kVec>(x + row * a.x_ld, base, d, valid, v);
      parallel_forward_local<A, true>(a, v, seg_base, base, t, slot, tid, xch, tp);
      if (acc_scale && valid) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          if (!(segmented && t == 0 && e == 0)) acc_s[e] += gv[e] * v[e];
        }
      }
    }
    if (scale != nullptr) {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        if (base + e < d) gv[e] *= __ldg(scale + base + e);
      }
    }

    // Top layers (segmented rows): warp 0 recomputes them from the segment starts' local results
    // and back-propagates the segment starts' gradients; block (., 0) accumulates their gradients.
    if (segmented && tid < 32) {
      const int q = tid;
      const bool qv = q < a.nseg && valid;
      const int logS = a.logT + kLogChunk;
      A u = A(0);
      A tt[5];
      if constexpr (kGrads) {
        u = top_layers_forward<true>(qv ? static_cast<const A*>(a.top)[row * a.nseg + q] : A(0), q,
                                     qv, a, blocks, tt);
      }
      const int c = q << logS;
      A gq = qv ? Elem<S>::to(grad[row * a.grad_ld + c]) : A(0);
      if (acc_scale && sigma == 0 && qv) tacc[4 * (kMaxTopLanes - 1) + q] += gq * u;
      if (scale != nullptr && qv) gq *= __ldg(scale + c);
#pragma unroll
      for (int s = 4; s >= 0; --s) {
        if (s < a.top_layers) {
          const int m = 1 << s;
          const A gw = __shfl_xor_sync(kFullMask, gq, m);
          A uw = A(0);
          if constexpr (kGrads) uw = __shfl_xor_sync(kFullMask, tt[s], m);
          if (qv && (q & (m - 1)) == 0) {
            const bool upper = (q & m) != 0;
            const int iq = upper ? q - m : q;
            if (iq + m < a.nseg) {
              A g0, g1, g2, g3;
              load_block(blocks, a.top_off[s] + (iq >> (s + 1)), g0, g1, g2, g3);
              if (!upper) {
                const A gi = gq, gj = gw;
                if (acc_blocks && sigma == 0) {
                  const A ui = tt[s], uj = uw;
                  A* ca = tacc + 4 * ((kMaxTopLanes - (kMaxTopLanes >> s)) + (iq >> (s + 1)));
                  ca[0] += ui * gi;
                  ca[1] += ui * gj;
                  ca[2] += uj * gi;
                  ca[3] += uj * gj;
                }
                gq = g0 * gi + g1 * gj;
              } else {
                const A gi = gw, gj = gq;
                gq = g2 * gi + g3 * gj;
              }
            }
          }
        }
      }
      const A mine = __shfl_sync(kFullMask, gq, sigma);
      if (q == 0) gv[0] = mine;
    }

    // Cross-warp layers, reversed.
    if (a.logT > 5) {
      const int LW = a.logT - 5, nw = T >> 5;
      const int lane = tid & 31, wr = t >> 5;
      if (lane == 0) xch[slot * nw + wr] = gv[0];
      __syncthreads();
      if (tid < 32) {
        const int q = tid;
        const bool qv = q < R * nw;
        const int qw = q & (nw - 1), qslot = q >> LW;
        const bool qrow_valid = qv && (g * R + qslot) < a.rows;
        A gq = qv ? xch[q] : A(0);
        const int qbase = seg_base + (qw << (5 + kLogChunk));
#pragma unroll
        for (int s = 4; s >= 0; --s) {
          if (s < LW) {
            const int m = 1 << s;
            const A gw = __shfl_xor_sync(kFullMask, gq, m);
            A uw = A(0);
            if constexpr (kGrads) uw = __shfl_xor_sync(kFullMask, tp.top[s], m);
            if (qv && (qw & (m - 1)) == 0) {
              const bool upper = (qw & m) != 0;
              const int h = m << (5 + kLogChunk);
              const int i = upper ? qbase - h : qbase;
              if (i + h < d) {
                A g0, g1, g2, g3;
                load_block(blocks, a.off[s + 9] + (i >> (s + 9)), g0, g1, g2, g3);
                if (!upper) {
                  const A gi = gq, gj = gw;
                  if (acc_blocks && qrow_valid) {
                    const int c = s + 5;
                    const int k = (qw << 5) >> (c + 1);
                    A* ca = cacc + 4 * (qslot * (T - 1) + (T - (T >> c)) + k);
                    const A ui = tp.top[s], uj = uw;
                    ca[0] += ui * gi;
                    ca[1] += ui * gj;
                    ca[2] += uj * gi;
                    ca[3] += uj * gj;
                  }
                  gq = g0 * gi + g1 * gj;
                } else {
                  const A gi = gw, gj = gq;
                  gq = g2 * gi + g3 * gj;
                }
              }
            }
          }
        }
        if (qv) xch[q] = gq;
      }
      __syncthreads();
      if (lane == 0) gv[0] = xch[slot * nw + wr];
    }

    // Shuffle layers, reversed.
#pragma unroll
    for (int s = 4; s >= 0; --s) {
      if (s < LS) {
        const int m = 1 << s;
        const A gw = __shfl_xor_sync(kFullMask, gv[0], m);
        A uw = A(0);
        if constexpr (kGrads) uw = __shfl_xor_sync(kFullMask, tp.sh[s], m);
        if ((t & (m - 1)) == 0) {
          const bool upper = (t & m) != 0;
          const int h = m << kLogChunk;
          const int i = upper ? base - h : base;
          if (i + h < d) {
            A g0, g1, g2, g3;
            load_block(blocks, a.off[s + 4] + (i >> (s + 4)), g0, g1, g2, g3);
            if (!upper) {
              const A gi = gv[0], gj = gw;
              if (acc_blocks && valid) {
                A* ca = cacc + 4 * (slot * (T - 1) + (T - (T >> s)) + (t >> (s + 1)));
                const A ui = tp.sh[s], uj = uw;
                ca[0] += ui * gi;
                ca[1] += ui * gj;
                ca[2] += uj * gi;
                ca[3] += uj * gj;
              }
              gv[0] = g0 * gi + g1 * gj;
            } else {
              const A gi = gw, gj = gv[0];
              gv[0] = g2 * gi + g3 * gj;
            }
          }
        }
      }
    }

    // In-thread layers 3, 2, 1.
#pragma unroll
    for (int li = kLogChunk - 1; li >= 0; --li) {
      const int h = 1 << li;
#pragma unroll
      for (int e = 0; e < kChunk; e += 2 * h) {
        const int i = base + e;
        if (i + h < d) {
          A g0, g1, g2, g3;
          load_block(blocks, a.off[li + 1] + (i >> (li + 1)), g0, g1, g2, g3);
          const A gi = gv[e], gj = gv[e + h];
          if constexpr (kGrads) {
            if (acc_blocks && valid) {
              // pair slot: layer 1 -> 0..3, layer 2 -> 4..5, layer 3 -> 6
              constexpr int kFirst[3] = {0, 4, 6};
              A* ca = acc_in[kFirst[li] + e / (2 * h)];
              const A ui = tp.x[li][e], uj = tp.x[li][e + h];
              ca[0] += ui * gi;
              ca[1] += ui * gj;
              ca[2] += uj * gi;
              ca[3] += uj * gj;
            }
          }
          gv[e] = g0 * gi + g1 * gj;
          gv[e + h] = g2 * gi + g3 * gj;
        }
      }
    }
    if (gx != nullptr) store_chunk<S, kVec>(gx + row * d, base, d, valid, gv);
  }

  if constexpr (kGrads) {
    __syncthreads();
    A* dst = R > 1 ? red + static_cast<int64_t>(slot) * width
                   : static_cast<A*>(a.partial) + static_cast<int64_t>(blockIdx.x) * a.partial_ld;
    if (acc_blocks) {
#pragma unroll
      for (int li = 0; li < kLogChunk; ++li) {
        const int h = 1 << li;
#pragma unroll
        for (int e = 0; e < kChunk; e += 2 * h) {
          const int i = base + e;
          if (i + h < d) {
            constexpr int kFirst[3] = {0, 4, 6};
            const int p = a.off[li + 1] + (i >> (li + 1));
            const A* ca = acc_in[kFirst[li] + e / (2 * h)];
#pragma unroll
            for (int k = 0; k < 4; ++k) dst[4 * p + k] = ca[k];
          }
        }
      }
      // cross-thread pairs of layer c + 4: thread t owns local pair k = t of that layer
#pragma unroll
      for (int c = 0; c < 10; ++c) {
        if (c < a.logT && t < (T >> (c + 1))) {
          const int i = seg_base + (t << (c + 4));
          const int h = kChunk << c;
          if (i + h < d) {
            const int p = a.off[c + 4] + (i >> (c + 4));
            const A* ca = cacc + 4 * (slot * (T - 1) + (T - (T >> c)) + t);
#pragma unroll
            for (int k = 0; k < 4; ++k) dst[4 * p + k] = ca[k];
          }
        }
      }
    }
    if (acc_scale) {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        if (base + e < d && !(segmented && t == 0 && e == 0)) dst[4 * P + base + e] = acc_s[e];
      }
    }
    if (segmented && sigma == 0 && tid < 32) {
      const int q = tid;
      if (acc_blocks) {
#pragma unroll
        for (int s = 0; s < 5; ++s) {
          const int m = 1 << s;
          if (s < a.top_layers && (q & (2 * m - 1)) == 0 && q + m < a.nseg) {
            const int p = a.top_off[s] + (q >> (s + 1));
            const A* ca = tacc + 4 * ((kMaxTopLanes - (kMaxTopLanes >> s)) + (q >> (s + 1)));
#pragma unroll
            for (int k = 0; k < 4; ++k) dst[4 * p + k] = ca[k];
          }
        }
      }
      if (acc_scale && q < a.nseg) {
        dst[4 * P + (q << (a.logT + kLogChunk))] = tacc[4 * (kMaxTopLanes - 1) + q];
      }
    }
    if (R > 1) {
      __syncthreads();
      A* out = static_cast<A*>(a.partial) + static_cast<int64_t>(blockIdx.x) * a.partial_ld;
      const int begin = acc_blocks ? 0 : 4 * P, end = acc_scale ? width : 4 * P;
      for (int k = begin + tid; k < end; k += blockDim.x) {
        A s = red[k];
        for (int r = 1; r < R; ++r) s += red[static_cast<int64_t>(r) * width + k];
        out[k] = s;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// General layouts. A block processes groups of R rows held in a buffer (shared memory or its slice of a
// global workspace): threads take the pairs of a layer (pair q of layer l belongs to thread
// (q - off[l]) mod blockDim for every row, so its gradient accumulator has one owner), __syncthreads
// between layers (it also orders the global workspace within the block).
// ---------------------------------------------------------------------------------------------
template <class S>
__global__ void __launch_bounds__(kGeneralThreads) general_forward_kernel(const GeneralArgs a) {
  using A = typename Elem<S>::A;
  QGOFT_DYNAMIC_SMEM(smem_raw);
  A* buf = a.workspace != nullptr
               ? static_cast<A*>(a.workspace) + static_cast<int64_t>(blockIdx.x) * a.ws_stride
               : reinterpret_cast<A*>(smem_raw);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t d = a.d;
  const S* x = static_cast<const S*>(a.x);
  S* y = static_cast<S*>(a.out);
  const A* blocks = static_cast<const A*>(a.blocks);
  const A* scale = static_cast<const A*>(a.scale);
  const int2* pairs = reinterpret_cast<const int2*>(a.pairs);
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row0 = g * a.R;
    const int nr = static_cast<int>(a.rows - row0 < a.R ? a.rows - row0 : a.R);
    for (int r = 0; r < nr; ++r) {
      const S* xr = x + (row0 + r) * a.x_ld;
      A* br = buf + r * d;
      for (int64_t c = tid; c < d; c += nt) br[c] = Elem<S>::to(xr[c]);
    }
    __syncthreads();
    for (int64_t l = 0; l < a.num_layers; ++l) {
      const int64_t begin = __ldg(a.offsets + l), end = __ldg(a.offsets + l + 1);
      for (int64_t q = begin + tid; q < end; q += nt) {
        const int2 ij = __ldg(pairs + q);
        A g0, g1, g2, g3;
        load_block(blocks, q, g0, g1, g2, g3);
        for (int r = 0; r < nr; ++r) {
          A* br = buf + r * d;
          const A xi = br[ij.x], xj = br[ij.y];
          br[ij.x] = g0 * xi + g2 * xj;
          br[ij.y] = g1 * xi + g3 * xj;
        }
      }
      __syncthreads();
    }
    for (int r = 0; r < nr; ++r) {
      const A* br = buf + r * d;
      S* yr = y + (row0 + r) * d;
      for (int64_t c = tid; c < d; c += nt) {
        A v = br[c];
        if (scale != nullptr) v *= __ldg(scale + c);
        yr[c] = Elem<S>::from(v);
      }
    }
    __syncthreads();
  }
}

template <class S, bool kGrads>
__global__ void __launch_bounds__(kGeneralThreads) general_backward_kernel(const GeneralArgs a) {
  using A = typename Elem<S>::A;
  QGOFT_DYNAMIC_SMEM(smem_raw);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t d = a.d, P = a.num_pairs;
  const int R = a.R;
  const bool acc_blocks = kGrads && a.want_blocks;
  const bool acc_scale = kGrads && a.want_scale;
  const int64_t row_elems = general_row_elems(d, P, kGrads, acc_blocks);
  A* smem = reinterpret_cast<A*>(smem_raw);
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
  const S* x = static_cast<const S*>(a.x);
  const S* grad = static_cast<const S*>(a.grad);
  S* gx = static_cast<S*>(a.out);
  const A* blocks = static_cast<const A*>(a.blocks);
  const A* scale = static_cast<const A*>(a.scale);
  const int2* pairs = reinterpret_cast<const int2*>(a.pairs);
  __syncthreads();

  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    const int64_t row0 = g * R;
    const int nr = static_cast<int>(a.rows - row0 < R ? a.rows - row0 : R);
    for (int r = 0; r < nr; ++r) {
      const S* grow = grad + (row0 + r) * a.grad_ld;
      A* gbr = gb + r * d;
      for (int64_t c = tid; c < d; c += nt) gbr[c] = Elem<S>::to(grow[c]);
      if constexpr (kGrads) {
        const S* xr = x + (row0 + r) * a.x_ld;
        A* zr = z + r * d;
        for (int64_t c = tid; c < d; c += nt) zr[c] = Elem<S>::to(xr[c]);
      }
    }
    __syncthreads();
    if constexpr (kGrads) {
      for (int64_t l = 0; l < a.num_layers; ++l) {
        const int64_t begin = __ldg(a.offsets + l), end = __ldg(a.offsets + l + 1);
        for (int64_t q = begin + tid; q < end; q += nt) {
          const int2 ij = __ldg(pairs + q);
          A g0, g1, g2, g3;
          load_block(blocks, q, g0, g1, g2, g3);
          for (int r = 0; r < nr; ++r) {
            A* zr = z + r * d;
            const A xi = zr[ij.x], xj = zr[ij.y];
            if (acc_blocks) {
              tape[r * 2 * P + 2 * q] = xi;
              tape[r * 2 * P + 2 * q + 1] = xj;
            }
            zr[ij.x] = g0 * xi + g2 * xj;
            zr[ij.y] = g1 * xi + g3 * xj;
          }
        }
        __syncthreads();
      }
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
        A a0 = A(0), a1 = A(0), a2 = A(0), a3 = A(0);
        for (int r = 0; r < nr; ++r) {
          A* gbr = gb + r * d;
          const A gi = gbr[ij.x], gj = gbr[ij.y];
          if (acc_blocks) {
            const A ui = tape[r * 2 * P + 2 * q], uj = tape[r * 2 * P + 2 * q + 1];
            a0 += ui * gi;
            a1 += ui * gj;
            a2 += uj * gi;
            a3 += uj * gj;
          }
          gbr[ij.x] = g0 * gi + g1 * gj;
          gbr[ij.y] = g2 * gi + g3 * gj;
        }
        if (acc_blocks) {
          accb[4 * q] += a0;
          accb[4 * q + 1] += a1;
          accb[4 * q + 2] += a2;
          accb[4 * q + 3] += a3;
        }
      }
      __syncthreads();
    }
    if (gx != nullptr) {
      for (int r = 0; r < nr; ++r) {
        const A* gbr = gb + r * d;
        S* out = gx + (row0 + r) * d;
        for (int64_t c = tid; c < d; c += nt) out[c] = Elem<S>::from(gbr[c]);
      }
    }
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

// ---------------------------------------------------------------------------------------------
// Small kernels: blocks from angles, and the fixed-order reduction of the partial rows.
// ---------------------------------------------------------------------------------------------
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

#ifndef QGOFT_CUDA_HOST_SIM  // the host emulation (csrc/cuda/sim) launches the kernels itself
// ---------------------------------------------------------------------------------------------
// Launch helpers.
// ---------------------------------------------------------------------------------------------
constexpr size_t kDefaultSmemLimit = 48 * 1024;

template <class K>
inline void enable_smem(K* kernel, size_t smem) {
  if (smem > kDefaultSmemLimit) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  }
}

template <class K>
inline int occupancy(K* kernel, int threads, size_t smem) {
  enable_smem(kernel, smem);
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess) {
    (void)cudaGetLastError();  // the launch itself reports a real problem
    blocks = 1;
  }
  return blocks < 1 ? 1 : blocks;
}

template <class K>
inline void launch(K* kernel, const LaunchConfig& c, cudaStream_t stream, const ParallelArgs& a) {
  enable_smem(kernel, c.smem);
  kernel<<<c.grid, c.threads, c.smem, stream>>>(a);
}
template <class K>
inline void launch(K* kernel, const LaunchConfig& c, cudaStream_t stream, const GeneralArgs& a) {
  enable_smem(kernel, c.smem);
  kernel<<<c.grid, c.threads, c.smem, stream>>>(a);
}

template <class S>
struct Launchers {
  static void parallel_forward(bool vec, const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s) {
    if (vec) launch(parallel_forward_kernel<S, true>, c, s, a);
    else launch(parallel_forward_kernel<S, false>, c, s, a);
  }
  static void parallel_top_forward(const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s) {
    launch(parallel_top_forward_kernel<S>, c, s, a);
  }
  static void parallel_backward(bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                                cudaStream_t s) {
    if (vec && grads) launch(parallel_backward_kernel<S, true, true>, c, s, a);
    else if (vec) launch(parallel_backward_kernel<S, true, false>, c, s, a);
    else if (grads) launch(parallel_backward_kernel<S, false, true>, c, s, a);
    else launch(parallel_backward_kernel<S, false, false>, c, s, a);
  }
  static int parallel_backward_occupancy(bool vec, bool grads, int threads, size_t smem) {
    if (vec && grads) return occupancy(parallel_backward_kernel<S, true, true>, threads, smem);
    if (vec) return occupancy(parallel_backward_kernel<S, true, false>, threads, smem);
    if (grads) return occupancy(parallel_backward_kernel<S, false, true>, threads, smem);
    return occupancy(parallel_backward_kernel<S, false, false>, threads, smem);
  }
  static void general_forward(const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
    launch(general_forward_kernel<S>, c, s, a);
  }
  static void general_backward(bool grads, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
    if (grads) launch(general_backward_kernel<S, true>, c, s, a);
    else launch(general_backward_kernel<S, false>, c, s, a);
  }
  static int general_backward_occupancy(bool grads, int threads, size_t smem) {
    if (grads) return occupancy(general_backward_kernel<S, true>, threads, smem);
    return occupancy(general_backward_kernel<S, false>, threads, smem);
  }
};

#endif  // QGOFT_CUDA_HOST_SIM

}  // namespace qgoft::cuda::detail

#ifndef QGOFT_CUDA_HOST_SIM
// Per-dtype entry points (defined in chain_<dtype>.cu, dispatched in chain_launch.cu).
#define QGOFT_CHAIN_LAUNCHER_DECLS(suffix)                                                         \
  namespace qgoft::cuda::detail {                                                                  \
  void parallel_forward_##suffix(bool, const ParallelArgs&, const LaunchConfig&, cudaStream_t);   \
  void parallel_top_forward_##suffix(const ParallelArgs&, const LaunchConfig&, cudaStream_t);     \
  void parallel_backward_##suffix(bool, bool, const ParallelArgs&, const LaunchConfig&,           \
                                  cudaStream_t);                                                  \
  int parallel_backward_occupancy_##suffix(bool, bool, int, size_t);                              \
  void general_forward_##suffix(const GeneralArgs&, const LaunchConfig&, cudaStream_t);           \
  void general_backward_##suffix(bool, const GeneralArgs&, const LaunchConfig&, cudaStream_t);    \
  int general_backward_occupancy_##suffix(bool, int, size_t);                                     \
  }

#define QGOFT_DEFINE_CHAIN_LAUNCHERS(S, suffix)                                                     \
  namespace qgoft::cuda::detail {                                                                  \
  void parallel_forward_##suffix(bool v, const ParallelArgs& a, const LaunchConfig& c,            \
                                 cudaStream_t s) {                                                \
    Launchers<S>::parallel_forward(v, a, c, s);                                                   \
  }                                                                                               \
  void parallel_top_forward_##suffix(const ParallelArgs& a, const LaunchConfig& c,                \
                                     cudaStream_t s) {                                            \
    Launchers<S>::parallel_top_forward(a, c, s);                                                  \
  }                                                                                               \
  void parallel_backward_##suffix(bool v, bool g, const ParallelArgs& a, const LaunchConfig& c,   \
                                  cudaStream_t s) {                                               \
    Launchers<S>::parallel_backward(v, g, a, c, s);                                               \
  }                                                                                               \
  int parallel_backward_occupancy_##suffix(bool v, bool g, int threads, size_t smem) {            \
    return Launchers<S>::parallel_backward_occupancy(v, g, threads, smem);                        \
  }                                                                                               \
  void general_forward_##suffix(const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {    \
    Launchers<S>::general_forward(a, c, s);                                                       \
  }                                                                                               \
  void general_backward_##suffix(bool g, const GeneralArgs& a, const LaunchConfig& c,             \
                                 cudaStream_t s) {                                                \
    Launchers<S>::general_backward(g, a, c, s);                                                   \
  }                                                                                               \
  int general_backward_occupancy_##suffix(bool g, int threads, size_t smem) {                     \
    return Launchers<S>::general_backward_occupancy(g, threads, smem);                            \
  }                                                                                               \
  }
#endif  // QGOFT_CUDA_HOST_SIM
