// Runs the CUDA Givens-chain kernels (chain_kernels.cuh) and their launch planning (chain_plan.cpp) on the
// CPU through the host emulation in cuda_host_sim.h, and checks them against a float64 reference:
// forward, grad_x, block / angle / scale gradients, every path (parallel, segmented, stacked parallel,
// general in shared or global memory), every activation dtype, aligned and unaligned rows, the output masks; outputs and
// scratch buffers are poisoned with NaN bytes, shared memory too before every block; the backward runs
// twice and must be bitwise identical. No GPU and no torch needed:
//
//   g++ -std=c++20 -O2 -pthread -I/usr/local/cuda/include -Icsrc/cuda csrc/cuda/sim/sim_test.cpp \
//       csrc/cuda/chain_plan.cpp -o sim_test && ./sim_test [quick|full|reduce|tiny]
//
// (reduce: the planner checks and the reduction's cases of quick alone, seconds; butterfly: the planner checks and the
// butterfly forward's cases alone, about a minute)
//
// (tools/check_cuda_build.sh builds and runs it; add -fsanitize=thread for a race check.)
#include "cuda_host_sim.h"

#define QGOFT_CUDA_HOST_SIM 1
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>

#include "../chain_kernels.cuh"
#include "../chain_plan.h"

namespace qgoft::cuda::detail {
constexpr size_t kSimSmemBytes = 232448;  // an H100's opt-in limit per block
}  // namespace qgoft::cuda::detail

namespace {

using namespace qgoft::cuda;

template <class F>
void run_kernel(const LaunchConfig& c, F&& body) {
  if (c.smem > detail::kSimSmemBytes) {
    std::fprintf(stderr, "sim: kernel needs %zu bytes of shared memory\n", c.smem);
    std::abort();
  }
  // a fresh block's shared memory holds garbage: NaN bytes
  for (unsigned by = 0; by < c.grid.y; ++by) {
    for (unsigned bx = 0; bx < c.grid.x; ++bx) {
      std::unique_ptr<unsigned char[]> smem(new unsigned char[c.smem > 0 ? c.smem : 1]);
      std::memset(smem.get(), 0xFF, c.smem > 0 ? c.smem : 1);
      qgoft_sim::g_dynamic_smem = c.smem > 0 ? smem.get() : nullptr;
      qgoft_sim::g_dynamic_smem_bytes = c.smem;
      qgoft_sim::run_block(dim3(bx, by, 0), c.grid, c.threads, body);
      qgoft_sim::g_dynamic_smem = nullptr;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Layouts and the float64 reference.
// ------------------------------------------------------------------------------------------------
struct Layout {
  std::string name;
  int64_t d = 0;
  std::vector<int32_t> pairs;  // (P, 2)
  std::vector<int32_t> off;    // (L + 1)
  bool parallel = false;
  int reps = 0;  // k >= 2: stack(parallel(d), k)
  int64_t P() const { return static_cast<int64_t>(pairs.size() / 2); }
  int64_t L() const { return static_cast<int64_t>(off.size()) - 1; }
};

int ceil_log2(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return l;
}

Layout parallel_layout(int64_t d) {
  Layout l{"parallel", d, {}, {0}, true};
  for (int r = 1; r <= ceil_log2(d); ++r) {
    const int64_t h = int64_t(1) << (r - 1), step = int64_t(1) << r;
    for (int64_t i = 0; i + h < d; i += step) {
      l.pairs.push_back(static_cast<int32_t>(i));
      l.pairs.push_back(static_cast<int32_t>(i + h));
    }
    l.off.push_back(static_cast<int32_t>(l.P()));
  }
  return l;
}

Layout sequential_layout(int64_t d) {
  Layout l{"sequential", d, {}, {0}, false};
  for (int64_t k = 1; k < d; ++k) {
    l.pairs.push_back(static_cast<int32_t>(k - 1));
    l.pairs.push_back(static_cast<int32_t>(k));
    l.off.push_back(static_cast<int32_t>(l.P()));
  }
  return l;
}

Layout butterfly_layout(int64_t d) {
  Layout l{"butterfly", d, {}, {0}, false};
  for (int r = 1; r <= ceil_log2(d); ++r) {
    const int64_t bit = int64_t(1) << (r - 1);
    for (int64_t i = 0; i < d; ++i) {
      if (!(i & bit) && (i | bit) < d) {
        l.pairs.push_back(static_cast<int32_t>(i));
        l.pairs.push_back(static_cast<int32_t>(i | bit));
      }
    }
    l.off.push_back(static_cast<int32_t>(l.P()));
  }
  return l;
}

Layout stacked(const Layout& base, int times) {
  Layout l{base.name + "*" + std::to_string(times), base.d, {}, {0}, false, base.parallel && times > 1 ? times : 0};
  for (int t = 0; t < times; ++t) {
    for (int64_t r = 0; r < base.L(); ++r) {
      for (int64_t p = base.off[r]; p < base.off[r + 1]; ++p) {
        l.pairs.push_back(base.pairs[2 * p]);
        l.pairs.push_back(base.pairs[2 * p + 1]);
      }
      l.off.push_back(static_cast<int32_t>(l.P()));
    }
  }
  return l;
}

Layout custom_layout(int64_t d, std::mt19937_64& rng, int layers = 3) {
  Layout l{"custom", d, {}, {0}, false};
  for (int r = 0; r < layers; ++r) {
    std::vector<int32_t> perm(d);
    for (int64_t i = 0; i < d; ++i) perm[i] = static_cast<int32_t>(i);
    std::shuffle(perm.begin(), perm.end(), rng);
    const int64_t count = std::max<int64_t>(1, d / 3);
    for (int64_t k = 0; k < count && 2 * k + 1 < d; ++k) {
      l.pairs.push_back(std::min(perm[2 * k], perm[2 * k + 1]));
      l.pairs.push_back(std::max(perm[2 * k], perm[2 * k + 1]));
    }
    l.off.push_back(static_cast<int32_t>(l.P()));
  }
  return l;
}

struct Reference {
  std::vector<double> y, gx, gblocks, gangles, gscale;
};

// blocks: (P, 4) float64 values of the blocks the kernels use.
Reference reference(const Layout& lay, const std::vector<double>& x, const std::vector<double>& g,
                    int64_t rows, const std::vector<double>& blocks, const std::vector<double>* scale) {
  const int64_t d = lay.d, P = lay.P();
  Reference r;
  r.y.assign(rows * d, 0);
  r.gx.assign(rows * d, 0);
  r.gblocks.assign(4 * P, 0);
  r.gangles.assign(P, 0);
  r.gscale.assign(d, 0);
  std::vector<double> v(d), tape(2 * P), gg(d);
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t c = 0; c < d; ++c) v[c] = x[row * d + c];
    for (int64_t p = 0; p < P; ++p) {
      const int64_t i = lay.pairs[2 * p], j = lay.pairs[2 * p + 1];
      const double* b = &blocks[4 * p];
      tape[2 * p] = v[i];
      tape[2 * p + 1] = v[j];
      const double xi = v[i], xj = v[j];
      v[i] = b[0] * xi + b[2] * xj;
      v[j] = b[1] * xi + b[3] * xj;
    }
    for (int64_t c = 0; c < d; ++c) {
      const double s = scale ? (*scale)[c] : 1.0;
      r.y[row * d + c] = v[c] * s;
      r.gscale[c] += g[row * d + c] * v[c];
      gg[c] = g[row * d + c] * s;
    }
    for (int64_t p = P - 1; p >= 0; --p) {
      const int64_t i = lay.pairs[2 * p], j = lay.pairs[2 * p + 1];
      const double* b = &blocks[4 * p];
      const double gi = gg[i], gj = gg[j], ui = tape[2 * p], uj = tape[2 * p + 1];
      r.gblocks[4 * p] += ui * gi;
      r.gblocks[4 * p + 1] += ui * gj;
      r.gblocks[4 * p + 2] += uj * gi;
      r.gblocks[4 * p + 3] += uj * gj;
      gg[i] = b[0] * gi + b[1] * gj;
      gg[j] = b[2] * gi + b[3] * gj;
    }
    for (int64_t c = 0; c < d; ++c) r.gx[row * d + c] = gg[c];
  }
  for (int64_t p = 0; p < P; ++p) {
    const double c = blocks[4 * p], s = blocks[4 * p + 2];
    const double* a = &r.gblocks[4 * p];
    r.gangles[p] = -s * a[0] - c * a[1] + c * a[2] - s * a[3];
  }
  return r;
}

// ------------------------------------------------------------------------------------------------
// Element types.
// ------------------------------------------------------------------------------------------------
template <class S>
struct Traits;
template <>
struct Traits<float> {
  static constexpr DType dtype = DType::Float32;
  static constexpr const char* name = "float32";
  static float from(double v) { return static_cast<float>(v); }
  static double to(float v) { return v; }
  static double eps() { return 1.2e-7; }
};
template <>
struct Traits<double> {
  static constexpr DType dtype = DType::Float64;
  static constexpr const char* name = "float64";
  static double from(double v) { return v; }
  static double to(double v) { return v; }
  static double eps() { return 2.3e-16; }
};
template <>
struct Traits<__nv_bfloat16> {
  static constexpr DType dtype = DType::BFloat16;
  static constexpr const char* name = "bfloat16";
  static __nv_bfloat16 from(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
  static double to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static double eps() { return 1.0 / 128; }
};
template <>
struct Traits<__half> {
  static constexpr DType dtype = DType::Float16;
  static constexpr const char* name = "float16";
  static __half from(double v) { return __float2half_rn(static_cast<float>(v)); }
  static double to(__half v) { return __half2float(v); }
  static double eps() { return 1.0 / 1024; }
};

template <class T>
std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  if (n > 0) std::memset(static_cast<void*>(v.data()), 0xFF, n * sizeof(T));
  return v;
}

int g_failures = 0;
int g_cases = 0;
int g_failed_cases = 0;
int g_top_prefetch = 0;  // backward runs whose top pass ran the prefetching forward
int g_pair = 0;          // backward runs on the paired reg backward
int g_pair_one = 0;      // of them, on its instantiations without the scale's gradient (ParallelArgs::pair == 2)
int g_pair_no_l2 = 0;    // of those, on the one without the L2 prefetch (ParallelArgs::pair_prefetch == 0)
int g_top_saved = 0;     // backward runs on the forward's saved segment tops (no top pass)
int g_stack_reg = 0;     // backward runs on the reg stacked backward
int g_stack_prefetch = 0;  // forward runs of a stack on the prefetching forward (its kStack instantiation)
int g_butterfly = 0;     // forward runs on the butterfly kernel
int g_butterfly_backward = 0;  // backward runs on the butterfly backward kernel
int g_angle_sums = 0;          // of those, runs with goft's angle sums (BackwardPlan::angle_sums)
int g_angle_sums_scale = 0;    // and with the scale's second reduction

bool close_all(const char* what, const std::string& tag, const double* got, const std::vector<double>& want,
               double rtol, double atol_rel) {
  double big = 0;
  for (double w : want) big = std::max(big, std::fabs(w));
  const double atol = atol_rel * big + 1e-12;
  for (size_t k = 0; k < want.size(); ++k) {
    const double diff = std::fabs(got[k] - want[k]);
    if (!(diff <= atol + rtol * std::fabs(want[k]))) {
      std::fprintf(stderr, "FAIL %s: %s[%zu] got %.10g want %.10g (rtol %g atol %g)\n", tag.c_str(), what, k,
                   got[k], want[k], rtol, atol);
      ++g_failures;
      return false;
    }
  }
  return true;
}

struct Options {
  bool quasi = true;
  bool with_scale = true;
  int64_t rows = 5;
  int64_t pad = 0;     // extra elements per input row (row stride d + pad)
  int64_t offset = 0;  // elements before the first input row (0: 16-byte aligned)
  bool mask_x = true, mask_params = true, mask_scale = true;
  bool backward = true;  // false: the forward only
  Knobs knobs = {ForcedPath::Auto, 0, Variant::Base, XorPath::Fused, ForwardKernel::Plain, ReduceKind::FromEnv,
                 RegBackward::Single};
  int sm_count = 3;  // of the emulated device (sim_limits): more SMs, more slots (partial rows) to reduce
};

// The problem the glue would describe for this layout and these rows (pointers set by the caller).
Problem make_problem(DType dtype, const Layout& lay, int64_t rows) {
  Problem p;
  p.dtype = dtype;
  p.rows = rows;
  p.d = lay.d;
  p.num_pairs = lay.P();
  p.num_layers = lay.L();
  p.parallel_layout = lay.parallel;
  p.parallel_reps = lay.reps;
  p.butterfly_reps = lay.reps > 0 ? 0 : butterfly_reps(lay.pairs.data(), lay.off.data(), lay.P(), lay.L(), lay.d);  // as the glue
  return p;
}

// The parallel (a.reps > 1: stacked) kernels' instantiation for a plan's switches, run over the plan's grid.
template <class S, bool kVec, bool kTable>
void parallel_forward_instance(const ParallelArgs& a) {
  // a.reps > 1: a stack, in the same kernel with its repetition loop (forward_rep_loop, as the launcher)
  if constexpr (kTable) {
    detail::parallel_forward_kernel<S, kVec, true, true>(a);
  } else {
    if (detail::forward_rep_loop(a)) detail::parallel_forward_kernel<S, kVec, false, true>(a);
    else detail::parallel_forward_kernel<S, kVec, false, false>(a);
  }
}
template <class S, bool kVec, bool kGrads, bool kTable>
void parallel_backward_instance(const ParallelArgs& a) {
  if constexpr (sizeof(S) == 2 && kVec && kGrads) {  // the paired reg backward (reg_pair_applies)
    if (a.pair > 0) {
      if (a.pair == 2 && a.nseg == 1) {  // as parallel_backward_for (chain_launch.cuh)
        if (a.pair_prefetch) detail::parallel_backward_pair_kernel<S, false, false>(a);
        else detail::parallel_backward_pair_kernel<S, false, false, false>(a);
      } else if (a.pair == 2) {
        detail::parallel_backward_pair_kernel<S, true, false>(a);
      } else {
        detail::parallel_backward_pair_kernel<S, true, true>(a);
      }
      return;
    }
  }
  if (a.pair > 0) {
    std::fprintf(stderr, "sim: a paired reg backward planned outside reg_pair_applies\n");
    std::abort();
  }
  if (a.reps > 1 && a.reg > 0) {  // the reg stacked backward (stack_reg_applies)
    if constexpr (kVec && kGrads && sizeof(typename detail::Elem<S>::A) == 4) {
      detail::parallel_stack_reg_kernel<S>(a);
      return;
    }
    std::fprintf(stderr, "sim: a reg stacked backward planned outside stack_reg_applies\n");
    std::abort();
  }
  if (a.reg > 0 && detail::reg_fixed_width(a)) detail::parallel_backward_reg_kernel<S, kVec, kGrads, detail::kRegLogT>(a);
  else if (a.reg > 0) detail::parallel_backward_reg_kernel<S, kVec, kGrads, 0>(a);
  else if (a.reps > 1) detail::parallel_stack_backward_kernel<S, kVec, kGrads, kTable>(a);
  else detail::parallel_backward_kernel<S, kVec, kGrads, kTable>(a);
}
template <class S>
void run_parallel_forward(const LaunchConfig& c, bool vec, const ParallelArgs& a) {
  run_kernel(c, [&] {
    if (a.prefetch > 0) {
      if (a.reps > 1 && detail::reg_fixed_width(a)) detail::parallel_forward_prefetch_kernel<S, detail::kRegLogT, true>(a);
      else if (a.reps > 1) detail::parallel_forward_prefetch_kernel<S, 0, true>(a);
      else if (detail::reg_fixed_width(a)) detail::parallel_forward_prefetch_kernel<S, detail::kRegLogT>(a);
      else detail::parallel_forward_prefetch_kernel<S, 0>(a);
    } else if (a.table > 0) {
      if (vec) parallel_forward_instance<S, true, true>(a);
      else parallel_forward_instance<S, false, true>(a);
    } else {
      if (vec) parallel_forward_instance<S, true, false>(a);
      else parallel_forward_instance<S, false, false>(a);
    }
  });
}
template <class S, bool kTable>
void run_parallel_backward(const LaunchConfig& c, bool vec, bool grads, const ParallelArgs& a) {
  run_kernel(c, [&] {
    if (vec && grads) parallel_backward_instance<S, true, true, kTable>(a);
    else if (vec) parallel_backward_instance<S, true, false, kTable>(a);
    else if (grads) parallel_backward_instance<S, false, true, kTable>(a);
    else parallel_backward_instance<S, false, false, kTable>(a);
  });
}

// The butterfly forward's instantiation for a plan (as the launcher: butterfly_fixed_width, vec), over its grid.
template <class S>
void run_butterfly_forward(const LaunchConfig& c, bool vec, const GeneralArgs& a) {
  run_kernel(c, [&] {
    const bool fixed = detail::butterfly_fixed_width(a);
    if (vec && fixed) detail::butterfly_forward_kernel<S, true, detail::kButterflyMaxLogD>(a);
    else if (vec) detail::butterfly_forward_kernel<S, true, 0>(a);
    else if (fixed) detail::butterfly_forward_kernel<S, false, detail::kButterflyMaxLogD>(a);
    else detail::butterfly_forward_kernel<S, false, 0>(a);
  });
}

// The butterfly backward's instantiation for a plan (as the launcher: vec, grads).
template <class S>
void run_butterfly_backward(const LaunchConfig& c, bool vec, bool grads, const GeneralArgs& a) {
  run_kernel(c, [&] {
    if (vec && grads) detail::butterfly_backward_kernel<S, true, true, 0>(a);
    else if (vec) detail::butterfly_backward_kernel<S, true, false, 0>(a);
    else if (grads) detail::butterfly_backward_kernel<S, false, true, 0>(a);
    else detail::butterfly_backward_kernel<S, false, false, 0>(a);
  });
}

// The planning limits of an emulated device of sm_count SMs with kSimSmemBytes (227 KiB) of shared memory per
// block: run_case's (3 SMs) and an H100's (132 SMs, for the planner checks).
Limits sim_limits(int sm_count = 3) {
  Limits lim;
  lim.sm_count = sm_count;
  lim.smem_optin = static_cast<int64_t>(detail::kSimSmemBytes);
  return lim;
}
Limits h100_limits() { return sim_limits(132); }
// An occupancy function (OccupancyFn) of N backward blocks per SM whatever the kernel: run_case's device (2), the
// planner checks (1 as a 512-thread block of 128 registers on an H100, 2 for 256-thread blocks).
template <int N>
int blocks_per_sm(BackwardKernel, bool, bool, int, size_t, const ParallelArgs&) {
  return N;
}

// Runs forward + backward (o.backward) through plan + kernels, like chain_cuda.cpp, and checks them. Returns
// the forward's output, then the backward's results (grad_x, parameter and scale gradients as computed),
// widened to double.
template <class S>
std::vector<double> run_case(const Layout& lay, const Options& o, std::mt19937_64& rng) {
  using A = typename detail::Elem<S>::A;
  ++g_cases;
  const int64_t d = lay.d, P = lay.P(), rows = o.rows;
  const int64_t ld = d + o.pad;
  std::normal_distribution<double> normal;
  std::string tag = std::string(Traits<S>::name) + " " + lay.name + " d=" + std::to_string(d) +
                    " rows=" + std::to_string(rows) + (o.quasi ? " quasi" : " givens") +
                    (o.with_scale ? "+scale" : "") + " pad=" + std::to_string(o.pad) +
                    " off=" + std::to_string(o.offset) + " path=" + std::to_string(int(o.knobs.path)) +
                    " variant=" + std::to_string(int(o.knobs.variant)) +
                    " forward=" + std::to_string(int(o.knobs.forward)) +
                    " backward=" + std::to_string(int(o.knobs.backward)) +
                    " seg=" + std::to_string(o.knobs.segment) + " sms=" + std::to_string(o.sm_count) +
                    " reduce=" + std::to_string(int(o.knobs.reduce)) + " mask=" + std::to_string(o.mask_x) +
                    std::to_string(o.mask_params) + std::to_string(o.mask_scale);

  // inputs (S), rows with stride ld starting at `offset`
  const int64_t in_elems = rows > 0 ? o.offset + (rows - 1) * ld + d : 0;  // exact: ASan sees overruns
  std::vector<S> xs(in_elems), gs(in_elems);
  std::vector<double> x(rows * d), g(rows * d);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < d; ++c) {
      xs[o.offset + r * ld + c] = Traits<S>::from(normal(rng));
      gs[o.offset + r * ld + c] = Traits<S>::from(normal(rng));
      x[r * d + c] = Traits<S>::to(xs[o.offset + r * ld + c]);
      g[r * d + c] = Traits<S>::to(gs[o.offset + r * ld + c]);
    }
  }
  // parameters in A (as the glue prepares them)
  std::vector<A> blocks(4 * P);
  std::vector<A> angles(P);
  if (o.quasi) {
    for (int64_t p = 0; p < P; ++p) {
      blocks[4 * p] = A(1 + 0.5 * normal(rng));
      blocks[4 * p + 1] = A(0.5 * normal(rng));
      blocks[4 * p + 2] = A(0.5 * normal(rng));
      blocks[4 * p + 3] = A(1 + 0.5 * normal(rng));
    }
  } else {
    for (int64_t p = 0; p < P; ++p) angles[p] = A(1.5 * normal(rng));
    GivensArgs ga;
    ga.angles = angles.data();
    ga.blocks = blocks.data();
    ga.num_pairs = P;
    LaunchConfig c;
    c.grid = dim3(2);
    c.threads = 64;
    run_kernel(c, [&] { detail::givens_blocks_kernel<A, A>(ga); });
  }
  std::vector<A> scale(d);
  for (int64_t c = 0; c < d; ++c) scale[c] = A(1 + 0.3 * normal(rng));
  std::vector<double> blocks64(4 * P), scale64(d);
  for (int64_t k = 0; k < 4 * P; ++k) blocks64[k] = blocks[k];
  for (int64_t c = 0; c < d; ++c) scale64[c] = scale[c];
  if (!o.quasi) {
    for (int64_t p = 0; p < P; ++p) {
      const double c = std::cos(double(angles[p])), s = std::sin(double(angles[p]));
      const double want[4] = {c, -s, s, c};
      for (int k = 0; k < 4; ++k) {
        if (std::fabs(blocks64[4 * p + k] - want[k]) > 4 * Traits<A>::eps()) {
          std::fprintf(stderr, "FAIL %s: givens block %lld[%d] = %.10g, want %.10g\n", tag.c_str(),
                       (long long)p, k, blocks64[4 * p + k], want[k]);
          ++g_failures;
          return {};
        }
      }
    }
  }
  const Reference want = reference(lay, x, g, rows, blocks64, o.with_scale ? &scale64 : nullptr);

  Limits lim = sim_limits();
  lim.sm_count = o.sm_count;
  const double rtol_out = std::is_same_v<S, double> ? 1e-11 : std::is_same_v<S, float> ? 2e-5 : Traits<S>::eps();
  const double atol_out = std::is_same_v<S, double> ? 1e-11 : 2e-5;
  const double rtol_par = std::is_same_v<A, double> ? 1e-10 : 1e-4;

  // ---- forward ----
  std::vector<double> result(rows * d);
  std::vector<A> saved_tops;  // the forward's segment tops where its plan keeps them for the backward
  int64_t saved_cols = 0;
  {
    std::vector<S> y = poisoned<S>(rows * d);
    Problem p = make_problem(Traits<S>::dtype, lay, rows);
    p.x = xs.data() + o.offset;
    p.x_ld = ld;
    p.out = y.data();
    ForwardPlan plan = plan_forward(p, lim, o.knobs);
    tag += " | fwd " + plan.describe;
    plan.pa.blocks = plan.ga.blocks = blocks.data();
    plan.pa.scale = plan.ga.scale = o.with_scale ? scale.data() : nullptr;
    plan.ga.pairs = lay.pairs.data();
    plan.ga.offsets = lay.off.data();
    std::vector<A> top = poisoned<A>(plan.top_elems), ws = poisoned<A>(plan.workspace_elems);
    if (plan.parallel && plan.pa.reps > 1 && plan.pa.prefetch > 0) ++g_stack_prefetch;
    if (plan.butterfly) {
      ++g_butterfly;
      run_butterfly_forward<S>(plan.main, plan.vec, plan.ga);
    } else if (plan.parallel) {
      plan.pa.top = top.data();
      run_parallel_forward<S>(plan.main, plan.vec, plan.pa);
      if (plan.top_pass) run_kernel(plan.top, [&] { detail::parallel_top_forward_kernel<S>(plan.pa); });
      if (plan.tops_for_backward) {  // as the glue's *_with_tops: the buffer after the top kernel
        saved_tops = top;
        saved_cols = plan.pa.nseg;
      }
    } else {
      if (plan.workspace_elems) plan.ga.workspace = ws.data();
      run_kernel(plan.main, [&] { detail::general_forward_kernel<S>(plan.ga); });
    }
    for (int64_t k = 0; k < rows * d; ++k) result[k] = Traits<S>::to(y[k]);
    close_all("y", tag, result.data(), want.y, rtol_out, atol_out);
  }
  if (!o.backward) return result;

  // ---- backward (twice: bitwise identical; the second on the forward's saved segment tops where it kept them) ----
  std::vector<double> first;
  bool second_on_saved_tops = false;
  for (int rep = 0; rep < 2; ++rep) {
    std::vector<S> gx = poisoned<S>(rows * d);
    Problem p = make_problem(Traits<S>::dtype, lay, rows);
    p.grad = gs.data() + o.offset;
    p.grad_ld = ld;
    p.out = o.mask_x ? gx.data() : nullptr;
    p.want_x = o.mask_x;
    p.want_blocks = o.mask_params;
    p.want_scale = o.mask_scale && o.with_scale;
    p.givens = !o.quasi;
    const bool grads = p.want_blocks || p.want_scale;
    if (grads) {
      p.x = xs.data() + o.offset;
      p.x_ld = ld;
    }
    if (!p.want_x && !grads) return result;
    if (rep == 1 && saved_cols > 0) {  // as autograd: the backward op given the forward's tops
      p.tops = saved_tops.data();
      p.tops_cols = saved_cols;
    }
    BackwardPlan plan = plan_backward(p, lim, o.knobs, blocks_per_sm<2>);
    if (plan.top_pass && plan.top_prefetch) ++g_top_prefetch;
    if (plan.pa.pair > 0) ++g_pair;
    if (plan.pa.pair == 2) ++g_pair_one;
    if (plan.pa.pair_prefetch == 0) ++g_pair_no_l2;
    if (plan.pa.reps > 1 && plan.pa.reg > 0) ++g_stack_reg;
    const std::string btag = tag + " | bwd " + plan.describe;
    // the plan takes the given tops exactly where it needs that many (no top pass then), and the forward keeps
    // them wherever a backward with gradients needs them under a table variant (the forward's segments are 4096)
    if (p.tops != nullptr && plan.top_cols > 0 &&
        (plan.top_cols != saved_cols || !plan.top_saved || plan.top_pass || plan.pa.top != p.tops)) {
      std::fprintf(stderr, "FAIL %s: saved tops (%lld columns) not used as planned\n", btag.c_str(), (long long)saved_cols);
      ++g_failures;
    }
    if (plan.top_saved && p.tops == nullptr) {
      std::fprintf(stderr, "FAIL %s: top_saved without tops\n", btag.c_str());
      ++g_failures;
    }
    if (rep == 0 && plan.top_pass && plan.pa.reps == 1 && o.knobs.variant != Variant::Base && saved_cols == 0) {
      std::fprintf(stderr, "FAIL %s: the forward kept no tops for a backward that needs them\n", btag.c_str());
      ++g_failures;
    }
    second_on_saved_tops = second_on_saved_tops || plan.top_saved;
    if (plan.top_saved) ++g_top_saved;
    plan.pa.blocks = plan.ga.blocks = blocks.data();
    plan.pa.scale = plan.ga.scale = o.with_scale ? scale.data() : nullptr;
    plan.ga.pairs = lay.pairs.data();
    plan.ga.offsets = lay.off.data();
    std::vector<A> partial = poisoned<A>(plan.slots * plan.partial_ld);
    std::vector<A> top = poisoned<A>(plan.top_elems), ws = poisoned<A>(plan.workspace_elems);
    plan.pa.partial = plan.ga.partial = partial.data();
    // a stack's second run recomputes its earlier repetitions' tapes (the same values: bitwise equal results)
    if (rep == 1) plan.pa.stack_tape = 0;
    if (plan.butterfly) {
      ++g_butterfly_backward;
      run_butterfly_backward<S>(plan.main, plan.vec, plan.grads, plan.ga);
    } else if (plan.parallel) {
      if (!plan.top_saved) plan.pa.top = top.data();
      if (plan.top_pass) run_parallel_forward<S>(plan.top, plan.vec, plan.top_args());  // as the glue
      // the top pass recomputes exactly what the forward kept (same segments, blocks and arithmetic)
      if (plan.top_pass && saved_cols > 0 &&
          (top.size() != saved_tops.size() ||
           std::memcmp(top.data(), saved_tops.data(), top.size() * sizeof(A)) != 0)) {
        std::fprintf(stderr, "FAIL %s: the top pass's segment tops not bitwise the forward's\n", btag.c_str());
        ++g_failures;
      }
      if (plan.pa.table > 0) run_parallel_backward<S, true>(plan.main, plan.vec, plan.grads, plan.pa);
      else run_parallel_backward<S, false>(plan.main, plan.vec, plan.grads, plan.pa);
    } else {
      if (plan.workspace_elems) plan.ga.workspace = ws.data();
      if (plan.grads) run_kernel(plan.main, [&] { detail::general_backward_kernel<S, true>(plan.ga); });
      else run_kernel(plan.main, [&] { detail::general_backward_kernel<S, false>(plan.ga); });
    }
    std::vector<A> gparams = poisoned<A>(o.quasi ? 4 * P : P), gscale = poisoned<A>(d);
    if (plan.grads) {
      // as the glue: the planner's arguments and launches, the pointers set here
      plan.set_reduce_outputs(partial.data(), blocks.data(), p.want_blocks ? gparams.data() : nullptr,
                              p.want_scale ? gscale.data() : nullptr);
      const ReduceArgs& ra = plan.ra;
      if (o.quasi || plan.angle_sums) run_kernel(plan.reduce, [&] { detail::reduce_partials_kernel<A, false>(ra); });
      else run_kernel(plan.reduce, [&] { detail::reduce_partials_kernel<A, true>(ra); });
      if (plan.reduce_scale_launch) {
        if (!plan.angle_sums) {
          std::fprintf(stderr, "FAIL %s: a second reduction without angle sums\n", btag.c_str());
          ++g_failures;
        }
        run_kernel(plan.reduce_scale, [&] { detail::reduce_partials_kernel<A, false>(plan.ra_scale); });
        ++g_angle_sums_scale;
      }
      if (plan.angle_sums) ++g_angle_sums;
    }
    std::vector<double> all;
    if (p.want_x) {
      std::vector<double> gx64(rows * d);
      for (int64_t k = 0; k < rows * d; ++k) gx64[k] = Traits<S>::to(gx[k]);
      close_all("grad_x", btag, gx64.data(), want.gx, rtol_out, atol_out);
      all.insert(all.end(), gx64.begin(), gx64.end());
    }
    if (p.want_blocks) {
      std::vector<double> gp64(o.quasi ? 4 * P : P);
      for (size_t k = 0; k < gp64.size(); ++k) gp64[k] = gparams[k];
      close_all(o.quasi ? "grad_blocks" : "grad_angles", btag, gp64.data(), o.quasi ? want.gblocks : want.gangles,
                rtol_par, rtol_par);
      all.insert(all.end(), gp64.begin(), gp64.end());
    }
    if (p.want_scale) {
      std::vector<double> gs64(d);
      for (int64_t c = 0; c < d; ++c) gs64[c] = gscale[c];
      close_all("grad_scale", btag, gs64.data(), want.gscale, rtol_par, rtol_par);
      all.insert(all.end(), gs64.begin(), gs64.end());
    }
    if (rep == 0) {
      first = all;
    } else if (first.size() != all.size() ||
               (!all.empty() && std::memcmp(first.data(), all.data(), all.size() * sizeof(double)) != 0)) {
      std::fprintf(stderr, "FAIL %s: backward not bitwise reproducible%s\n", btag.c_str(),
                   second_on_saved_tops ? " (second run on the forward's saved tops, first with the top pass)" : "");
      ++g_failures;
    }
  }
  result.insert(result.end(), first.begin(), first.end());
  return result;
}

// Whether run_case_counted also runs a case's forward with QGOFT_CUDA_FORWARD=prefetch: the single parallel
// layout or a stack of it under a table variant with the plain forward (the planner takes the prefetching forward
// where the table fits and rows are 16-byte aligned, a stack's kStack instantiation where its rows are whole;
// elsewhere both runs are the plain forward; a stack's plain forward under reg is base's).
bool prefetch_too(const Layout& lay, const Options& o) {
  return (lay.parallel || lay.reps > 1) && o.knobs.forward == ForwardKernel::Plain && o.knobs.path == ForcedPath::Auto &&
         (o.knobs.variant == Variant::Table || o.knobs.variant == Variant::Reg);
}

// Whether a case's backward has a top pass (segmented parallel rows with parameter gradients), as planned: the
// only part of the backward QGOFT_CUDA_FORWARD changes.
template <class S>
bool backward_top_pass(const Layout& lay, const Options& o) {
  Problem p = make_problem(Traits<S>::dtype, lay, o.rows);
  p.want_x = o.mask_x;
  p.want_blocks = o.mask_params;
  p.want_scale = o.mask_scale && o.with_scale;
  return o.backward && plan_backward(p, sim_limits(), o.knobs, blocks_per_sm<2>).top_pass;
}

// A case's backward Problem as run_case plans it: its masks, and its rows' stride and alignment (placeholder
// pointers aligned as run_case's rows).
template <class S>
Problem backward_problem(const Layout& lay, const Options& o) {
  Problem p = make_problem(Traits<S>::dtype, lay, o.rows);
  p.want_x = o.mask_x;
  p.want_blocks = o.mask_params;
  p.want_scale = o.mask_scale && o.with_scale;
  p.givens = !o.quasi;
  p.grad = p.x = p.out = reinterpret_cast<const void*>(uintptr_t(o.offset == 0 ? 4096 : 4098));
  p.grad_ld = p.x_ld = lay.d + o.pad;
  return p;
}

// The paired reg backward a case's backward runs under QGOFT_CUDA_BACKWARD=`backward` (ParallelArgs::pair: 0 none, 1
// its instantiation for any masks, 2 those without the scale's gradient), as planned; 0 for a case not run with the
// knob single.
template <class S>
int pair_planned(const Layout& lay, const Options& o, RegBackward backward = RegBackward::Pair) {
  if (!o.backward || o.knobs.variant != Variant::Reg || o.knobs.backward != RegBackward::Single) return 0;
  const Problem p = backward_problem<S>(lay, o);
  Knobs k = o.knobs;
  k.backward = backward;
  return plan_backward(p, sim_limits(), k, blocks_per_sm<2>).pa.pair;
}

// Whether a case's backward under QGOFT_CUDA_BACKWARD=pair with QGOFT_CUDA_PAIR_PREFETCH=off runs the paired kernel's
// instantiation without the L2 prefetch (pair=2, rows of one segment), as planned.
template <class S>
bool pair_no_l2_planned(const Layout& lay, const Options& o) {
  if (pair_planned<S>(lay, o) != 2) return false;
  Knobs k = o.knobs;
  k.backward = RegBackward::Pair;
  k.pair_prefetch = PairPrefetch::Off;
  return plan_backward(backward_problem<S>(lay, o), sim_limits(), k, blocks_per_sm<2>).pa.pair_prefetch == 0;
}

// Whether a case's backward runs the reg stacked backward (a stack under reg where stack_reg_applies and its shared
// memory fits), as planned.
template <class S>
bool stack_reg_runs(const Layout& lay, const Options& o) {
  if (!o.backward || lay.reps < 2 || o.knobs.variant != Variant::Reg || o.knobs.path != ForcedPath::Auto) return false;
  const BackwardPlan plan = plan_backward(backward_problem<S>(lay, o), sim_limits(), o.knobs, blocks_per_sm<2>);
  return plan.parallel && plan.pa.reps > 1 && plan.pa.reg > 0;
}

// Whether a case's forward runs the butterfly kernel, as planned.
template <class S>
bool butterfly_fused(const Layout& lay, const Options& o) {
  Problem p = make_problem(Traits<S>::dtype, lay, o.rows);
  Limits lim = sim_limits();
  lim.sm_count = o.sm_count;
  return plan_forward(p, lim, o.knobs).butterfly;
}

// Whether a case's backward runs the butterfly backward kernel, as planned.
template <class S>
bool butterfly_backward_fused(const Layout& lay, const Options& o) {
  if (!o.backward) return false;
  Limits lim = sim_limits();
  lim.sm_count = o.sm_count;
  return plan_backward(backward_problem<S>(lay, o), lim, o.knobs, blocks_per_sm<2>).butterfly;
}

// run_case, counted as a failed case when any of its checks failed. vs_table (the reg variant): the same
// inputs through the table variant too, whose backward must give bitwise the same results (the reg kernel
// does the table kernel's arithmetic in the same order). prefetch_too: the same inputs' forward, and the
// backward where it has a top pass, through the prefetching forward too, whose results must be bitwise the
// plain forward's (same arithmetic, same order). pair_planned: the same inputs through the paired reg backward
// (QGOFT_CUDA_BACKWARD=pair; without the scale's gradient also under auto, the other instantiation, and for rows of
// one segment with QGOFT_CUDA_PAIR_PREFETCH=off, the instantiation without the L2 prefetch: pair_no_l2_planned),
// whose results must be bitwise the reg kernel's (same arithmetic, same row order).
// stack_reg_runs: the same inputs through the base variant (the stacked kernel of chain_stack.cuh, which reg ran
// before), whose results must be bitwise the reg stacked backward's (same products, same rows per block, same order).
// butterfly_fused: the same inputs on the general kernels too (QGOFT_CUDA_XOR=general), whose results must be
// bitwise the butterfly forward's (same products, same layer order) and its backward's where that is the general
// kernels'; where the backward runs the butterfly backward kernel, its grad_x (same products, same layer order; the
// parameter gradients are sums over other rows per slot: against the reference only, in run_case).
template <class S>
void run_case_counted(const Layout& lay, const Options& o, std::mt19937_64& rng, bool vs_table = false) {
  const int before = g_failures;
  const std::mt19937_64 inputs = rng;  // the case's inputs, for the runs that must give bitwise its results
  const std::vector<double> got = run_case<S>(lay, o, rng);
  // the same inputs under `other`: its results (all of them, or with `prefix` its first ones) bitwise `got`'s
  // (count: only the first `count` results of both, e.g. y and grad_x)
  auto same_as = [&](const Options& other, bool prefix, const char* what, size_t count = SIZE_MAX) {
    std::mt19937_64 same = inputs;
    std::vector<double> want = run_case<S>(lay, other, same);
    --g_cases;
    if (count != SIZE_MAX && want.size() >= count && got.size() >= count) {
      want.resize(count);
      prefix = true;
    }
    if ((prefix ? got.size() < want.size() : got.size() != want.size()) ||
        (!want.empty() && std::memcmp(got.data(), want.data(), want.size() * sizeof(double)) != 0)) {
      std::fprintf(stderr, "FAIL %s d=%lld rows=%lld variant=%d seg=%d masks=%d%d%d backward=%d: %s\n", Traits<S>::name,
                   (long long)lay.d, (long long)o.rows, int(o.knobs.variant), o.knobs.segment, int(o.mask_x),
                   int(o.mask_params), int(o.mask_scale), int(other.backward), what);
      ++g_failures;
    }
  };
  if (stack_reg_runs<S>(lay, o)) {
    Options b = o;
    b.knobs.variant = Variant::Base;
    same_as(b, false, "reg stacked backward not bitwise equal to the stacked kernel's");
  }
  if (const int pair = pair_planned<S>(lay, o); pair > 0) {
    Options q = o;
    q.knobs.backward = RegBackward::Pair;
    same_as(q, false, "paired reg backward not bitwise equal to the reg kernel's");
    // without the scale's gradient: also the instantiation for any masks, which the default (auto) runs
    if (pair == 2 && pair_planned<S>(lay, o, RegBackward::Auto) == 1) {
      q.knobs.backward = RegBackward::Auto;
      same_as(q, false, "paired reg backward (any masks' instantiation) not bitwise equal to the reg kernel's");
    }
    if (pair_no_l2_planned<S>(lay, o)) {  // a prefetch changes no result: bitwise the reg kernel's too
      q.knobs.backward = RegBackward::Pair;
      q.knobs.pair_prefetch = PairPrefetch::Off;
      same_as(q, false, "paired reg backward without the L2 prefetch not bitwise equal to the reg kernel's");
    }
  }
  if (prefetch_too(lay, o)) {
    Options f = o;
    f.knobs.forward = ForwardKernel::Prefetch;
    f.backward = backward_top_pass<S>(lay, o);
    same_as(f, true, "prefetching forward not bitwise equal to the plain one");
  }
  if (vs_table) {
    Options t = o;
    t.knobs.variant = Variant::Table;
    same_as(t, false, "backward not bitwise equal to the table variant's");
  }
  if (butterfly_fused<S>(lay, o)) {
    Options gen = o;
    gen.knobs.xor_path = XorPath::General;
    if (butterfly_backward_fused<S>(lay, o)) {  // y and grad_x (where wanted)
      const size_t count = static_cast<size_t>(o.rows * lay.d) * (o.mask_x ? 2 : 1);
      same_as(gen, true, "butterfly forward or backward's grad_x not bitwise equal to the general kernels'", count);
    } else {
      same_as(gen, false, "butterfly forward not bitwise equal to the general forward's");
    }
  }
  if (g_failures != before) ++g_failed_cases;
}

template <class S>
void run_all_masks(const Layout& lay, Options o, std::mt19937_64& rng, bool vs_table = false) {
  run_case_counted<S>(lay, o, rng, vs_table);
  for (auto [mx, mp, ms] : {std::tuple{true, false, false}, std::tuple{false, true, false},
                            std::tuple{false, false, true}}) {
    o.mask_x = mx;
    o.mask_params = mp;
    o.mask_scale = ms;
    run_case_counted<S>(lay, o, rng, vs_table);
  }
}

// The reg variant's instantiation for 512-thread segments (reg_fixed_width): rows of 4096 (every mask) and
// segmented rows of 4100 (scalar loads) and 4104 (16-byte loads), goft, goft_scaled and qgoft; each also
// through the table variant, bitwise equal.
template <class S>
void reg_fixed_width_cases(std::mt19937_64& rng) {
  Options o;
  o.knobs.variant = Variant::Reg;
  o.rows = 3;
  run_all_masks<S>(parallel_layout(4096), o, rng, true);
  for (bool quasi : {true, false}) {
    o.quasi = quasi;
    o.with_scale = !quasi;
    o.rows = 2;
    run_all_masks<S>(parallel_layout(4104), o, rng, true);
    o.with_scale = quasi;
    run_case_counted<S>(parallel_layout(4100), o, rng, true);
  }
}

// The reg stacked backward (stack(parallel(d), 2) under reg, float accumulation, 16-byte rows, rows of 2049-4096
// elements): d = 4096 (every mask; goft, goft_scaled, qgoft, qgoft_scaled), blocks that own several rows (13 and 8
// rows over the emulated 6 blocks), d = 4000 (chunks past the row: the zero chunks' pairs accumulate only zeros into
// pairs never written out) and 2056 (257 of 512 threads in the row), each also through the base variant, bitwise
// equal (run_case_counted); and where the planner keeps the stacked kernel under reg (unaligned rows, k = 3 whose
// shared memory does not fit, rows of 2048), which must match the reference too.
template <class S>
void stack_reg_cases(std::mt19937_64& rng) {
  Options o;
  o.knobs.variant = Variant::Reg;
  o.rows = 3;
  run_all_masks<S>(stacked(parallel_layout(4096), 2), o, rng);
  for (auto [d, rows, quasi, scale] : {std::tuple<int64_t, int64_t, bool, bool>{4096, 13, false, true},
                                      {4096, 8, false, false}, {4000, 7, true, true}, {2056, 5, true, false}}) {
    o.rows = rows;
    o.quasi = quasi;
    o.with_scale = scale;
    run_case_counted<S>(stacked(parallel_layout(d), 2), o, rng);
  }
  o.rows = 3;
  o.quasi = false;
  o.with_scale = true;
  run_case_counted<S>(stacked(parallel_layout(4096), 3), o, rng);
  run_case_counted<S>(stacked(parallel_layout(2048), 2), o, rng);
  o.pad = 8;
  o.offset = 1;
  run_case_counted<S>(stacked(parallel_layout(4096), 2), o, rng);
}

// The prefetching forward over blocks that own several row groups (its next-row loads and their end): row
// slots per block (d = 100, 1000, the last group partly past the rows), 512 threads (d = 4096, the
// fixed-width instantiation), segmented rows (4104 with 16-byte rows, 1000 in 256-element segments), each
// with many more rows than the emulated 3 SMs' persistent grid; table and reg variants; forward only, but
// segmented rows also backward (its top pass in the top-only mode), every one also through the plain forward
// (run_case_counted), bitwise equal.
template <class S>
void prefetch_cases(std::mt19937_64& rng) {
  for (auto [d, rows, segment] : {std::tuple<int64_t, int64_t, int>{100, 401, 0}, {1000, 101, 0}, {4096, 20, 0},
                                  {4104, 13, 0}, {1000, 50, 256}}) {
    for (Variant variant : {Variant::Table, Variant::Reg}) {
      Options o;
      o.knobs.variant = variant;
      o.knobs.segment = segment;
      o.rows = rows;
      o.backward = d > 4096 || segment > 0;
      o.quasi = variant == Variant::Table;
      o.with_scale = o.quasi;
      run_case_counted<S>(parallel_layout(d), o, rng);
    }
  }
}

// The reduction alone (reduce_partials_kernel) on random partial rows, launched as plan_reduce plans it (or on a
// grid of `grid_cap` blocks when smaller: blocks that own several item groups). Every wanted gradient must be
// bitwise the order the kernel promises, written out here in the accumulation type: lane j's sum of slots j,
// j + lanes, ... in slot order from 0, then lane j + h added into lane j for h = lanes / 2 .. 1 (lanes = 1,
// QGOFT_CUDA_REDUCE=serial: every slot in slot order, the order of the kernel before the split), and within
// rounding of the float64 sum; a result that depends on the order in which threads run cannot pass. The padding
// of the rows (past 4P + d) and the unwanted columns hold NaN; outputs past d must stay untouched.
template <class A, bool kGivens>
void reduce_case(int64_t P, int64_t d, int64_t slots, bool params, bool scale, ReduceKind kind, unsigned grid_cap,
                 std::mt19937_64& rng, int want_lanes = 0) {
  ++g_cases;
  const int before = g_failures;
  char tagbuf[200];
  std::snprintf(tagbuf, sizeof tagbuf, "reduce %s %s P=%lld d=%lld slots=%lld params=%d scale=%d kind=%d grid_cap=%u",
                std::is_same_v<A, double> ? "float64" : "float32", kGivens ? "givens" : "quasi", (long long)P,
                (long long)d, (long long)slots, int(params), int(scale), int(kind), grid_cap);
  BackwardPlan plan;
  plan.slots = slots;
  plan.partial_ld = (4 * P + d + 3) / 4 * 4;
  Problem p;
  p.dtype = std::is_same_v<A, double> ? DType::Float64 : DType::Float32;
  p.d = d;
  p.num_pairs = P;
  p.want_blocks = params;
  p.want_scale = scale;
  Knobs knobs;
  knobs.reduce = kind;
  plan_reduce(plan, p, knobs);
  const int lanes = plan.ra.lanes;
  const std::string tag = std::string(tagbuf) + " lanes=" + std::to_string(lanes) +
                          " grid=" + std::to_string(plan.reduce.grid.x);
  if (want_lanes > 0 && lanes != want_lanes) {
    std::fprintf(stderr, "FAIL %s: want lanes=%d\n", tag.c_str(), want_lanes);
    ++g_failures;
  }
  std::normal_distribution<double> normal;
  std::vector<A> partial = poisoned<A>(slots * plan.partial_ld), blocks(4 * P);
  const int64_t width = 4 * P + d;
  for (int64_t b = 0; b < slots; ++b) {
    for (int64_t e = 0; e < width; ++e) {
      const bool wanted = e < 4 * P ? params : scale;
      if (wanted) partial[b * plan.partial_ld + e] = A(normal(rng));
    }
  }
  for (int64_t k = 0; k < P; ++k) {
    const double t = normal(rng);
    const A c = A(std::cos(t)), sn = A(std::sin(t));
    blocks[4 * k] = c;
    blocks[4 * k + 1] = -sn;
    blocks[4 * k + 2] = sn;
    blocks[4 * k + 3] = c;
  }
  const int64_t nparams = kGivens ? P : 4 * P;
  std::vector<A> gparams = poisoned<A>(nparams + 4), gscale = poisoned<A>(d + 4);
  ReduceArgs& ra = plan.ra;
  ra.partial = partial.data();
  ra.blocks = blocks.data();
  ra.grad_params = params ? gparams.data() : nullptr;
  ra.grad_scale = scale ? gscale.data() : nullptr;
  LaunchConfig launch = plan.reduce;
  launch.grid.x = std::min(launch.grid.x, grid_cap);
  run_kernel(launch, [&] { detail::reduce_partials_kernel<A, kGivens>(ra); });

  // the promised order, and the float64 sums
  std::vector<A> want_bits(width);
  std::vector<double> want64(width, 0.0);
  std::vector<A> lane(lanes);
  for (int64_t e = 0; e < width; ++e) {
    if (!(e < 4 * P ? params : scale)) continue;
    for (int j = 0; j < lanes; ++j) {
      lane[j] = A(0);
      for (int64_t b = j; b < slots; b += lanes) lane[j] += partial[b * plan.partial_ld + e];
    }
    for (int h = lanes / 2; h > 0; h /= 2) {
      for (int j = 0; j < h; ++j) lane[j] += lane[j + h];
    }
    want_bits[e] = lane[0];
    for (int64_t b = 0; b < slots; ++b) want64[e] += double(partial[b * plan.partial_ld + e]);
  }
  const double tol = std::is_same_v<A, double> ? 1e-13 : 1e-5;
  auto check = [&](const char* what, int64_t idx, A got, A want_exact, double want) {
    if (std::memcmp(&got, &want_exact, sizeof(A)) != 0) {
      std::fprintf(stderr, "FAIL %s: %s[%lld] = %.10g, not bitwise the promised order's %.10g\n", tag.c_str(), what,
                   (long long)idx, double(got), double(want_exact));
      ++g_failures;
      return false;
    }
    if (!(std::fabs(double(got) - want) <= tol * (1 + std::sqrt(double(slots))) * (1 + std::fabs(want)))) {
      std::fprintf(stderr, "FAIL %s: %s[%lld] = %.10g, float64 sum %.10g\n", tag.c_str(), what, (long long)idx,
                   double(got), want);
      ++g_failures;
      return false;
    }
    return true;
  };
  auto untouched = [&](const std::vector<A>& v, int64_t from, const char* what) {
    std::vector<A> nan = poisoned<A>(v.size() - from);
    if (std::memcmp(v.data() + from, nan.data(), nan.size() * sizeof(A)) != 0) {
      std::fprintf(stderr, "FAIL %s: %s written past its end\n", tag.c_str(), what);
      ++g_failures;
    }
  };
  if (params) {
    for (int64_t k = 0; k < P && g_failures == before; ++k) {
      const A* w = &want_bits[4 * k];
      const double* w64 = &want64[4 * k];
      if constexpr (kGivens) {
        const A c = blocks[4 * k], sn = blocks[4 * k + 2];
        const A exact = -sn * w[0] - c * w[1] + c * w[2] - sn * w[3];
        const double t64 = -double(sn) * w64[0] - double(c) * w64[1] + double(c) * w64[2] - double(sn) * w64[3];
        check("grad_angles", k, gparams[k], exact, t64);
      } else {
        for (int c = 0; c < 4; ++c) check("grad_blocks", 4 * k + c, gparams[4 * k + c], w[c], w64[c]);
      }
    }
    untouched(gparams, nparams, "grad_params");
  }
  if (scale) {
    for (int64_t c = 0; c < d && g_failures == before; ++c) {
      check("grad_scale", c, gscale[c], want_bits[4 * P + c], want64[4 * P + c]);
    }
    untouched(gscale, d, "grad_scale");
  }
  if (g_failures != before) ++g_failed_cases;
}

// reduce_case over the shapes of its paths: one slot; slots up to one batch per lane (lanes 1 .. 64), two batches
// per lane (700 slots: 64 lanes of 10-11); items not a multiple of a block's (P + ceil(d / 4) odd, d % 4 != 0: the
// last scale item's partial load); scale only, parameters only, both; givens and blocks; float32 and float64
// accumulation; blocks that own several item groups (grid_cap 2); split and serial; the MiniLM shapes
// (2048 rows, d = 384 and 1536: 264 slots on an H100).
template <class A, bool kGivens>
void reduce_cases(bool full, std::mt19937_64& rng) {
  struct Shape {
    int64_t P, d, slots;
    int lanes;  // the split's lanes, as planned
  };
  std::vector<Shape> shapes = {{5, 13, 1, 1}, {5, 13, 8, 1}, {5, 13, 9, 2}, {30, 31, 44, 8}, {30, 31, 132, 32},
                               {9, 10, 264, 64}, {9, 10, 700, 64}, {0, 7, 20, 4}};
  if (full || (std::is_same_v<A, float> && !kGivens)) shapes.push_back({383, 384, 264, 64});
  if (full) shapes.push_back({1535, 1536, 264, 64});
  for (const Shape& sh : shapes) {
    for (auto [params, scale] : {std::pair{true, true}, {true, false}, {false, true}}) {
      if (sh.P == 0 && !scale) continue;
      if (sh.P > 100 && !full && !(params && !scale)) continue;  // MiniLM's qgoft: parameters only
      for (ReduceKind kind : {ReduceKind::Split, ReduceKind::Serial}) {
        reduce_case<A, kGivens>(sh.P, sh.d, sh.slots, params, scale, kind, 1u << 30, rng,
                                kind == ReduceKind::Split ? sh.lanes : 1);
        if (params && scale && sh.slots > 1) reduce_case<A, kGivens>(sh.P, sh.d, sh.slots, params, scale, kind, 2, rng);
      }
    }
  }
}

// The whole backward with many slots (an emulated device of 66 SMs): the split reduction with 8-16 lanes per
// item after the parallel kernels (reg: qgoft with scale; base: goft_scaled), the general kernels and a stack,
// every gradient against the float64 reference, bitwise reproducible; float32 also through QGOFT_CUDA_REDUCE=serial.
template <class S>
void many_slot_cases(std::mt19937_64& rng) {
  for (ReduceKind kind : {ReduceKind::Split, ReduceKind::Serial}) {
    if (kind == ReduceKind::Serial && !std::is_same_v<S, float>) continue;
    Options o;
    o.sm_count = 66;
    o.knobs.reduce = kind;
    o.rows = 136;  // d = 1000: 68 row groups of 2 rows, 68 slots: 16 lanes
    o.knobs.variant = kind == ReduceKind::Split ? Variant::Reg : Variant::Base;
    o.quasi = kind == ReduceKind::Split;
    run_case_counted<S>(parallel_layout(1000), o, rng);
    o.knobs.variant = Variant::Base;
    o.rows = 70;  // the general kernels with rows in global memory: a block per row, 70 slots: 16 lanes
    o.knobs.path = ForcedPath::Global;
    run_case_counted<S>(sequential_layout(40), o, rng);
    o.knobs.path = ForcedPath::Auto;
    o.rows = 640;  // 40 row groups of 16 rows, 40 slots: 8 lanes
    run_case_counted<S>(stacked(parallel_layout(100), 2), o, rng);
  }
}

// The paired reg backward over blocks that own several pairs of rows, the last pair with one row past the block's
// rows (its second row invalid) or whole: rows of one segment, 4096 (13 and 14 rows over the emulated 6 blocks) and
// 3000 (11 rows; the segment partly past the row), and segmented rows of 4104 (9 and 8 rows over 3 blocks per
// segment column), goft, goft_scaled and qgoft, every mask (without the scale's gradient through both
// instantiations: pair and auto; rows of one segment also without the L2 prefetch, QGOFT_CUDA_PAIR_PREFETCH=off);
// each also through the reg kernel, bitwise equal (run_case_counted). Other dtypes:
// the planner keeps the reg kernel.
template <class S>
void pair_cases(std::mt19937_64& rng) {
  for (auto [d, rows, quasi, scale] : {std::tuple<int64_t, int64_t, bool, bool>{4096, 13, true, true},
                                      {4096, 14, false, false}, {3000, 11, true, false}, {4104, 9, false, true},
                                      {4104, 8, true, false}}) {
    Options o;
    o.knobs.variant = Variant::Reg;
    o.rows = rows;
    o.quasi = quasi;
    o.with_scale = scale;
    run_all_masks<S>(parallel_layout(d), o, rng);
  }
}

// The butterfly forward (QGOFT_CUDA_XOR=fused) over its shapes: d = 8 .. 4096 (one round at d = 8; the last round's
// window overlapping the previous one where log2 d is not a multiple of 3; sub-blocks of fewer threads than a warp
// below d = 256; 512 threads and the fixed-width instantiation at d = 4096), rows giving blocks that own several row
// groups and a last group partly past the rows (the emulated 3 SMs' persistent grid), goft, goft_scaled, qgoft and
// qgoft_scaled, 16-byte and scalar (unaligned, strided) rows; each against the reference and, through
// run_case_counted, bitwise the general forward. The backward of the same cases runs the butterfly backward kernel
// (row groups of 4 rows per thread, 2 in float64, several per block, the last one partial): its results against the
// reference, grad_x bitwise the general kernels'; d = 64, 512 and 4096 also with every output mask (the adjoint
// without x, parameter gradients without grad_x, the scale's alone).
template <class S>
void butterfly_cases(bool full, std::mt19937_64& rng) {
  std::vector<std::pair<int64_t, int64_t>> shapes = {{8, 2100}, {64, 1000}, {256, 70}, {512, 53}, {4096, 53}};
  if (full || sizeof(S) == 4) shapes.insert(shapes.end(), {{16, 300}, {128, 400}, {1024, 50}, {2048, 30}});
  int k = 0;
  for (auto [d, rows] : shapes) {
    for (auto [quasi, scale] : {std::pair{false, false}, {false, true}, {true, false}, {true, true}}) {
      if (!full && d >= 1024 && ++k % 2 == 0) continue;  // large rows: every method across the shapes, not each
      Options o;
      o.knobs.xor_path = XorPath::Fused;
      o.quasi = quasi;
      o.with_scale = scale;
      o.rows = rows;
      if (quasi && scale) {  // scalar loads: rows of stride d + 3 from an unaligned start
        o.pad = 3;
        o.offset = 1;
      }
      run_case_counted<S>(butterfly_layout(d), o, rng);
    }
  }
  for (auto [d, rows] : {std::pair<int64_t, int64_t>{64, 300}, {512, 21}, {4096, 13}}) {
    Options o;
    o.knobs.xor_path = XorPath::Fused;
    o.rows = rows;
    o.quasi = d != 512;
    run_all_masks<S>(butterfly_layout(d), o, rng);
  }
  // stacks of butterflies: the rows back to window 0 between repetitions (d = 8: one window, no exchange)
  for (auto [d, reps, rows] : {std::tuple<int64_t, int, int64_t>{8, 3, 1100}, {64, 2, 300}, {512, 2, 30}, {4096, 2, 19}}) {
    Options o;
    o.knobs.xor_path = XorPath::Fused;
    o.rows = rows;
    o.backward = d <= 64;
    o.with_scale = d != 512;
    run_case_counted<S>(stacked(butterfly_layout(d), reps), o, rng);
  }
}

template <class S>
void suite(bool full, std::mt19937_64& rng) {
  std::vector<Layout> lays;
  for (int64_t d : {2, 3, 8, 13, 64, 100, 257, 1000}) lays.push_back(parallel_layout(d));
  if (full) {
    for (int64_t d : {2048, 4096, 5000}) lays.push_back(parallel_layout(d));
  }
  lays.push_back(sequential_layout(5));
  lays.push_back(sequential_layout(40));
  lays.push_back(butterfly_layout(64));
  lays.push_back(butterfly_layout(100));
  for (int64_t d : {2, 13, 64, 100, 257, 1000}) lays.push_back(stacked(parallel_layout(d), 2));
  lays.push_back(stacked(parallel_layout(40), 3));
  if (full) {
    lays.push_back(stacked(parallel_layout(4096), 2));
    lays.push_back(stacked(parallel_layout(5000), 2));  // rows of two backward segments: general kernels
  }
  lays.push_back(custom_layout(50, rng));
  lays.push_back(custom_layout(7, rng));
  Layout empty{"empty", 11, {}, {0, 0}, false};
  lays.push_back(empty);
  for (const Layout& lay : lays) {
    for (bool quasi : {true, false}) {
      // every variant the layout has (the parallel layout: base, table and reg), with: every mask, unaligned
      // rows with a row stride (scalar loads, no scale), segmented parallel kernels (256-element
      // segments); the base variant also through the forced general paths; reg also against table
      for (Variant variant : {Variant::Base, Variant::Table, Variant::Reg}) {
        if (variant == Variant::Table && !lay.parallel && lay.reps == 0) continue;
        if (variant == Variant::Reg && !lay.parallel) continue;  // reg: the single layout's backward only
        const bool vs_table = variant == Variant::Reg;
        Options o;
        o.quasi = quasi;
        o.with_scale = quasi;
        o.knobs.variant = variant;
        o.rows = lay.d >= 2048 ? 3 : 17;
        run_all_masks<S>(lay, o, rng, vs_table);
        o.pad = 3;
        o.offset = 1;
        o.with_scale = !quasi;
        o.rows = 3;
        run_case_counted<S>(lay, o, rng, vs_table);
        o.pad = 0;
        o.offset = 0;
        if (variant == Variant::Base) {
          for (ForcedPath fp : {ForcedPath::General, ForcedPath::Global}) {
            o.knobs.path = fp;
            run_case_counted<S>(lay, o, rng);
          }
          o.knobs.path = ForcedPath::Auto;
        }
        if ((lay.parallel || lay.reps > 0) && lay.d > 256) {  // a stack: back to the general kernels
          o.knobs.segment = 256;
          run_all_masks<S>(lay, o, rng, vs_table);
          o.knobs.segment = 0;
        }
        if (lay.reps > 0 && variant == Variant::Base) {  // the same stack on the general kernels
          o.knobs.xor_path = XorPath::General;
          run_case_counted<S>(lay, o, rng);
          o.knobs.xor_path = XorPath::Fused;
        }
      }
    }
  }
  reg_fixed_width_cases<S>(rng);
  prefetch_cases<S>(rng);
  butterfly_cases<S>(full, rng);
  if constexpr (sizeof(S) == 2) pair_cases<S>(rng);
  if constexpr (sizeof(typename detail::Elem<S>::A) == 4) stack_reg_cases<S>(rng);
}

// One environment switch the planner reads: unset and empty give `fallback`, every name its value, and `bad`
// throws std::invalid_argument with `message`.
template <class E, class Read>
void check_switch(const char* var, Read read, E fallback, std::initializer_list<std::pair<const char*, E>> values,
                  const char* bad, const std::string& message) {
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok) {
      std::fprintf(stderr, "FAIL env switch: %s %s\n", var, what.c_str());
      ++g_failures;
    }
  };
  unsetenv(var);
  expect(read() == fallback, "unset");
  setenv(var, "", 1);
  expect(read() == fallback, "empty");
  for (const auto& [name, value] : values) {
    setenv(var, name, 1);
    expect(read() == value, std::string("=") + name);
  }
  setenv(var, bad, 1);
  std::string got;  // the message of the std::invalid_argument read() throws, or "" when none
  try {
    read();
  } catch (const std::invalid_argument& e) {
    got = e.what();
  }
  expect(got == message, std::string("=") + bad + " throws '" + got + "'");
  unsetenv(var);
}

// The environment switches the planner reads (QGOFT_CUDA_VARIANT, QGOFT_CUDA_XOR, QGOFT_CUDA_FORWARD).
void check_env_switches() {
  check_switch("QGOFT_CUDA_XOR", xor_path_from_env, XorPath::Stack,
               {{"fused", XorPath::Fused}, {"general", XorPath::General}, {"stack", XorPath::Stack}}, "Fused",
               "QGOFT_CUDA_XOR must be general, stack or fused, got 'Fused'");
  check_switch("QGOFT_CUDA_VARIANT", variant_from_env, Variant::Reg,
               {{"table", Variant::Table}, {"reg", Variant::Reg}, {"base", Variant::Base}}, "tabel",
               "QGOFT_CUDA_VARIANT must be base, table or reg, got 'tabel'");
  check_switch("QGOFT_CUDA_FORWARD", forward_kernel_from_env, ForwardKernel::Prefetch,
               {{"plain", ForwardKernel::Plain}, {"prefetch", ForwardKernel::Prefetch}}, "pre-fetch",
               "QGOFT_CUDA_FORWARD must be plain or prefetch, got 'pre-fetch'");
  check_switch("QGOFT_CUDA_REDUCE", reduce_kind_from_env, ReduceKind::Split,
               {{"split", ReduceKind::Split}, {"serial", ReduceKind::Serial}}, "tree",
               "QGOFT_CUDA_REDUCE must be split or serial, got 'tree'");
  check_switch("QGOFT_CUDA_BACKWARD", reg_backward_from_env, RegBackward::Auto,
               {{"auto", RegBackward::Auto}, {"pair", RegBackward::Pair}, {"single", RegBackward::Single}}, "paired",
               "QGOFT_CUDA_BACKWARD must be auto, single or pair, got 'paired'");
  check_switch("QGOFT_CUDA_TOPS", tops_kind_from_env, TopsKind::Saved,
               {{"recompute", TopsKind::Recompute}, {"saved", TopsKind::Saved}}, "kept",
               "QGOFT_CUDA_TOPS must be saved or recompute, got 'kept'");
  check_switch("QGOFT_CUDA_PAIR_PREFETCH", pair_prefetch_from_env, PairPrefetch::On,
               {{"off", PairPrefetch::Off}, {"on", PairPrefetch::On}}, "0",
               "QGOFT_CUDA_PAIR_PREFETCH must be on or off, got '0'");
}

// The reduction's plan on an H100 at the shapes counted in docs/CUDA.md ("The reduction of the partial rows"):
// all-MiniLM-L6-v2's Linears (2048 rows, d = 384 and 1536, bf16, reg; 256-thread backward blocks of 128
// registers: 2 per SM, 264 slots) and the benchmark shapes (8192 rows, d = 4096: 132 slots; 11008: 3 segment
// columns, 44 slots); split and serial; qgoft without scale (parameters only) and goft_scaled (both).
void check_reduce_plans() {
  struct Want {
    int64_t rows, d;
    bool scale;
    ReduceKind kind;
    int64_t slots;
    int lanes;
    unsigned grid;
  };
  // 2048 rows: 2 backward blocks per SM (256 threads); 8192 rows: 1 (512 threads)
  for (const Want& w : {Want{2048, 384, false, ReduceKind::Split, 264, 64, 96},
                        Want{2048, 384, false, ReduceKind::Serial, 264, 1, 2},
                        Want{2048, 384, true, ReduceKind::Split, 264, 64, 120},
                        Want{2048, 1536, false, ReduceKind::Split, 264, 64, 384},
                        Want{8192, 4096, true, ReduceKind::Split, 132, 32, 640},
                        Want{8192, 4096, true, ReduceKind::Serial, 132, 1, 20},
                        Want{8192, 11008, true, ReduceKind::Split, 44, 8, 430}}) {
    Problem p = make_problem(DType::BFloat16, parallel_layout(w.d), w.rows);
    p.x_ld = p.grad_ld = w.d;
    p.want_blocks = true;
    p.want_scale = w.scale;
    Knobs knobs;
    knobs.variant = Variant::Reg;
    knobs.reduce = w.kind;
    const BackwardPlan plan = plan_backward(p, h100_limits(), knobs, w.rows == 2048 ? blocks_per_sm<2> : blocks_per_sm<1>);
    const std::string want = " slots=" + std::to_string(w.slots) + " reduce_lanes=" + std::to_string(w.lanes) +
                             " reduce_grid=" + std::to_string(w.grid);
    if (plan.slots != w.slots || plan.ra.lanes != w.lanes || plan.reduce.grid.x != w.grid ||
        plan.reduce.threads != detail::kReduceThreads || plan.ra.slots != w.slots ||
        plan.ra.partial_ld != plan.partial_ld || plan.describe.find(want) == std::string::npos) {
      std::fprintf(stderr, "FAIL reduce plan rows=%lld d=%lld scale=%d kind=%d: %s (want%s)\n", (long long)w.rows,
                   (long long)w.d, int(w.scale), int(w.kind), plan.describe.c_str(), want.c_str());
      ++g_failures;
    }
  }
}

// Where QGOFT_CUDA_BACKWARD=pair applies on an H100 (sm_count 132, 227 KiB of shared memory per block): the reg
// variant's backward of the single parallel layout with 16-bit activations, 16-byte rows and parameter gradients, in
// 512-thread segments (d = 4096, and 11008 in 3 segment columns), with the reg kernel's grid (one block per SM and
// column) and 16.5 KiB more shared memory (the second row's exchange words, the scale sums); under the default knob
// (auto) only without the scale's gradient, under pair without it through its instantiations for that (pair=2);
// not with the knob single,
// not for float32 or float64, not for the adjoint (dx only), unaligned rows, rows of 2048, the table variant or
// stacks.
void check_pair_plans() {
  const Limits lim = h100_limits();
  struct Want {  // the problem (d, row stride ld, repetitions of the layout, parameter gradients), knobs, pair
    DType dtype;
    int64_t d, ld;
    int reps;
    bool grads;
    Variant variant;
    RegBackward backward;
    int pair;
    bool scale_grad = true;  // with grads: the scale's gradient too (else the blocks' only)
  };
  constexpr Variant kReg = Variant::Reg;
  constexpr RegBackward kPair = RegBackward::Pair;
  // pair: with the scale's gradient the instantiation for any masks (pair=1), without it those without (pair=2),
  // rows of one segment (2049 .. 4096 elements) or segmented; auto: pair=1 (without the scale's gradient only)
  for (const Want& w : {Want{DType::BFloat16, 4096, 4096, 1, true, kReg, kPair, 1},
                        Want{DType::Float16, 4096, 4096, 1, true, kReg, kPair, 1},
                        Want{DType::BFloat16, 11008, 11008, 1, true, kReg, kPair, 1},
                        Want{DType::BFloat16, 4096, 4096, 1, true, kReg, kPair, 2, false},
                        Want{DType::Float16, 4096, 4096, 1, true, kReg, kPair, 2, false},
                        Want{DType::BFloat16, 3000, 3000, 1, true, kReg, kPair, 2, false},
                        Want{DType::BFloat16, 11008, 11008, 1, true, kReg, kPair, 2, false},
                        Want{DType::Float16, 8192, 8192, 1, true, kReg, kPair, 2, false},
                        Want{DType::BFloat16, 4096, 4096, 1, true, kReg, RegBackward::Single, 0},
                        Want{DType::Float32, 4096, 4096, 1, true, kReg, kPair, 0},
                        Want{DType::Float64, 4096, 4096, 1, true, kReg, kPair, 0},
                        Want{DType::BFloat16, 4096, 4096, 1, false, kReg, kPair, 0},
                        Want{DType::BFloat16, 4096, 4100, 1, true, kReg, kPair, 0},
                        Want{DType::BFloat16, 2048, 2048, 1, true, kReg, kPair, 0},
                        Want{DType::BFloat16, 4096, 4096, 1, true, Variant::Table, kPair, 0},
                        Want{DType::BFloat16, 1000, 1000, 2, true, kReg, kPair, 0},
                        // auto (the default): paired without the scale's gradient, single with it
                        Want{DType::BFloat16, 4096, 4096, 1, true, kReg, RegBackward::Auto, 1, false},
                        Want{DType::Float16, 11008, 11008, 1, true, kReg, RegBackward::Auto, 1, false},
                        Want{DType::BFloat16, 4096, 4096, 1, true, kReg, RegBackward::Auto, 0, true},
                        Want{DType::Float32, 4096, 4096, 1, true, kReg, RegBackward::Auto, 0, false},
                        Want{DType::BFloat16, 4096, 4096, 1, false, kReg, RegBackward::Auto, 0, false}}) {
    Problem p = make_problem(w.dtype, w.reps > 1 ? stacked(parallel_layout(w.d), w.reps) : parallel_layout(w.d), 8192);
    p.x_ld = p.grad_ld = w.ld;
    p.want_blocks = w.grads;
    p.want_scale = w.grads && w.scale_grad;
    Knobs knobs;
    knobs.variant = w.variant;
    knobs.xor_path = XorPath::Fused;
    knobs.forward = ForwardKernel::Plain;
    knobs.backward = w.backward;
    const BackwardPlan plan = plan_backward(p, lim, knobs, blocks_per_sm<1>);
    Knobs single = knobs;
    single.backward = RegBackward::Single;
    const BackwardPlan base = plan_backward(p, lim, single, blocks_per_sm<1>);
    const bool has = plan.describe.find(" pair=" + std::to_string(w.pair) + " ") != std::string::npos;
    // the second row's [2][2][32] float exchange words and the scale sums ([S] floats, S = 4096)
    const size_t extra = w.pair ? (2 * 2 * 32 + 4096) * 4 : 0;
    if (plan.pa.pair != w.pair || !has || plan.main.grid.x != base.main.grid.x || plan.main.grid.y != base.main.grid.y ||
        plan.main.smem != base.main.smem + extra || plan.pa.reg != base.pa.reg) {
      std::fprintf(stderr, "FAIL pair plan dtype=%d d=%lld reps=%d variant=%d ld=%lld grads=%d: %s | single: %s (want "
                   "pair=%d)\n", int(w.dtype), (long long)w.d, w.reps, int(w.variant), (long long)w.ld, int(w.grads),
                   plan.describe.c_str(), base.describe.c_str(), w.pair);
      ++g_failures;
    }
  }
  // QGOFT_CUDA_PAIR_PREFETCH=off: pair=2 of rows of one segment runs its instantiation without the L2 prefetch (same
  // grid and shared memory, `pair_prefetch=0` in the plan); segmented rows, pair=1 (auto, or with the scale's gradient)
  // and on keep the prefetch (and the plan's text)
  for (auto [dtype, d, backward, scale_grad, prefetch, want] :
       {std::tuple{DType::BFloat16, int64_t(4096), kPair, false, PairPrefetch::Off, 0},
        std::tuple{DType::Float16, int64_t(3000), kPair, false, PairPrefetch::Off, 0},
        std::tuple{DType::BFloat16, int64_t(4096), kPair, false, PairPrefetch::On, 1},
        std::tuple{DType::BFloat16, int64_t(11008), kPair, false, PairPrefetch::Off, 1},
        std::tuple{DType::BFloat16, int64_t(4096), kPair, true, PairPrefetch::Off, 1},
        std::tuple{DType::BFloat16, int64_t(4096), RegBackward::Auto, false, PairPrefetch::Off, 1}}) {
    Problem p = make_problem(dtype, parallel_layout(d), 8192);
    p.x_ld = p.grad_ld = d;
    p.want_blocks = true;
    p.want_scale = scale_grad;
    Knobs knobs;
    knobs.variant = kReg;
    knobs.xor_path = XorPath::Fused;
    knobs.forward = ForwardKernel::Plain;
    knobs.backward = backward;
    knobs.pair_prefetch = prefetch;
    const BackwardPlan plan = plan_backward(p, lim, knobs, blocks_per_sm<1>);
    knobs.pair_prefetch = PairPrefetch::On;
    const BackwardPlan on = plan_backward(p, lim, knobs, blocks_per_sm<1>);
    const bool text = plan.describe.find(" pair_prefetch=0 ") != std::string::npos;
    if (plan.pa.pair_prefetch != want || text != (want == 0) || plan.pa.pair != on.pa.pair ||
        plan.main.grid.x != on.main.grid.x || plan.main.smem != on.main.smem) {
      std::fprintf(stderr, "FAIL pair prefetch plan dtype=%d d=%lld scale_grad=%d: %s | on: %s (want pair_prefetch=%d)\n",
                   int(dtype), (long long)d, int(scale_grad), plan.describe.c_str(), on.describe.c_str(), want);
      ++g_failures;
    }
  }
}

// Which butterflies the forward planner gives the butterfly kernel on an H100 (132 SMs, 227 KiB of shared memory per
// block): layouts.butterfly(d) and its stacks for d = 2^n, 8 <= d <= 4096, every dtype (float64 with 2 rows per
// thread), only under QGOFT_CUDA_XOR=fused and no forced path; its threads, rows, persistent grid and shared memory at
// the shapes counted in docs/CUDA.md; never non-power-of-two d, d > 4096, other layouts, the backward. And
// butterfly_reps (the glue's recognition) on butterflies, their stacks and near misses.
void check_butterfly_plans() {
  const Limits lim = h100_limits();
  struct Want {
    DType dtype;
    int64_t d;
    XorPath xor_path;
    ForcedPath path;
    bool butterfly;
    int threads;
    unsigned grid;
    size_t smem;
    int reps = 1;
  };
  for (const Want& w : {Want{DType::BFloat16, 4096, XorPath::Fused, ForcedPath::Auto, true, 512, 132, 131072},
                        Want{DType::Float32, 4096, XorPath::Fused, ForcedPath::Auto, true, 512, 132, 131072},
                        Want{DType::Float16, 4096, XorPath::Fused, ForcedPath::Auto, true, 512, 132, 131072},
                        Want{DType::Float64, 4096, XorPath::Fused, ForcedPath::Auto, true, 512, 132, 65536},
                        Want{DType::BFloat16, 2048, XorPath::Fused, ForcedPath::Auto, true, 256, 264, 65536},
                        Want{DType::BFloat16, 64, XorPath::Fused, ForcedPath::Auto, true, 128, 64, 32768},
                        Want{DType::BFloat16, 8, XorPath::Fused, ForcedPath::Auto, true, 128, 8, 32768},
                        Want{DType::BFloat16, 4096, XorPath::Fused, ForcedPath::Auto, true, 512, 132, 131072, 2},
                        Want{DType::Float32, 64, XorPath::Fused, ForcedPath::Auto, true, 128, 64, 32768, 3},
                        Want{DType::BFloat16, 4096, XorPath::Stack, ForcedPath::Auto, false, 0, 0, 0, 2},
                        Want{DType::BFloat16, 8192, XorPath::Fused, ForcedPath::Auto, false, 0, 0, 0},
                        Want{DType::BFloat16, 4096, XorPath::Stack, ForcedPath::Auto, false, 0, 0, 0},
                        Want{DType::BFloat16, 4096, XorPath::General, ForcedPath::Auto, false, 0, 0, 0},
                        Want{DType::BFloat16, 4096, XorPath::Fused, ForcedPath::General, false, 0, 0, 0}}) {
    Problem p = make_problem(w.dtype, w.reps > 1 ? stacked(butterfly_layout(w.d), w.reps) : butterfly_layout(w.d), 8192);
    p.x_ld = w.d;
    Knobs knobs;
    knobs.xor_path = w.xor_path;
    knobs.path = w.path;
    const ForwardPlan plan = plan_forward(p, lim, knobs);
    const bool has = plan.describe.rfind("path=butterfly ", 0) == 0;
    if (plan.butterfly != w.butterfly || has != w.butterfly || plan.parallel ||
        (w.butterfly && (plan.main.threads != w.threads || plan.main.grid.x != w.grid || plan.main.smem != w.smem ||
                         plan.ga.R != (w.dtype == DType::Float64 ? 2 : 8)))) {
      std::fprintf(stderr, "FAIL butterfly plan dtype=%d d=%lld xor=%d path=%d: %s (want butterfly=%d threads=%d "
                   "grid=%u smem=%zu)\n", int(w.dtype), (long long)w.d, int(w.xor_path), int(w.path),
                   plan.describe.c_str(), int(w.butterfly), w.threads, w.grid, w.smem);
      ++g_failures;
    }
    // the backward: the butterfly backward kernel where the forward runs on the register path for a single butterfly
    // (checked below), the general kernels elsewhere (stacks too)
    p.grad_ld = w.d;
    p.want_blocks = true;
    const BackwardPlan bwd = plan_backward(p, lim, knobs, blocks_per_sm<1>);
    const bool want_bwd = w.butterfly && w.reps == 1;
    if (bwd.parallel || bwd.butterfly != want_bwd || bwd.describe.rfind(want_bwd ? "path=butterfly " : "path=general", 0) != 0) {
      std::fprintf(stderr, "FAIL butterfly backward plan d=%lld: %s (want the %s)\n", (long long)w.d,
                   bwd.describe.c_str(), want_bwd ? "butterfly backward" : "general kernels");
      ++g_failures;
    }
  }
  // the butterfly backward's launches on an H100 (every parameter gradient): the forward's threads, butterfly_backward_rows
  // rows per thread (4; float64 2), (rounds - 1) buffers of the block's rows, the persistent grid, one slot per sub-block
  struct WantBackward {
    DType dtype;
    int64_t d;
    int threads, R;
    unsigned grid;
    size_t smem;
    int64_t slots;
    bool givens = false;  // goft: one angle sum per pair (angle_sums), the scale's sums after them, two reductions
  };
  for (const WantBackward& w : {WantBackward{DType::BFloat16, 4096, 512, 4, 132, 196608, 132, true},
                                WantBackward{DType::BFloat16, 4096, 512, 4, 132, 196608, 132},
                                WantBackward{DType::Float32, 4096, 512, 4, 132, 196608, 132},
                                WantBackward{DType::Float64, 4096, 512, 2, 132, 196608, 132},
                                WantBackward{DType::BFloat16, 2048, 256, 4, 264, 98304, 264},
                                WantBackward{DType::BFloat16, 64, 128, 4, 128, 16384, 2048},
                                WantBackward{DType::Float32, 8, 128, 4, 16, 0, 2048}}) {
    Problem p = make_problem(w.dtype, butterfly_layout(w.d), 8192);
    p.grad_ld = p.x_ld = w.d;
    p.want_blocks = p.want_scale = true;
    p.givens = w.givens;
    Knobs knobs;
    knobs.xor_path = XorPath::Fused;
    const BackwardPlan bwd = plan_backward(p, lim, knobs, blocks_per_sm<1>);
    // the partial rows: 4P + d entries, or with angle sums round_up(P, 4) + d (P = 24576 at d = 4096: 28672 against
    // 102400), the scale's reduction reading from entry round_up(P, 4) on
    const int64_t P = p.num_pairs, P4 = (P + 3) / 4 * 4;
    const int64_t want_ld = w.givens ? (P4 + w.d + 3) / 4 * 4 : (4 * P + w.d + 3) / 4 * 4;
    const size_t es = w.dtype == DType::Float64 ? 8 : 4;
    if (!bwd.butterfly || bwd.main.threads != w.threads || bwd.ga.R != w.R || bwd.main.grid.x != w.grid ||
        bwd.main.smem != w.smem || bwd.slots != w.slots || !bwd.grads || bwd.angle_sums != w.givens ||
        bwd.ga.angle_sums != int(w.givens) || bwd.reduce_scale_launch != w.givens || bwd.partial_ld != want_ld ||
        bwd.ra.partial_ld != want_ld || (w.givens && (bwd.ra.num_pairs != 0 || bwd.ra.d != P || bwd.ra_scale.d != w.d ||
                                                      bwd.ra_scale.num_pairs != 0 || bwd.ra_scale.slots != w.slots ||
                                                      bwd.scale_offset_bytes != int64_t(P4 * es)))) {
      std::fprintf(stderr, "FAIL butterfly backward plan dtype=%d d=%lld: %s (want threads=%d R=%d grid=%u smem=%zu "
                   "slots=%lld)\n", int(w.dtype), (long long)w.d, bwd.describe.c_str(), w.threads, w.R, w.grid, w.smem,
                   (long long)w.slots);
      ++g_failures;
    }
  }
  Layout swapped = butterfly_layout(64);
  std::swap(swapped.pairs[2 * 40], swapped.pairs[2 * 41]);  // two pairs of layer 2 out of order
  std::swap(swapped.pairs[2 * 40 + 1], swapped.pairs[2 * 41 + 1]);
  std::mt19937_64 rng(7);
  Layout stack_swapped = stacked(butterfly_layout(64), 2);  // the second repetition's layer 2 out of order
  std::swap(stack_swapped.pairs[2 * (192 + 40)], stack_swapped.pairs[2 * (192 + 41)]);
  std::swap(stack_swapped.pairs[2 * (192 + 40) + 1], stack_swapped.pairs[2 * (192 + 41) + 1]);
  Layout butterfly_parallel = butterfly_layout(64);  // a butterfly, then a parallel layout: not a stack
  for (int64_t p = 0; p < parallel_layout(64).P(); ++p) {
    butterfly_parallel.pairs.push_back(parallel_layout(64).pairs[2 * p]);
    butterfly_parallel.pairs.push_back(parallel_layout(64).pairs[2 * p + 1]);
  }
  for (int64_t r = 1; r < parallel_layout(64).L() + 1; ++r) butterfly_parallel.off.push_back(192 + parallel_layout(64).off[r]);
  for (auto [lay, want] : {std::pair{butterfly_layout(4), 1}, {butterfly_layout(64), 1}, {butterfly_layout(4096), 1},
                           {butterfly_layout(100), 0}, {butterfly_layout(2), 0}, {parallel_layout(64), 0},
                           {stacked(butterfly_layout(64), 2), 2}, {stacked(butterfly_layout(8), 3), 3}, {swapped, 0},
                           {stack_swapped, 0}, {butterfly_parallel, 0}, {sequential_layout(8), 0},
                           {custom_layout(64, rng), 0}}) {
    const int got = butterfly_reps(lay.pairs.data(), lay.off.data(), lay.P(), lay.L(), lay.d);
    if (got != want) {
      std::fprintf(stderr, "FAIL butterfly_reps(%s d=%lld) = %d, want %d\n", lay.name.c_str(), (long long)lay.d, got,
                   want);
      ++g_failures;
    }
  }
}

// Which stacks of the parallel layout the fused XOR backward takes on an H100 (sm_count 132, 227 KiB of shared
// memory per block), with every parameter gradient: every dtype while a row fits one 4096-element segment,
// float64 too (fewer rows per block where 256 / T rows would not fit), except float64 at d = 4096. Under reg (the
// default) the forward is base's, the backward the reg stacked backward where it applies and fits (k = 2 at
// d = 4096 with float accumulation: its tables and accumulators in 226.9 KiB, one block per SM, 132 blocks), base's
// elsewhere: k = 3, rows of 2048 or fewer elements, float64, unaligned rows, the adjoint (no parameter gradients).
void check_stack_plans() {
  const Limits lim = h100_limits();
  Knobs knobs;
  knobs.variant = Variant::Base;
  knobs.xor_path = XorPath::Fused;
  for (DType dtype : {DType::Float32, DType::Float64, DType::BFloat16, DType::Float16}) {
    for (auto [d, reps] : {std::pair<int64_t, int>{2, 2}, {13, 2}, {64, 3}, {100, 2}, {257, 2}, {1000, 2},
                           {4096, 2}, {5000, 2}}) {
      Problem p = make_problem(dtype, stacked(parallel_layout(d), reps), 1000);
      p.x_ld = p.grad_ld = d;
      p.want_blocks = p.want_scale = true;
      const BackwardPlan plan = plan_backward(p, lim, knobs, blocks_per_sm<1>);
      const bool want = d <= 4096 && !(dtype == DType::Float64 && d == 4096);
      Knobs reg = knobs;
      reg.variant = Variant::Reg;
      const BackwardPlan reg_bwd = plan_backward(p, lim, reg, blocks_per_sm<1>);
      const ForwardPlan reg_fwd = plan_forward(p, lim, reg);
      const bool want_reg = d == 4096 && reps == 2 && dtype != DType::Float64;
      const size_t reg_smem =
          detail::StackBackwardSmem(2, 1, 512, 4 * p.num_pairs + d, true, true, 4096, false, true).total * 4;
      const bool reg_ok = want_reg ? reg_bwd.pa.reg == 1 && reg_bwd.pa.table == 4096 && reg_bwd.pa.stack_tape == 0 &&
                                         reg_bwd.main.smem == reg_smem && reg_smem <= lim.smem_optin &&
                                         reg_bwd.main.grid.x == 132 && reg_bwd.describe.find(" reg=1 ") != std::string::npos
                                   : reg_bwd.pa.table == 0 && reg_bwd.pa.reg == 0 && reg_bwd.main.smem == plan.main.smem;
      // the forward under reg (QGOFT_CUDA_FORWARD=prefetch, the default): every repetition's table for the prefetching
      // forward where rows are 16-byte and whole and the tables fit (not float64 at d = 4096: 256 KiB); else base's
      const bool want_fwd_prefetch = d % 8 == 0 && d <= 4096 && !(dtype == DType::Float64 && d == 4096);
      const bool fwd_ok = want_fwd_prefetch ? reg_fwd.pa.prefetch == 1 && reg_fwd.pa.table > 0
                                            : reg_fwd.pa.prefetch == 0 && reg_fwd.pa.table == 0;
      if (!reg_ok || !fwd_ok) {
        std::fprintf(stderr, "FAIL stack plan under reg dtype=%d d=%lld reps=%d: %s | %s (want %s)\n", int(dtype),
                     (long long)d, reps, reg_fwd.describe.c_str(), reg_bwd.describe.c_str(),
                     want_reg ? "the reg stacked backward" : "base's kernels");
        ++g_failures;
      }
      if (plan.parallel != want || (want && plan.pa.reps != reps)) {
        std::fprintf(stderr, "FAIL stack plan dtype=%d d=%lld reps=%d: %s (want %s)\n", int(dtype), (long long)d,
                     reps, plan.describe.c_str(), want ? "the fused stack" : "the general kernels");
        ++g_failures;
      }
    }
  }
  // under reg, bf16 at d = 4096: k = 3 (360 KiB would not fit), unaligned rows, the adjoint: base's stacked kernel
  struct Want {
    int reps;
    int64_t ld;
    bool grads;
  };
  for (const Want& w : {Want{3, 4096, true}, Want{2, 4100, true}, Want{2, 4096, false}}) {
    Problem p = make_problem(DType::BFloat16, stacked(parallel_layout(4096), w.reps), 1000);
    p.x_ld = p.grad_ld = w.ld;
    p.want_blocks = p.want_scale = w.grads;
    Knobs reg = knobs;
    reg.variant = Variant::Reg;
    const BackwardPlan plan = plan_backward(p, lim, reg, blocks_per_sm<1>);
    if (!plan.parallel || plan.pa.reps != w.reps || plan.pa.reg != 0 || plan.pa.table != 0) {
      std::fprintf(stderr, "FAIL stack plan under reg reps=%d ld=%lld grads=%d: %s (want base's stacked kernel)\n",
                   w.reps, (long long)w.ld, int(w.grads), plan.describe.c_str());
      ++g_failures;
    }
  }
}

// Where QGOFT_CUDA_FORWARD=prefetch applies on an H100 (sm_count 132, 227 KiB of shared memory per block): the
// single parallel layout under the table and reg variants with 16-byte rows, with a persistent grid of
// prefetch_forward_blocks per SM (bf16 3, fp32 2 at d = 4096: 396 / 264 blocks; d = 11008: 3 segment columns);
// stacks (whole rows) too, one block per SM at d = 4096 (their tables); not under base, not for unaligned rows,
// and never without the knob.
void check_prefetch_plans() {
  const Limits lim = h100_limits();
  struct Want {
    DType dtype;
    int64_t d;
    int reps;
    Variant variant;
    ForwardKernel forward;
    int64_t x_ld;
    int prefetch;
    unsigned grid;
  };
  for (const Want& w : {Want{DType::BFloat16, 4096, 1, Variant::Reg, ForwardKernel::Prefetch, 4096, 1, 396},
                        Want{DType::BFloat16, 11008, 1, Variant::Table, ForwardKernel::Prefetch, 11008, 1, 132},
                        Want{DType::Float32, 4096, 1, Variant::Reg, ForwardKernel::Prefetch, 4096, 1, 264},
                        Want{DType::Float16, 4096, 1, Variant::Table, ForwardKernel::Prefetch, 4096, 1, 396},
                        Want{DType::BFloat16, 4096, 1, Variant::Reg, ForwardKernel::Plain, 4096, 0, 396},
                        Want{DType::BFloat16, 4096, 1, Variant::Base, ForwardKernel::Prefetch, 4096, 0, 8192},
                        Want{DType::BFloat16, 4096, 1, Variant::Reg, ForwardKernel::Prefetch, 4100, 0, 396},
                        // a stack under reg or table: its kStack instantiation (every repetition's table: 6 blocks of
                        // 256 threads per SM at d = 1000, one block of 512 at d = 4096); with the plain knob, under base
                        // or with unaligned rows base's kernels, one block per row group (8192 rows / R = 2 at d = 1000)
                        Want{DType::BFloat16, 1000, 2, Variant::Reg, ForwardKernel::Prefetch, 1000, 1, 792},
                        Want{DType::BFloat16, 4096, 2, Variant::Reg, ForwardKernel::Prefetch, 4096, 1, 132},
                        Want{DType::Float32, 4096, 3, Variant::Table, ForwardKernel::Prefetch, 4096, 1, 132},
                        Want{DType::BFloat16, 1000, 2, Variant::Reg, ForwardKernel::Plain, 1000, 0, 4096},
                        Want{DType::BFloat16, 1000, 2, Variant::Base, ForwardKernel::Prefetch, 1000, 0, 4096},
                        Want{DType::BFloat16, 1000, 2, Variant::Reg, ForwardKernel::Prefetch, 1004, 0, 4096}}) {
    Problem p = make_problem(w.dtype, w.reps > 1 ? stacked(parallel_layout(w.d), w.reps) : parallel_layout(w.d), 8192);
    p.x_ld = w.x_ld;
    Knobs knobs;
    knobs.variant = w.variant;
    knobs.xor_path = XorPath::Fused;
    knobs.forward = w.forward;
    const ForwardPlan plan = plan_forward(p, lim, knobs);
    const bool has = plan.describe.find(" prefetch=" + std::to_string(w.prefetch) + " ") != std::string::npos;
    if (!plan.parallel || plan.pa.prefetch != w.prefetch || plan.main.grid.x != w.grid || !has) {
      std::fprintf(stderr, "FAIL prefetch plan dtype=%d d=%lld reps=%d x_ld=%lld: %s (want prefetch=%d grid=%u)\n",
                   int(w.dtype), (long long)w.d, w.reps, (long long)w.x_ld, plan.describe.c_str(), w.prefetch, w.grid);
      ++g_failures;
    }
  }
  // a stack's kStack instantiation only under QGOFT_CUDA_XOR=fused (until a GPU has run it): under stack, the
  // default, base's stacked forward (no table, one block per row group)
  {
    Knobs knobs;
    knobs.variant = Variant::Reg;
    knobs.xor_path = XorPath::Stack;
    knobs.forward = ForwardKernel::Prefetch;
    const ForwardPlan plan = plan_forward(make_problem(DType::BFloat16, stacked(parallel_layout(4096), 2), 8192), lim,
                                          knobs);
    if (!plan.parallel || plan.pa.reps != 2 || plan.pa.prefetch != 0 || plan.pa.table != 0) {
      std::fprintf(stderr, "FAIL prefetch plan of a stack under QGOFT_CUDA_XOR=stack: %s (want base's stacked forward)\n",
                   plan.describe.c_str());
      ++g_failures;
    }
  }
  // the backward's top pass (segmented rows, with parameter gradients) under the same rule, on x's rows alone:
  // d = 11008 (3 segment columns of 4096) runs the prefetching forward with the knob, also where grad's rows
  // are not 16-byte (grad_ld 11012: the backward's vec=0), with its persistent grid (bf16: 3 blocks per SM per
  // column, 132, as the plain top pass; fp32: 2, 88 instead of the plain top pass's 132); not without the knob,
  // not with x's rows unaligned, not under base
  struct WantTop {
    DType dtype;
    Variant variant;
    ForwardKernel forward;
    int64_t x_ld, grad_ld;
    int top_prefetch;
    unsigned grid;
  };
  for (const WantTop& w : {WantTop{DType::BFloat16, Variant::Reg, ForwardKernel::Prefetch, 11008, 11008, 1, 132},
                           WantTop{DType::BFloat16, Variant::Table, ForwardKernel::Prefetch, 11008, 11012, 1, 132},
                           WantTop{DType::Float32, Variant::Reg, ForwardKernel::Prefetch, 11008, 11008, 1, 88},
                           WantTop{DType::Float32, Variant::Reg, ForwardKernel::Plain, 11008, 11008, 0, 132},
                           WantTop{DType::BFloat16, Variant::Reg, ForwardKernel::Plain, 11008, 11008, 0, 132},
                           WantTop{DType::BFloat16, Variant::Reg, ForwardKernel::Prefetch, 11012, 11008, 0, 132},
                           WantTop{DType::BFloat16, Variant::Base, ForwardKernel::Prefetch, 11008, 11008, 0, 8192}}) {
    Problem p = make_problem(w.dtype, parallel_layout(11008), 8192);
    p.x_ld = w.x_ld;
    p.grad_ld = w.grad_ld;
    p.want_blocks = p.want_scale = true;
    Knobs knobs;
    knobs.variant = w.variant;
    knobs.xor_path = XorPath::Fused;
    knobs.forward = w.forward;
    const BackwardPlan plan = plan_backward(p, lim, knobs, blocks_per_sm<1>);
    const bool has = plan.describe.find(" top_prefetch=" + std::to_string(w.top_prefetch) + " ") != std::string::npos;
    const ParallelArgs fa = plan.top_args();
    if (!plan.top_pass || plan.top_prefetch != w.top_prefetch || fa.prefetch != w.top_prefetch || fa.store != 0 ||
        fa.out != nullptr || plan.pa.prefetch != 0 || plan.top.grid.x != w.grid || plan.top.grid.y != 3 || !has) {
      std::fprintf(stderr, "FAIL prefetch top-pass plan dtype=%d variant=%d forward=%d x_ld=%lld grad_ld=%lld: %s "
                   "top grid %u x %u (want top_prefetch=%d top grid %u x 3)\n", int(w.dtype), int(w.variant),
                   int(w.forward), (long long)w.x_ld, (long long)w.grad_ld, plan.describe.c_str(), plan.top.grid.x,
                   plan.top.grid.y, w.top_prefetch, w.grid);
      ++g_failures;
    }
  }
}

// The parallel backward's persistent grid is sized by the occupancy of the kernel its launch runs: the planner
// asks with the planned arguments (table, reg, pair set first). H100, 8192 x 4096 bf16, 16-byte rows; an
// occupancy function that, like the real one, fits two 512-thread blocks per SM only for the reg kernel without
// parameter gradients (64 registers; base's 119, table's 70, every kernel with gradients 128).
// The segment tops on an H100 (docs/CUDA.md, "Saved segment tops"): the forward keeps them exactly where its
// segments are the backward's (the single parallel layout, segmented rows, table / reg: 4096 elements; base with
// QGOFT_CUDA_SEGMENT <= 4096); the backward with gradients takes tops of its column count instead of its top
// pass (under QGOFT_CUDA_TOPS=saved), recomputes them with another count (the glue refuses those) or under
// recompute; the adjoint, rows of one segment, stacks and the general kernels need none (top_cols = 0).
void check_tops_plans() {
  const Limits lim = h100_limits();
  struct Want {
    DType dtype;
    int64_t d;
    int reps;
    Variant variant;
    int segment;
    ForcedPath path;
    bool keeps;          // the forward's top buffer is the backward's tops
    int64_t cols;        // the backward's top_cols (with gradients)
  };
  const float dummy[4] = {};
  for (const Want& w : {Want{DType::BFloat16, 11008, 1, Variant::Reg, 0, ForcedPath::Auto, true, 3},
                        Want{DType::Float32, 11008, 1, Variant::Reg, 0, ForcedPath::Auto, true, 3},
                        Want{DType::Float64, 11008, 1, Variant::Reg, 0, ForcedPath::Auto, true, 3},
                        Want{DType::Float16, 4097, 1, Variant::Table, 0, ForcedPath::Auto, true, 2},
                        Want{DType::BFloat16, 65536, 1, Variant::Reg, 0, ForcedPath::Auto, true, 16},
                        Want{DType::BFloat16, 11008, 1, Variant::Base, 0, ForcedPath::Auto, false, 3},
                        Want{DType::BFloat16, 6000, 1, Variant::Base, 0, ForcedPath::Auto, false, 2},
                        Want{DType::BFloat16, 11008, 1, Variant::Base, 4096, ForcedPath::Auto, true, 3},
                        Want{DType::Float32, 2048, 1, Variant::Reg, 256, ForcedPath::Auto, true, 8},
                        Want{DType::BFloat16, 4096, 1, Variant::Reg, 0, ForcedPath::Auto, false, 0},
                        Want{DType::BFloat16, 11008, 1, Variant::Reg, 0, ForcedPath::General, false, 0},
                        Want{DType::BFloat16, 1000, 2, Variant::Table, 256, ForcedPath::Auto, false, 0}}) {
    const Layout lay = w.reps > 1 ? stacked(parallel_layout(w.d), w.reps) : parallel_layout(w.d);
    Knobs knobs;
    knobs.variant = w.variant;
    knobs.segment = w.segment;
    knobs.path = w.path;
    knobs.xor_path = XorPath::Fused;
    knobs.tops = TopsKind::Saved;
    Problem p = make_problem(w.dtype, lay, 8192);
    const ForwardPlan fwd = plan_forward(p, lim, knobs);
    auto fail = [&](const std::string& what, const std::string& plan) {
      std::fprintf(stderr, "FAIL tops plan dtype=%d d=%lld reps=%d variant=%d seg=%d path=%d: %s: %s\n", int(w.dtype),
                   (long long)w.d, w.reps, int(w.variant), w.segment, int(w.path), what.c_str(), plan.c_str());
      ++g_failures;
    };
    if (fwd.tops_for_backward != w.keeps || (w.keeps && (!fwd.top_pass || fwd.pa.nseg != w.cols))) {
      fail("forward keeps tops " + std::to_string(fwd.tops_for_backward), fwd.describe);
    }
    p.want_blocks = true;
    const BackwardPlan none = plan_backward(p, lim, knobs, blocks_per_sm<1>);
    if (none.top_cols != w.cols || none.top_saved || none.top_pass != (w.cols > 0)) {
      fail("without tops", none.describe);
    }
    p.tops = dummy;
    for (int64_t cols : {w.cols, w.cols + 1}) {
      if (cols == 0) continue;
      p.tops_cols = cols;
      const BackwardPlan given = plan_backward(p, lim, knobs, blocks_per_sm<1>);
      const bool use = cols == w.cols && w.cols > 0;
      const bool verbose = given.describe.find(" top_saved=1") != std::string::npos;
      if (given.top_cols != w.cols || given.top_saved != use || given.top_pass != (w.cols > 0 && !use) ||
          verbose != use || (use && given.pa.top != dummy)) {
        fail("given " + std::to_string(cols) + " columns", given.describe);
      }
    }
    knobs.tops = TopsKind::Recompute;  // the top pass whatever is given
    p.tops_cols = w.cols;
    const BackwardPlan forced = plan_backward(p, lim, knobs, blocks_per_sm<1>);
    if (forced.top_saved || forced.top_pass != (w.cols > 0)) fail("under recompute", forced.describe);
    knobs.tops = TopsKind::Saved;  // the adjoint: no gradients, no tops needed
    p.want_blocks = false;
    const BackwardPlan adjoint = plan_backward(p, lim, knobs, blocks_per_sm<1>);
    if (adjoint.top_cols != 0 || adjoint.top_saved || adjoint.top_pass) fail("adjoint", adjoint.describe);
  }
}

void check_backward_occupancy_args() {
  auto reg_dx_two = [](BackwardKernel kernel, bool, bool grads, int, size_t, const ParallelArgs& pa) {
    return kernel == BackwardKernel::Parallel && pa.reg > 0 && pa.table > 0 && pa.pair == 0 && !grads ? 2 : 1;
  };
  struct Want {
    Variant variant;
    RegBackward backward;
    bool grads;
    unsigned grid;
    int pair;
  };
  for (const Want& w : {Want{Variant::Reg, RegBackward::Single, false, 264, 0},
                        Want{Variant::Table, RegBackward::Single, false, 132, 0},
                        Want{Variant::Base, RegBackward::Single, false, 8192, 0},  // no table: one block per row
                        Want{Variant::Reg, RegBackward::Single, true, 132, 0},
                        Want{Variant::Reg, RegBackward::Pair, true, 132, 2},
                        Want{Variant::Reg, RegBackward::Auto, true, 132, 1}}) {
    Problem p = make_problem(DType::BFloat16, parallel_layout(4096), 8192);
    p.x_ld = p.grad_ld = 4096;
    p.want_blocks = w.grads;
    Knobs knobs;
    knobs.variant = w.variant;
    knobs.backward = w.backward;
    const BackwardPlan plan = plan_backward(p, h100_limits(), knobs, reg_dx_two);
    if (!plan.parallel || plan.main.grid.x != w.grid || plan.pa.pair != w.pair) {
      std::fprintf(stderr, "FAIL backward occupancy variant=%d grads=%d: %s (want grid=%u pair=%d)\n",
                   int(w.variant), int(w.grads), plan.describe.c_str(), w.grid, w.pair);
      ++g_failures;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "quick";
  std::mt19937_64 rng(12345);
  const bool full = mode == "full";
  check_env_switches();
  check_stack_plans();
  check_prefetch_plans();
  check_reduce_plans();
  check_pair_plans();
  check_tops_plans();
  check_backward_occupancy_args();
  check_butterfly_plans();
  if (mode == "tiny") {  // for a race detector: a few small cases through every path
    // the tree's barriers, blocks of several item groups: 64 lanes (3 shared-memory levels), 2 lanes (1 level:
    // the barrier after each group keeps the next group's writes from the last reads)
    reduce_case<float, false>(37, 38, 264, true, true, ReduceKind::Split, 2, rng, 64);
    reduce_case<float, false>(300, 10, 12, true, true, ReduceKind::Split, 1, rng, 2);
    reduce_case<double, true>(100, 101, 44, true, true, ReduceKind::Split, 1u << 30, rng, 8);
    for (int64_t d : {13, 300}) {
      Options o;
      o.rows = 3;
      run_case_counted<float>(parallel_layout(d), o, rng);
      o.knobs.segment = 256;
      run_case_counted<float>(parallel_layout(d), o, rng);
      o.knobs.segment = 0;
      run_case_counted<__nv_bfloat16>(custom_layout(d, rng), o, rng);
      o.knobs.path = ForcedPath::Global;
      run_case_counted<float>(custom_layout(d, rng), o, rng);
      o.knobs.path = ForcedPath::Auto;
    }
    Options o;
    o.rows = 2;
    run_case_counted<float>(parallel_layout(4096), o, rng);  // 512 threads, cross-warp layers
    o.knobs.variant = Variant::Table;
    run_case_counted<float>(parallel_layout(4096), o, rng);
    run_case_counted<float>(parallel_layout(300), o, rng);
    run_case_counted<float>(stacked(parallel_layout(300), 2), o, rng);  // stacked kernels, cross-warp layers
    o.knobs.variant = Variant::Base;
    run_case_counted<float>(stacked(parallel_layout(300), 2), o, rng);
    o.knobs.variant = Variant::Reg;  // and through the paired reg backward: 7 rows over 6 blocks (a pair, singles)
    o.rows = 7;
    o.with_scale = true;
    run_case_counted<__nv_bfloat16>(parallel_layout(4096), o, rng);
    run_case_counted<__nv_bfloat16>(stacked(parallel_layout(4096), 2), o, rng);  // the reg stacked backward
    // the butterfly forward (512 threads, 3 transposes; sub-blocks of 16 threads, 2 groups) and backward (3 groups of 4
    // rows over the 3 blocks, 6 barriers each; sub-blocks of 16 threads with their own partial rows)
    o.knobs.xor_path = XorPath::Fused;
    o.rows = 11;
    run_case_counted<__nv_bfloat16>(butterfly_layout(4096), o, rng);
    o.rows = 130;
    run_case_counted<float>(butterfly_layout(128), o, rng);
  } else if (mode == "stackreg") {  // the reg stacked backward's cases alone (for fast iteration)
    stack_reg_cases<float>(rng);
    stack_reg_cases<__nv_bfloat16>(rng);
    stack_reg_cases<__half>(rng);
  } else if (mode == "butterfly") {  // the butterfly forward's cases alone (for fast iteration)
    butterfly_cases<float>(false, rng);
    butterfly_cases<double>(false, rng);
    butterfly_cases<__nv_bfloat16>(false, rng);
    butterfly_cases<__half>(false, rng);
  } else {
    reduce_cases<float, false>(full, rng);
    reduce_cases<float, true>(full, rng);
    reduce_cases<double, false>(full, rng);
    reduce_cases<double, true>(full, rng);
    many_slot_cases<float>(rng);
    many_slot_cases<double>(rng);
    many_slot_cases<__nv_bfloat16>(rng);
  }
  if (mode == "quick" || mode == "full") {
    suite<float>(full, rng);
    suite<double>(full, rng);
    suite<__nv_bfloat16>(full, rng);
    suite<__half>(full, rng);
    if (full) {
      Options o;
      o.rows = 2;
      run_case_counted<float>(parallel_layout(65536), o, rng);  // 16 backward segments, 8 forward
      run_case_counted<__nv_bfloat16>(parallel_layout(12288), o, rng);
      for (Variant variant : {Variant::Table, Variant::Reg}) {
        o.knobs.variant = variant;
        const bool vs_table = variant == Variant::Reg;
        run_case_counted<float>(parallel_layout(65536), o, rng, vs_table);
        run_case_counted<__nv_bfloat16>(parallel_layout(11008), o, rng, vs_table);
        run_case_counted<double>(parallel_layout(4096), o, rng, vs_table);
      }
    }
  }
  if ((mode == "quick" || mode == "full") && g_top_prefetch == 0) {  // the prefetch runs' segmented backward cases must reach it
    std::fprintf(stderr, "FAIL no backward ran its top pass through the prefetching forward\n");
    ++g_failures;
  }
  if (mode != "reduce" && mode != "stackreg" && g_butterfly == 0) {  // butterfly_cases (and tiny's) must reach the butterfly forward
    std::fprintf(stderr, "FAIL no forward ran on the butterfly kernel\n");
    ++g_failures;
  }
  if (mode != "reduce" && mode != "stackreg" && g_butterfly_backward == 0) {  // and its backward
    std::fprintf(stderr, "FAIL no backward ran on the butterfly backward kernel\n");
    ++g_failures;
  }
  if (mode != "reduce" && mode != "stackreg" && mode != "tiny" && (g_angle_sums == 0 || g_angle_sums_scale == 0)) {
    std::fprintf(stderr, "FAIL no butterfly backward ran with goft's angle sums (%d) and the scale's own reduction (%d)\n",
                 g_angle_sums, g_angle_sums_scale);
    ++g_failures;
  }
  if (mode != "tiny" && mode != "stackreg" && mode != "butterfly" && (g_pair == 0 || g_pair_one == 0 || g_pair_no_l2 == 0)) {  // pair_cases and the reg cases must reach the paired reg backward with and without the scale's gradient, and without the L2 prefetch
    std::fprintf(stderr, "FAIL no backward ran on (an instantiation of) the paired reg backward\n");
    ++g_failures;
  }
  if (mode != "tiny" && mode != "stackreg" && mode != "butterfly" && g_top_saved == 0) {  // the segmented table / reg cases must reach the saved tops
    std::fprintf(stderr, "FAIL no backward ran on the forward's saved segment tops\n");
    ++g_failures;
  }
  if (mode != "reduce" && mode != "butterfly" && mode != "tiny" && g_stack_prefetch == 0) {  // the stacks' prefetch runs
    std::fprintf(stderr, "FAIL no stack's forward ran on the prefetching forward\n");
    ++g_failures;
  }
  if (mode != "reduce" && mode != "butterfly" && g_stack_reg == 0) {  // stack_reg_cases (and tiny's stack) must reach the reg stacked backward
    std::fprintf(stderr, "FAIL no backward ran on the reg stacked backward\n");
    ++g_failures;
  }
  std::printf("cuda host emulation: %d cases, %d failed checks, %d backward top passes on the prefetching forward, "
              "%d backward runs on the paired reg backward (%d without the scale's gradient, %d of them without the L2 "
              "prefetch), %d on the "
              "forward's saved segment tops, %d on the reg stacked backward, %d forward runs on the butterfly kernel, "
              "%d stack forward runs on the prefetching forward, %d backward runs on the butterfly backward kernel (%d with angle sums, %d of them with the scale's own "
              "reduction)\n",
              g_cases, g_failures, g_top_prefetch, g_pair, g_pair_one, g_pair_no_l2, g_top_saved, g_stack_reg, g_butterfly,
              g_stack_prefetch, g_butterfly_backward, g_angle_sums, g_angle_sums_scale);
  std::printf("cuda_emulation: %d passed, %d failed\n", g_cases - g_failed_cases, g_failed_cases);
  return g_failures == 0 ? 0 : 1;
}
