// Device building blocks shared by the CUDA Givens-chain kernels (chain_parallel.cuh, chain_general.cuh):
// activation element types, 8-element chunk I/O, block-table loads and the 2 x 2 pair updates. Torch-free:
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
#include <type_traits>

#include "chain_cuda.h"
#include "chain_sizes.h"

// QGOFT_DYNAMIC_SMEM(T, name): declares `T* name`, the block's dynamic shared memory (16-byte aligned) as an
// array of T (in a kernel body: a macro, since an extern __shared__ array declared in a helper function
// changed the kernels' SASS). QGOFT_CHECK_ALIGN16: a check of the 16-byte vector accesses' alignment (host
// emulation only).
#ifdef QGOFT_CUDA_HOST_SIM
#define QGOFT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::qgoft_sim::dynamic_smem())
#define QGOFT_CHECK_ALIGN16(p) ::qgoft_sim::check_align16(p)
#else
#define QGOFT_DYNAMIC_SMEM(T, name)                          \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  T* name = reinterpret_cast<T*>(name##_raw)
#define QGOFT_CHECK_ALIGN16(p) ((void)0)
#endif

namespace qgoft::cuda::detail {

// ---------------------------------------------------------------------------------------------
// Activation element types: conversion to/from the accumulation type A and 8-element vector I/O
// (16-byte accesses; only used when the row pointers are 16-byte aligned and d % 8 == 0): load_raw
// returns the 16-byte words as loaded (Raw), unpack converts them to A.
// ---------------------------------------------------------------------------------------------
template <class S>
struct Elem;

// float and double: accumulated in their own type (no conversion).
template <class T>
struct ElemOwnType {
  using A = T;
  static __device__ __forceinline__ A to(T v) { return v; }
  static __device__ __forceinline__ T from(A v) { return v; }
};

template <>
struct Elem<float> : ElemOwnType<float> {
  struct Raw {
    float4 a, b;
  };
  static __device__ __forceinline__ Raw load_raw(const float* p) {
    QGOFT_CHECK_ALIGN16(p);
    return {__ldg(reinterpret_cast<const float4*>(p)), __ldg(reinterpret_cast<const float4*>(p) + 1)};
  }
  static __device__ __forceinline__ void unpack(const Raw& r, A (&v)[kChunk]) {
    v[0] = r.a.x; v[1] = r.a.y; v[2] = r.a.z; v[3] = r.a.w;
    v[4] = r.b.x; v[5] = r.b.y; v[6] = r.b.z; v[7] = r.b.w;
  }
  static __device__ __forceinline__ void store8(float* p, const A (&v)[kChunk]) {
    QGOFT_CHECK_ALIGN16(p);
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <>
struct Elem<double> : ElemOwnType<double> {
  struct Raw {
    double2 w[4];
  };
  static __device__ __forceinline__ Raw load_raw(const double* p) {
    QGOFT_CHECK_ALIGN16(p);
    Raw r;
#pragma unroll
    for (int k = 0; k < 4; ++k) r.w[k] = __ldg(reinterpret_cast<const double2*>(p) + k);
    return r;
  }
  static __device__ __forceinline__ void unpack(const Raw& r, A (&v)[kChunk]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = r.w[k].x;
      v[2 * k + 1] = r.w[k].y;
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
  using Raw = uint4;
  static __device__ __forceinline__ Raw load_raw(const H* p) {
    QGOFT_CHECK_ALIGN16(p);
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
  static __device__ __forceinline__ void unpack(const Raw& u, A (&v)[kChunk]) {
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

// v, opaque to the compiler: what a row loop derives from it (e.g. one predicate per layer of a LaneLive, or the
// loads through a pointer) is computed where it is used instead of being hoisted out of the loop into registers of
// its own.
__device__ __forceinline__ unsigned opaque(unsigned v) {
#ifndef QGOFT_CUDA_HOST_SIM
  asm volatile("" : "+r"(v));
#endif
  return v;
}
template <class T>
__device__ __forceinline__ const T* opaque(const T* p) {
#ifndef QGOFT_CUDA_HOST_SIM
  asm volatile("" : "+l"(p));
#endif
  return p;
}

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

// A thread's chunk of a row as loaded (kVec: the 16-byte words, zero-filled past d; otherwise the elements
// converted to A, zero past d or for invalid rows), so that the loads of a later row can be issued before
// the values are used; unpack gives the chunk in A.
template <class S, bool kVec>
struct RawChunk {
  using A = typename Elem<S>::A;
  A v[kChunk];
  __device__ __forceinline__ void load(const S* row, int base, int d, bool valid) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) v[e] = (valid && base + e < d) ? Elem<S>::to(row[base + e]) : A(0);
  }
  __device__ __forceinline__ void unpack(A (&out)[kChunk]) const {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) out[e] = v[e];
  }
};
template <class S>
struct RawChunk<S, true> {  // d % 8 == 0: a chunk lies entirely inside or outside the row
  using A = typename Elem<S>::A;
  // float accumulation: the words of a chunk outside are zeroed (all bits zero unpack to A(0)), so that
  // unpack needs no branch; float64 keeps the flag (zeroing its 16 words raised its register spills)
  static constexpr bool kFlag = sizeof(A) == 8;
  typename Elem<S>::Raw w;
  bool inside;
  __device__ __forceinline__ void load(const S* row, int base, int d, bool valid) {
    inside = valid && base < d;
    if constexpr (!kFlag) w = typename Elem<S>::Raw{};
    if (inside) w = Elem<S>::load_raw(row + base);
  }
  __device__ __forceinline__ void unpack(A (&out)[kChunk]) const {
    if (kFlag && !inside) {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) out[e] = A(0);
    } else {
      Elem<S>::unpack(w, out);
    }
  }
};

// Block p of a block table in shared memory (the table variants): plain loads. __ldg is a global-memory
// load (ld.global.nc): given a shared-memory address it reads global memory at that number.
__device__ __forceinline__ void load_block_shared(const float* b, int64_t p, float& g0, float& g1, float& g2,
                                                  float& g3) {
  QGOFT_CHECK_ALIGN16(b + 4 * p);
  const float4 v = reinterpret_cast<const float4*>(b)[p];
  g0 = v.x; g1 = v.y; g2 = v.z; g3 = v.w;
}
__device__ __forceinline__ void load_block_shared(const double* b, int64_t p, double& g0, double& g1,
                                                  double& g2, double& g3) {
  QGOFT_CHECK_ALIGN16(b + 4 * p);
  const double2 u = reinterpret_cast<const double2*>(b)[2 * p];
  const double2 v = reinterpret_cast<const double2*>(b)[2 * p + 1];
  g0 = u.x; g1 = u.y; g2 = v.x; g3 = v.y;
}
// Block p of a table in shared memory (kShared) or in global memory.
template <bool kShared, class A>
__device__ __forceinline__ void load_block_from(const A* b, int64_t p, A& g0, A& g1, A& g2, A& g3) {
  if constexpr (kShared) {
    load_block_shared(b, p, g0, g1, g2, g3);
  } else {
    load_block(b, p, g0, g1, g2, g3);
  }
}

template <class S, bool kVec>
__device__ __forceinline__ void load_chunk(const S* row, int base, int d, bool valid,
                                           typename Elem<S>::A (&v)[kChunk]) {
  using A = typename Elem<S>::A;
  if constexpr (kVec) {
    if (valid && base < d) {
      Elem<S>::unpack(Elem<S>::load_raw(row + base), v);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) v[e] = A(0);
    }
  } else {
    RawChunk<S, false> c;
    c.load(row, base, d, valid);
    c.unpack(v);
  }
}

// Asks for the line of a thread's chunk of a row in L2 ahead of its load_chunk, without tying up registers (a
// hint: no result, nothing to wait for; the host emulation ignores it). A chunk (8 elements from a multiple of 8)
// lies in one 128-byte line.
template <class S>
__device__ __forceinline__ void prefetch_chunk(const S* row, int base, int d, bool valid) {
#ifndef QGOFT_CUDA_HOST_SIM
  if (valid && base < d) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + base));
#else
  (void)row, (void)base, (void)d, (void)valid;
#endif
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

// Scale (d entries, accumulation type, may be null) applied to a thread's chunk.
template <class A>
__device__ __forceinline__ void scale_chunk(const A* scale, int base, int d, A (&v)[kChunk]) {
  if (scale == nullptr) return;
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    if (base + e < d) v[e] *= __ldg(scale + base + e);
  }
}

// ---------------------------------------------------------------------------------------------
// The 2 x 2 pair updates (docs/CONTRACT.md): block p = [[g00, g01], [g10, g11]] acts on the pair
// (x_i, x_j) as G^T in the forward; the backward applies G to the pair's gradient and accumulates
// dG += u (x) g (u: the pair's input, g: the gradient of its output).
// ---------------------------------------------------------------------------------------------
// (xi, xj) <- G^T (xi, xj) (forward) or, kTransposed, G (xi, xj) (backward) for block p of the table (in
// shared memory when kShared).
// The same with the block's entries given (g0, g1, g2, g3) = (g00, g01, g10, g11).
template <bool kTransposed = false, class A>
__device__ __forceinline__ void rotate_values(A g0, A g1, A g2, A g3, A& xi, A& xj) {
  const A a = xi, b = xj;
  xi = g0 * a + (kTransposed ? g1 : g2) * b;
  xj = (kTransposed ? g2 : g1) * a + g3 * b;
}
template <bool kTransposed = false, bool kShared = false, class A>
__device__ __forceinline__ void rotate_pair(const A* blocks, int64_t p, A& xi, A& xj) {
  A g0, g1, g2, g3;
  load_block_from<kShared>(blocks, p, g0, g1, g2, g3);
  rotate_values<kTransposed>(g0, g1, g2, g3, xi, xj);
}

// acc[0], acc[stride], acc[2 stride], acc[3 stride] += (ui gi, ui gj, uj gi, uj gj)
template <class A>
__device__ __forceinline__ void accumulate_outer(A* acc, A ui, A uj, A gi, A gj, int stride = 1) {
  acc[0] += ui * gi;
  acc[stride] += ui * gj;
  acc[2 * stride] += uj * gi;
  acc[3 * stride] += uj * gj;
}

// The same into a pair's four consecutive accumulators at a 16-byte boundary (the parallel kernels' shared-memory
// accumulators cacc / tacc: blocks of 4 from aligned starts); float: one 16-byte shared read and write. Through
// XLevel::acc_at's index, which it cannot prove a multiple of 4, the compiler made them 4 scalar reads and 4
// writes (float backward with parameter gradients: 44 LDS + 44 STS per row instead of 14 LDS.128 + 14 STS.128).
// The same for N rows' sums of one pair, row r's (ui, uj, gi, gj) in p[r], added in row order (one read and one
// write for all rows).
template <int N, class A>
__device__ __forceinline__ void accumulate_pair_rows(A* acc, const A (&p)[N][4]) {
  QGOFT_CHECK_ALIGN16(acc);
  if constexpr (std::is_same_v<A, float>) {
    float4* q = reinterpret_cast<float4*>(acc);
    float4 c = *q;
#pragma unroll
    for (int r = 0; r < N; ++r) {
      const A ui = p[r][0], uj = p[r][1], gi = p[r][2], gj = p[r][3];
      c.x += ui * gi;
      c.y += ui * gj;
      c.z += uj * gi;
      c.w += uj * gj;
    }
    *q = c;
  } else {
#pragma unroll
    for (int r = 0; r < N; ++r) accumulate_outer(acc, p[r][0], p[r][1], p[r][2], p[r][3]);
  }
}
template <class A>
__device__ __forceinline__ void accumulate_pair(A* acc, A ui, A uj, A gi, A gj) {
  const A p[1][4] = {{ui, uj, gi, gj}};
  accumulate_pair_rows(acc, p);
}

}  // namespace qgoft::cuda::detail
