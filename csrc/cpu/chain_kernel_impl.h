// Implementation of the CPU Givens-chain kernels, included by one translation unit per instruction
// set (chain_kernel_<isa>.cpp), each compiled with its own target flags. Before including, define
//   QGOFT_ISA_NS  the namespace of the variant (generic, avx2, avx512)
//   QGOFT_LANES   SIMD lanes per vector of floats (rows processed together in one tile)
//
// Scheme: a tile of W = QGOFT_LANES rows is loaded transposed into a column-major buffer
// (buf[c * W + lane] = x[row0 + lane][c]), so that every pair update, whatever the layout, is a
// pair of contiguous W-lane vector operations. All layers run on the tile while it sits in cache;
// the tile is transposed back once. Math is float32 for float32/bfloat16/float16 activations and
// float64 for float64. The backward pass records the two inputs of every block on a tape during its
// forward recomputation and accumulates the block gradients per tile, summed across lanes in a
// fixed order (deterministic for a given row range).
//
// GCC vector extensions keep one source for every ISA; the kernels are compiled with
// -ffp-contract=off and use explicit fused multiply-adds (mul_add) where the ISA has them, so results
// differ between ISAs at rounding level (FMA, and the grouping of rows in the reductions).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>
#include <algorithm>

#include "chain_kernel.h"

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef QGOFT_ISA_NS
#error "define QGOFT_ISA_NS before including chain_kernel_impl.h"
#endif
#ifndef QGOFT_VECS
#define QGOFT_VECS 1
#endif
#ifndef QGOFT_VECS_SMALL_TILE
#define QGOFT_VECS_SMALL_TILE QGOFT_VECS
#endif
#ifndef QGOFT_LANES
#error "define QGOFT_LANES before including chain_kernel_impl.h"
#endif

namespace qgoft::cpu::QGOFT_ISA_NS {
namespace {

constexpr int W = QGOFT_LANES;
static_assert(W >= 2 && (W & (W - 1)) == 0, "lanes must be a power of two");

template <class T>
struct VecOf {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
};
template <class T>
using Vec = typename VecOf<T>::type;

template <class T>
struct SameSizeInt;
template <>
struct SameSizeInt<float> { using type = int32_t; };
template <>
struct SameSizeInt<double> { using type = int64_t; };

// 16-bit storage types (bit patterns).
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

// ---------------------------------------------------------------------------------------------
// Bit casts and 16-bit float conversions, written once for scalars and for vectors.
// ---------------------------------------------------------------------------------------------
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline Vec<float> bits_to_float(Vec<uint32_t> u) { return (Vec<float>)u; }
inline Vec<uint32_t> float_to_bits(Vec<float> f) { return (Vec<uint32_t>)f; }

// IEEE half (bits in the low 16 bits of u) -> float, exact for all inputs.
template <class U>
inline auto half_bits_to_float(U h) {
  const U w = h << 16;
  const U sign = w & 0x80000000u;
  const U two_w = w + w;
  // Normal numbers, infinities and NaNs: move exponent and mantissa into place, then rescale the
  // exponent bias (15 -> 127) with an exact multiplication by 2^-112.
  const auto normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: 0.5 + m * 2^-24 built in the mantissa of 0.5, minus 0.5.
  const auto subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const U magnitude = (two_w < (1u << 27)) ? float_to_bits(subnormal) : float_to_bits(normalized);
  return bits_to_float(sign | magnitude);
}

// float -> IEEE half bits (round to nearest even; overflow to infinity; NaN -> quiet NaN).
template <class F>
inline auto float_to_half_bits(F f) {
  const auto w = float_to_bits(f);
  using U = std::remove_cv_t<decltype(w)>;
  // Exact scalings that push the value to the half range so that one float addition rounds the
  // mantissa to 10 bits (or to the subnormal grid) with the current round-to-nearest-even mode.
  F base = (bits_to_float(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const U shl1_w = w + w;
  const U sign = w & 0x80000000u;
  U bias = shl1_w & 0xFF000000u;
  bias = (bias < 0x71000000u) ? U(bias - bias + 0x71000000u) : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const U b = float_to_bits(base);
  const U exp_bits = (b >> 13) & 0x00007C00u;
  const U mantissa_bits = b & 0x00000FFFu;
  const U nonsign = exp_bits + mantissa_bits;
  return (sign >> 16) | ((shl1_w > 0xFF000000u) ? U(shl1_w - shl1_w + 0x7E00u) : nonsign);
}

// float -> bfloat16 bits (round to nearest even; NaN -> 0x7FC0 as in PyTorch).
template <class F>
inline auto float_to_bf16_bits(F f) {
  const auto w = float_to_bits(f);
  using U = std::remove_cv_t<decltype(w)>;
  const U rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  const U is_nan = (w & 0x7FFFFFFFu) > 0x7F800000u ? U(w - w + 1u) : U(w - w);
  return is_nan != 0u ? U(w - w + 0x7FC0u) : rounded;
}

// ---------------------------------------------------------------------------------------------
// a * b + c: one fused multiply-add (a single rounding) in the variants compiled with FMA, a multiply
// then an add in the generic one. Written explicitly because the kernels are compiled with
// -ffp-contract=off (the 16-bit conversions above rely on separately rounded operations).
// ---------------------------------------------------------------------------------------------
template <class A>
inline Vec<A> mul_add(Vec<A> a, Vec<A> b, Vec<A> c) {
#if defined(__FMA__)
  if constexpr (sizeof(Vec<A>) == 32 && std::is_same_v<A, float>) {
    return (Vec<A>)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  } else if constexpr (sizeof(Vec<A>) == 32 && std::is_same_v<A, double>) {
    return (Vec<A>)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
  }
#endif
#if defined(__AVX512F__)
  if constexpr (sizeof(Vec<A>) == 64 && std::is_same_v<A, float>) {
    return (Vec<A>)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
  } else if constexpr (sizeof(Vec<A>) == 64 && std::is_same_v<A, double>) {
    return (Vec<A>)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
  }
#endif
  return a * b + c;
}
template <class A>
inline Vec<A> mul_add(A a, Vec<A> b, Vec<A> c) {
  return mul_add<A>(Vec<A>{} + a, b, c);
}

// ---------------------------------------------------------------------------------------------
// Loading / storing W consecutive elements of one row as a vector of the accumulation type.
// ---------------------------------------------------------------------------------------------
template <class S, class A>
struct Io;

template <class A>
struct Io<A, A> {  // float -> float, double -> double
  static Vec<A> load(const A* p) { Vec<A> v; std::memcpy(&v, p, sizeof(v)); return v; }
  static void store(A* p, Vec<A> v) { std::memcpy(p, &v, sizeof(v)); }
  static A load1(const A* p) { return *p; }
  static void store1(A* p, A v) { *p = v; }
};

template <>
struct Io<BF16, float> {
  static Vec<float> load(const BF16* p) {
    Vec<uint16_t> h;
    std::memcpy(&h, p, sizeof(h));
    return bits_to_float(__builtin_convertvector(h, Vec<uint32_t>) << 16);
  }
  static void store(BF16* p, Vec<float> v) {
    const Vec<uint16_t> h = __builtin_convertvector(float_to_bf16_bits(v), Vec<uint16_t>);
    std::memcpy(p, &h, sizeof(h));
  }
  static float load1(const BF16* p) { return bits_to_float(uint32_t(p->bits) << 16); }
  static void store1(BF16* p, float v) { p->bits = uint16_t(float_to_bf16_bits(v)); }
};

template <>
struct Io<F16, float> {
  static Vec<float> load(const F16* p) {
    Vec<uint16_t> h;
    std::memcpy(&h, p, sizeof(h));
    return half_bits_to_float(__builtin_convertvector(h, Vec<uint32_t>));
  }
  static void store(F16* p, Vec<float> v) {
    const Vec<uint16_t> h = __builtin_convertvector(float_to_half_bits(v), Vec<uint16_t>);
    std::memcpy(p, &h, sizeof(h));
  }
  static float load1(const F16* p) { return half_bits_to_float(uint32_t(p->bits)); }
  static void store1(F16* p, float v) { p->bits = uint16_t(float_to_half_bits(v)); }
};

// ---------------------------------------------------------------------------------------------
// W x W transpose (W = 4, 8, 16) in the classic in-register form, written with shuffles whose
// masks each map to one instruction on x86 (unpcklps/unpckhps, shufps, vperm2f128, vshuff32x4):
//  1. interleave pairs of rows inside each 128-bit lane,
//  2. combine 64-bit halves: every 128-bit lane now holds a transposed 4 x 4 block,
//  3. (W >= 8) move the 128-bit blocks across vectors (a 2 x 2 or 4 x 4 transpose of blocks).
// ---------------------------------------------------------------------------------------------
template <class M, class F, int... I>
constexpr M make_mask(F f, std::integer_sequence<int, I...>) {
  return M{static_cast<typename std::remove_reference_t<decltype(M{}[0])>>(f(I))...};
}

template <class A>
inline void transpose(Vec<A>* v) {
  static_assert(W == 4 || W == 8 || W == 16, "transpose supports 4, 8 or 16 lanes");
  using M = Vec<typename SameSizeInt<A>::type>;
  constexpr auto seq = std::make_integer_sequence<int, W>{};
  // i = 4 * lane + t
  constexpr M unpack_lo = make_mask<M>([](int i) { return 4 * (i / 4) + (i % 4) / 2 + (i % 2) * W; }, seq);
  constexpr M unpack_hi = make_mask<M>([](int i) { return 4 * (i / 4) + 2 + (i % 4) / 2 + (i % 2) * W; }, seq);
  constexpr M half_lo = make_mask<M>([](int i) { return 4 * (i / 4) + (i % 2) + ((i % 4) / 2) * W; }, seq);
  constexpr M half_hi = make_mask<M>([](int i) { return 4 * (i / 4) + 2 + (i % 2) + ((i % 4) / 2) * W; }, seq);
  Vec<A> t[W];
#pragma GCC unroll 16
  for (int k = 0; k < W / 2; ++k) {
    t[2 * k] = __builtin_shuffle(v[2 * k], v[2 * k + 1], unpack_lo);
    t[2 * k + 1] = __builtin_shuffle(v[2 * k], v[2 * k + 1], unpack_hi);
  }
  // u[4g + c] holds, in 128-bit lane L, column 4L + c of rows 4g .. 4g + 3.
  Vec<A> u[W];
#pragma GCC unroll 16
  for (int g = 0; g < W / 4; ++g) {
    u[4 * g] = __builtin_shuffle(t[4 * g], t[4 * g + 2], half_lo);
    u[4 * g + 1] = __builtin_shuffle(t[4 * g], t[4 * g + 2], half_hi);
    u[4 * g + 2] = __builtin_shuffle(t[4 * g + 1], t[4 * g + 3], half_lo);
    u[4 * g + 3] = __builtin_shuffle(t[4 * g + 1], t[4 * g + 3], half_hi);
  }
  if constexpr (W == 4) {
    for (int k = 0; k < 4; ++k) v[k] = u[k];
  } else if constexpr (W == 8) {
    constexpr M block_lo = make_mask<M>([](int i) { return i < 4 ? i : W + i - 4; }, seq);
    constexpr M block_hi = make_mask<M>([](int i) { return i < 4 ? 4 + i : W + i; }, seq);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      v[c] = __builtin_shuffle(u[c], u[4 + c], block_lo);
      v[4 + c] = __builtin_shuffle(u[c], u[4 + c], block_hi);
    }
  } else {
    // Blocks (of 4 elements) [a0 a2 b0 b2] and [a1 a3 b1 b3] of two vectors a, b.
    constexpr M even_blocks = make_mask<M>(
        [](int i) { return (i / 4 < 2 ? 8 * (i / 4) : W + 8 * (i / 4 - 2)) + i % 4; }, seq);
    constexpr M odd_blocks = make_mask<M>(
        [](int i) { return (i / 4 < 2 ? 8 * (i / 4) : W + 8 * (i / 4 - 2)) + 4 + i % 4; }, seq);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const Vec<A> p0 = __builtin_shuffle(u[c], u[4 + c], even_blocks);
      const Vec<A> p1 = __builtin_shuffle(u[c], u[4 + c], odd_blocks);
      const Vec<A> p2 = __builtin_shuffle(u[8 + c], u[12 + c], even_blocks);
      const Vec<A> p3 = __builtin_shuffle(u[8 + c], u[12 + c], odd_blocks);
      v[c] = __builtin_shuffle(p0, p2, even_blocks);
      v[8 + c] = __builtin_shuffle(p0, p2, odd_blocks);
      v[4 + c] = __builtin_shuffle(p1, p3, even_blocks);
      v[12 + c] = __builtin_shuffle(p1, p3, odd_blocks);
    }
  }
}

// Tile buffers: a tile holds V * W rows; column c of a tile is the V vectors buf[c * V + v]
// (lane l of vector v is row v * W + l of the tile). V is QGOFT_VECS_SMALL_TILE when such a tile of
// width d fits in kSmallTileBytes (more rows per pair update amortise its index and coefficient
// loads), else QGOFT_VECS (the working set of a tile's backward stays in L1 / L2 for large d).
constexpr int64_t kSmallTileBytes = 32 * 1024;

template <class A>
constexpr int vecs_for(int64_t d) {
  return d * QGOFT_VECS_SMALL_TILE * int64_t(sizeof(Vec<A>)) <= kSmallTileBytes ? QGOFT_VECS_SMALL_TILE
                                                                               : QGOFT_VECS;
}

template <class A>
struct Buffer {
  Vec<A>* data = nullptr;
  explicit Buffer(int64_t vectors) {
    if (vectors == 0) return;
    // aligned_alloc wants a size that is a multiple of the alignment.
    const size_t bytes = (size_t(vectors) * sizeof(Vec<A>) + 63) / 64 * 64;
    data = static_cast<Vec<A>*>(std::aligned_alloc(64, bytes));
    if (data == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void zero(int64_t vectors) {  // memset(nullptr, 0, 0) is UB (empty buffers hold no allocation)
    if (vectors > 0) std::memset(static_cast<void*>(data), 0, size_t(vectors) * sizeof(Vec<A>));
  }
};

// Rows [0, nr) of x (row stride ld), nr <= V * W -> transposed tile; rows >= nr are zero.
template <int V, class S, class A>
void load_tile(const S* x, int64_t ld, int nr, int64_t d, Vec<A>* buf) {
  for (int v = 0; v < V; ++v) {
    const int vr = nr - v * W;  // rows of this vector slot
    const S* xv = x + int64_t(v) * W * ld;
    int64_t c = 0;
    if (vr <= 0) {
      for (; c < d; ++c) buf[c * V + v] = Vec<A>{};
      continue;
    }
    for (; c + W <= d; c += W) {
      Vec<A> t[W];
      for (int r = 0; r < W; ++r) t[r] = r < vr ? Io<S, A>::load(xv + r * ld + c) : Vec<A>{};
      transpose<A>(t);
      for (int k = 0; k < W; ++k) buf[(c + k) * V + v] = t[k];
    }
    for (; c < d; ++c) {
      Vec<A> t{};
      for (int r = 0; r < vr && r < W; ++r) t[r] = Io<S, A>::load1(xv + r * ld + c);
      buf[c * V + v] = t;
    }
  }
}

// Transposed tile -> rows [0, nr) of y (row stride ld).
template <int V, class S, class A>
void store_tile(const Vec<A>* buf, int nr, int64_t d, S* y, int64_t ld) {
  for (int v = 0; v < V; ++v) {
    const int vr = nr - v * W < W ? nr - v * W : W;
    if (vr <= 0) break;
    S* yv = y + int64_t(v) * W * ld;
    int64_t c = 0;
    for (; c + W <= d; c += W) {
      Vec<A> t[W];
      for (int k = 0; k < W; ++k) t[k] = buf[(c + k) * V + v];
      transpose<A>(t);
      for (int r = 0; r < vr; ++r) Io<S, A>::store(yv + r * ld + c, t[r]);
    }
    for (; c < d; ++c) {
      const Vec<A> t = buf[c * V + v];
      for (int r = 0; r < vr; ++r) Io<S, A>::store1(yv + r * ld + c, t[r]);
    }
  }
}

// x <- chain(x) on a tile (G_p^T for p ascending). With a tape, the inputs of block p are recorded
// in tape[(2p) * V + v], tape[(2p + 1) * V + v].
template <int V, class A, bool kTape>
inline void apply_chain(Vec<A>* buf, const int32_t* pairs, const A* blocks, int64_t num_pairs,
                        Vec<A>* tape) {
  for (int64_t p = 0; p < num_pairs; ++p) {
    Vec<A>* bi = buf + int64_t(pairs[2 * p]) * V;
    Vec<A>* bj = buf + int64_t(pairs[2 * p + 1]) * V;
    const A g00 = blocks[4 * p], g01 = blocks[4 * p + 1], g10 = blocks[4 * p + 2],
            g11 = blocks[4 * p + 3];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const Vec<A> xi = bi[v], xj = bj[v];
      if constexpr (kTape) {
        tape[2 * p * V + v] = xi;
        tape[(2 * p + 1) * V + v] = xj;
      }
      bi[v] = mul_add<A>(g00, xi, g10 * xj);
      bj[v] = mul_add<A>(g01, xi, g11 * xj);
    }
  }
}

// acc[0..3] += the lane sums of a, b, c, e, each summed in a fixed order: pairwise within every
// 128-bit group of 4 lanes (two shuffle-add steps that sum the four vectors at once), then over the
// groups in order. Keeping one scalar per block entry (instead of a vector of per-lane sums) keeps
// the accumulators of a tile's backward small enough to stay in L1 for every d.
template <class A>
inline void add_lane_sums(A* acc, Vec<A> a, Vec<A> b, Vec<A> c, Vec<A> e) {
  using M = Vec<typename SameSizeInt<A>::type>;
  constexpr auto seq = std::make_integer_sequence<int, W>{};
  // Within each group of 4 lanes: [x0 x2 y0 y2] and [x1 x3 y1 y3].
  constexpr M even = make_mask<M>([](int i) { return 4 * (i / 4) + 2 * (i % 2) + ((i % 4) / 2) * W; }, seq);
  constexpr M odd = make_mask<M>([](int i) { return 4 * (i / 4) + 2 * (i % 2) + 1 + ((i % 4) / 2) * W; }, seq);
  // Group k of ab: [a0+a1, a2+a3, b0+b1, b2+b3] of group k; then group k of s: [a, b, c, e] sums.
  const Vec<A> ab = __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
  const Vec<A> ce = __builtin_shuffle(c, e, even) + __builtin_shuffle(c, e, odd);
  const Vec<A> s = __builtin_shuffle(ab, ce, even) + __builtin_shuffle(ab, ce, odd);
  A t0 = s[0], t1 = s[1], t2 = s[2], t3 = s[3];
#pragma GCC unroll 4
  for (int k = 1; k < W / 4; ++k) {
    t0 += s[4 * k];
    t1 += s[4 * k + 1];
    t2 += s[4 * k + 2];
    t3 += s[4 * k + 3];
  }
  acc[0] += t0;
  acc[1] += t1;
  acc[2] += t2;
  acc[3] += t3;
}

// g <- chain^T(g) on a tile (G_p for p descending); with a tape, also accumulate
// acc[4p + 2r + c] += sum_rows u_r g_c (the gradient of block p's entries).
template <int V, class A, bool kAccumulate>
inline void apply_chain_transpose(Vec<A>* g, const int32_t* pairs, const A* blocks,
                                  int64_t num_pairs, const Vec<A>* tape, A* acc) {
  for (int64_t p = num_pairs - 1; p >= 0; --p) {
    Vec<A>* gi_ = g + int64_t(pairs[2 * p]) * V;
    Vec<A>* gj_ = g + int64_t(pairs[2 * p + 1]) * V;
    const A g00 = blocks[4 * p], g01 = blocks[4 * p + 1], g10 = blocks[4 * p + 2],
            g11 = blocks[4 * p + 3];
    Vec<A> a00{}, a01{}, a10{}, a11{};
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const Vec<A> gi = gi_[v], gj = gj_[v];
      if constexpr (kAccumulate) {
        const Vec<A> ui = tape[2 * p * V + v], uj = tape[(2 * p + 1) * V + v];
        a00 = mul_add<A>(ui, gi, a00);
        a01 = mul_add<A>(ui, gj, a01);
        a10 = mul_add<A>(uj, gi, a10);
        a11 = mul_add<A>(uj, gj, a11);
      }
      gi_[v] = mul_add<A>(g00, gi, g01 * gj);
      gj_[v] = mul_add<A>(g10, gi, g11 * gj);
    }
    if constexpr (kAccumulate) add_lane_sums(acc + 4 * p, a00, a01, a10, a11);
  }
}

template <int V, class A>
inline void apply_scale(Vec<A>* buf, const A* scale, int64_t d) {
  for (int64_t c = 0; c < d; ++c) {
    const A s = scale[c];
    for (int v = 0; v < V; ++v) buf[c * V + v] = s * buf[c * V + v];
  }
}

// Sum the lanes of n accumulator vectors in lane order into out[0..n).
template <class A>
void reduce_lanes(const Vec<A>* acc, int64_t n, A* out) {
  for (int64_t k = 0; k < n; ++k) {
    A s = acc[k][0];
    for (int l = 1; l < W; ++l) s += acc[k][l];
    out[k] = s;
  }
}

template <int V, class S, class A>
void forward_rows(const ChainParams& p, const S* x, int64_t x_ld, S* y, int64_t row_begin,
                  int64_t row_end) {
  const int64_t d = p.d;
  const A* blocks = static_cast<const A*>(p.blocks);
  const A* scale = static_cast<const A*>(p.scale);
  Buffer<A> buf(d * V);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += V * W) {
    const int nr = int(row_end - r0 < V * W ? row_end - r0 : V * W);
    load_tile<V, S, A>(x + r0 * x_ld, x_ld, nr, d, buf.data);
    apply_chain<V, A, false>(buf.data, p.pairs, blocks, p.num_pairs, nullptr);
    if (scale != nullptr) apply_scale<V, A>(buf.data, scale, d);
    store_tile<V, S, A>(buf.data, nr, d, y + r0 * d, d);
  }
}

template <int V, class S, class A>
void backward_rows(const ChainParams& p, const S* grad, int64_t grad_ld, const S* x, int64_t x_ld,
                   S* grad_x, int64_t row_begin, int64_t row_end, A* partial_blocks,
                   A* partial_scale) {
  const int64_t d = p.d, P = p.num_pairs;
  const A* blocks = static_cast<const A*>(p.blocks);
  const A* scale = static_cast<const A*>(p.scale);
  const bool want_blocks = partial_blocks != nullptr;
  const bool want_scale = partial_scale != nullptr && scale != nullptr;
  const bool need_forward = want_blocks || want_scale;

  Buffer<A> g(d * V);
  Buffer<A> z(need_forward ? d * V : 0);
  Buffer<A> tape(want_blocks ? 2 * P * V : 0);
  std::vector<A> acc(want_blocks ? 4 * P : 0, A(0));
  Buffer<A> acc_scale(want_scale ? d : 0);
  if (want_scale) acc_scale.zero(d);

  for (int64_t r0 = row_begin; r0 < row_end; r0 += V * W) {
    const int nr = int(row_end - r0 < V * W ? row_end - r0 : V * W);
    if (need_forward) {
      load_tile<V, S, A>(x + r0 * x_ld, x_ld, nr, d, z.data);
      if (want_blocks) {
        apply_chain<V, A, true>(z.data, p.pairs, blocks, P, tape.data);
      } else {
        apply_chain<V, A, false>(z.data, p.pairs, blocks, P, nullptr);
      }
    }
    load_tile<V, S, A>(grad + r0 * grad_ld, grad_ld, nr, d, g.data);
    if (scale != nullptr) {
      if (want_scale) {
        for (int64_t c = 0; c < d; ++c) {
          Vec<A> s = g.data[c * V] * z.data[c * V];
          for (int v = 1; v < V; ++v) s += g.data[c * V + v] * z.data[c * V + v];
          acc_scale.data[c] += s;
        }
      }
      apply_scale<V, A>(g.data, scale, d);
    }
    if (want_blocks) {
      apply_chain_transpose<V, A, true>(g.data, p.pairs, blocks, P, tape.data, acc.data());
    } else {
      apply_chain_transpose<V, A, false>(g.data, p.pairs, blocks, P, nullptr, nullptr);
    }
    if (grad_x != nullptr) store_tile<V, S, A>(g.data, nr, d, grad_x + r0 * d, d);
  }
  if (want_blocks) std::copy(acc.begin(), acc.end(), partial_blocks);
  if (want_scale) reduce_lanes<A>(acc_scale.data, d, partial_scale);
}

template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(static_cast<float*>(nullptr), static_cast<float*>(nullptr)); break;
    case DType::Float64: f(static_cast<double*>(nullptr), static_cast<double*>(nullptr)); break;
    case DType::BFloat16: f(static_cast<BF16*>(nullptr), static_cast<float*>(nullptr)); break;
    case DType::Float16: f(static_cast<F16*>(nullptr), static_cast<float*>(nullptr)); break;
  }
}

}  // namespace

int tile_rows(DType dtype, int64_t d) {
  return W * (dtype == DType::Float64 ? vecs_for<double>(d) : vecs_for<float>(d));
}

void chain_forward(const ChainParams& p, const void* x, int64_t x_ld, void* y, int64_t row_begin,
                   int64_t row_end) {
  dispatch_dtype(p.dtype, [&](auto* s_tag, auto* a_tag) {
    using S = std::remove_pointer_t<decltype(s_tag)>;
    using A = std::remove_pointer_t<decltype(a_tag)>;
    if (vecs_for<A>(p.d) == QGOFT_VECS_SMALL_TILE) {
      forward_rows<QGOFT_VECS_SMALL_TILE, S, A>(p, static_cast<const S*>(x), x_ld, static_cast<S*>(y),
                                                row_begin, row_end);
    } else {
      forward_rows<QGOFT_VECS, S, A>(p, static_cast<const S*>(x), x_ld, static_cast<S*>(y), row_begin,
                                     row_end);
    }
  });
}

void chain_backward(const ChainParams& p, const void* grad, int64_t grad_ld, const void* x,
                    int64_t x_ld, void* grad_x, int64_t row_begin, int64_t row_end,
                    void* partial_blocks, void* partial_scale) {
  dispatch_dtype(p.dtype, [&](auto* s_tag, auto* a_tag) {
    using S = std::remove_pointer_t<decltype(s_tag)>;
    using A = std::remove_pointer_t<decltype(a_tag)>;
    auto run = [&](auto vecs) {
      backward_rows<decltype(vecs)::value, S, A>(
          p, static_cast<const S*>(grad), grad_ld, static_cast<const S*>(x), x_ld,
          static_cast<S*>(grad_x), row_begin, row_end, static_cast<A*>(partial_blocks),
          static_cast<A*>(partial_scale));
    };
    if (vecs_for<A>(p.d) == QGOFT_VECS_SMALL_TILE) {
      run(std::integral_constant<int, QGOFT_VECS_SMALL_TILE>{});
    } else {
      run(std::integral_constant<int, QGOFT_VECS>{});
    }
  });
}

}  // namespace qgoft::cpu::QGOFT_ISA_NS
