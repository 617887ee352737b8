// Launch planning of the CUDA Givens-chain kernels (see chain_plan.h and docs/CUDA.md).
#include "chain_plan.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "chain_sizes.h"

namespace qgoft::cuda {
namespace {

constexpr int64_t kMaxGridX = 2147483647;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
// Whether rows of d elements with row stride ld (elements) from ptr are read and written in 16-byte chunks.
bool rows16(int64_t d, int64_t ld, const void* ptr) { return d % kChunk == 0 && ld % kChunk == 0 && aligned16(ptr); }

int64_t acc_size(DType t) { return t == DType::Float64 ? 8 : 4; }
int elem_size(DType t) { return t == DType::Float64 ? 8 : t == DType::Float32 ? 4 : 2; }

struct ParallelShape {
  int T, logT, R, nseg, top_layers;
};

// Threads per row segment T (power of two), rows per block R and segments per row.
ParallelShape parallel_shape(int64_t d, int max_threads, int segment) {
  if (segment != 0) max_threads = std::min(max_threads, segment / kChunk);
  ParallelShape s{};
  const int64_t need = std::max<int64_t>(1, ceil_div(d, kChunk));
  if (need <= max_threads) {
    s.logT = detail::ceil_log2(need);
    s.T = 1 << s.logT;
    s.R = std::max(1, 256 / s.T);
    s.nseg = 1;
  } else {
    s.logT = detail::ceil_log2(max_threads);
    s.T = 1 << s.logT;
    s.R = 1;
    s.nseg = static_cast<int>(ceil_div(d, int64_t(s.T) * kChunk));
  }
  s.top_layers = detail::ceil_log2(s.nseg);
  return s;
}

// The sizes and activation operands of the problem, named alike in ParallelArgs and GeneralArgs: the forward
// reads x and writes out; the backward reads grad, writes out (grad_x) when wanted, and reads x only for the
// parameter gradients.
template <class Args>
void fill_operands(Args& a, const Problem& p, bool backward) {
  a.rows = p.rows;
  a.d = p.d;
  a.num_pairs = p.num_pairs;
  a.out = backward && !p.want_x ? nullptr : const_cast<void*>(p.out);
  if (backward) {
    a.grad = p.grad;
    a.grad_ld = p.grad_ld;
    a.want_blocks = p.want_blocks;
    a.want_scale = p.want_scale;
  }
  if (!backward || p.want_blocks || p.want_scale) {
    a.x = p.x;
    a.x_ld = p.x_ld;
  }
}

// ParallelArgs of `reps` repetitions of layouts.parallel(d) in segments of shape s.
void fill_parallel(ParallelArgs& a, const Problem& p, const ParallelShape& s, int reps, bool backward) {
  fill_operands(a, p, backward);
  a.reps = reps;
  // off[r] = number of pairs in layers 1 .. r-1 of layouts.parallel(d)
  int64_t total = 0;
  for (int r = 1; r < kLayerTable; ++r) {
    a.off[r] = static_cast<int32_t>(total);
    const int64_t h = int64_t(1) << (r - 1);
    if (h < p.d) total += ceil_div(p.d - h, int64_t(1) << r);
  }
  const int log_s = s.logT + kLogChunk;
  for (int k = 0; k < 8; ++k) {
    const int r = log_s + 1 + k;
    a.top_off[k] = r < kLayerTable ? a.off[r] : 0;
  }
  a.T = s.T;
  a.logT = s.logT;
  a.R = s.R;
  a.nseg = s.nseg;
  a.top_layers = s.top_layers;
  a.groups = ceil_div(p.rows, s.R);
}

// A knob's value: its own, or where it is FromEnv the environment switch's (read per call). One rule for every knob.
template <class E>
E resolved(E knob, E (*from_env)()) {
  return knob == E::FromEnv ? from_env() : knob;
}

XorPath resolved_xor_path(const Knobs& k) { return resolved(k.xor_path, xor_path_from_env); }
// Stacks of the parallel layout on the fused XOR path: under Stack and Fused.
bool xor_fused(const Knobs& k) { return resolved_xor_path(k) != XorPath::General; }

// Repetitions of the parallel layout the parallel kernels would run: 1 for layouts.parallel(d), k for
// layouts.stack(parallel(d), k) on the fused XOR path (the caller still checks that a row fits one segment
// and the shared memory); 0: the general kernels.
int parallel_reps(const Problem& p, const Knobs& k) {
  if (k.path != ForcedPath::Auto || p.d > kParallelMaxD) return 0;
  if (p.parallel_layout) return 1;
  return p.parallel_reps > 1 && xor_fused(k) ? p.parallel_reps : 0;
}

void fill_general(GeneralArgs& a, const Problem& p, bool backward) {
  fill_operands(a, p, backward);
  a.num_layers = p.num_layers;
}

std::string str(int64_t v) { return std::to_string(v); }

// The value of environment switch `var` among `choices` (name, value); unset or empty: `fallback`.
// Throws std::invalid_argument naming the allowed names ("VAR must be a, b or c, got 'x'") otherwise.
template <class E>
E env_switch(const char* var, E fallback, std::initializer_list<std::pair<const char*, E>> choices) {
  const char* v = std::getenv(var);
  if (v == nullptr || *v == '\0') return fallback;
  std::string names;
  size_t k = 0;
  for (const auto& [name, value] : choices) {
    if (std::strcmp(v, name) == 0) return value;
    names += (k == 0 ? "" : k + 1 == choices.size() ? " or " : ", ") + std::string(name);
    ++k;
  }
  throw std::invalid_argument(std::string(var) + " must be " + names + ", got '" + v + "'");
}

// Resident blocks per SM of a kernel that needs `smem` bytes of dynamic shared memory and few registers
// (the table-variant forward): the thread and shared-memory limits (1 KiB reserved per block).
int64_t estimated_occupancy(int threads, int64_t smem, const Limits& lim) {
  const int64_t by_threads = 2048 / std::max(threads, 1);
  const int64_t by_smem = (lim.smem_optin + 1024) / (smem + 1024);
  return std::max<int64_t>(1, std::min({by_threads, by_smem, int64_t(32)}));
}

// Blocks of a persistent grid per segment column (nseg columns): as many as are resident at once (occ per SM,
// the SMs shared by the columns), at least 1 and at most one per row group.
int64_t persistent_blocks(int64_t groups, int64_t occ, int nseg, const Limits& lim) {
  return std::max<int64_t>(1, std::min(groups, int64_t(lim.sm_count) * occ / nseg));
}

// The start of the QGOFT_CUDA_VERBOSE line of the parallel and stacked kernels.
std::string describe_parallel(int reps, const ParallelShape& s, bool vec, int table) {
  return std::string(reps > 1 ? "path=stack reps=" + str(reps) + " " : "path=parallel ") + "T=" + str(s.T) +
         " R=" + str(s.R) + " nseg=" + str(s.nseg) + " vec=" + str(vec) + " table=" + str(table);
}

Variant resolved_variant(const Knobs& k) { return resolved(k.variant, variant_from_env); }

// Whether the kernels read the shared-memory block table: Table, and Reg for the single layout (Reg differs
// from Table in the backward kernel only). A stack (reps > 1) under Reg runs Base's forward (on the H100 it took
// 0.202 ms with Base and 0.233 ms with Table, bench/RESULTS.md) and the reg stacked backward where it applies and
// fits (plan_backward), else Base's.
bool table_variant(const Knobs& k, int reps) {
  const Variant v = resolved_variant(k);
  return v == Variant::Table || (v == Variant::Reg && reps == 1);
}

// Whether a parallel forward launch runs the prefetching forward (docs/CUDA.md, "The prefetching forward"):
// under QGOFT_CUDA_FORWARD=prefetch (the default), the single layout (reps == 1) or, under QGOFT_CUDA_XOR=fused
// until a GPU has timed and sanitized it, a stack of it (reps > 1: its kStack instantiation, whole rows) with the
// block table (table > 0) and 16-byte rows (vec: every row the launch reads or writes). The one rule of the forward
// and of the backward's top pass.
bool prefetch_forward(const Knobs& k, int reps, int table, bool vec) {
  return (reps == 1 || (reps > 1 && resolved_xor_path(k) == XorPath::Fused)) && table > 0 && vec &&
         resolved(k.forward, forward_kernel_from_env) == ForwardKernel::Prefetch;
}

// Whether a stack's forward (reps > 1) takes every repetition's block table for the prefetching forward although
// table_variant keeps base's forward for it (reg): under reg or table, QGOFT_CUDA_FORWARD=prefetch and 16-byte rows
// (vec); the planner still requires whole rows and that the tables fit (docs/CUDA.md, "Stacks of the parallel
// layout (fused XOR path)").
bool stack_prefetch_table(const Knobs& k, int reps, bool vec) {
  const Variant v = resolved_variant(k);
  return reps > 1 && (v == Variant::Reg || v == Variant::Table) && prefetch_forward(k, reps, 1, vec);
}

// Resident blocks per SM of the prefetching forward with blocks of `threads`: at most occ (the shared memory's
// estimate) and prefetch_forward_blocks per 512 threads (the registers it is compiled for; stack512: a stack's
// instantiation for 512-thread segments).
int64_t prefetch_occupancy(DType dtype, int threads, int64_t occ, bool stack512 = false) {
  return std::min<int64_t>(occ, detail::prefetch_forward_blocks(elem_size(dtype), stack512) * 512 / threads);
}

// Whether the forward runs layouts.butterfly(d) on butterfly_forward_kernel (docs/CUDA.md, "The butterfly forward on
// the register path"): QGOFT_CUDA_XOR=fused, no forced path, d = 2^n with kButterflyMinLogD <= n <= kButterflyMaxLogD,
// its shared memory within the device's.
bool butterfly_forward_applies(const Problem& p, const Limits& lim, const Knobs& k) {
  if (p.butterfly_reps < 1 || k.path != ForcedPath::Auto || resolved_xor_path(k) != XorPath::Fused) return false;
  const int n = detail::ceil_log2(p.d);
  if ((int64_t(1) << n) != p.d || n < detail::kButterflyMinLogD || n > detail::kButterflyMaxLogD) return false;
  const int64_t es = acc_size(p.dtype);
  return detail::butterfly_smem_elems(n, static_cast<int>(es)) * es <= lim.smem_optin;
}

// The butterfly forward's launch: blocks of butterfly_threads(n) threads, each sub-block of d / 8 threads owning
// butterfly_rows rows of a row group; a persistent grid of the blocks resident at once (by shared memory and by the
// registers of its launch bounds).
ForwardPlan plan_butterfly_forward(const Problem& p, const Limits& lim) {
  ForwardPlan plan;
  plan.butterfly = true;
  GeneralArgs& a = plan.ga;
  fill_general(a, p, /*backward=*/false);
  const int n = detail::ceil_log2(p.d);
  const int64_t es = acc_size(p.dtype);
  const int threads = detail::butterfly_threads(n);
  a.R = detail::butterfly_rows(static_cast<int>(es));
  const int64_t group_rows = int64_t(threads) / (p.d / kChunk) * a.R;
  a.groups = ceil_div(p.rows, group_rows);
  plan.vec = rows16(p.d, p.x_ld, p.x);  // the rows are read as 8-element chunks; y is written element by element
  plan.main.threads = threads;
  plan.main.smem = static_cast<size_t>(detail::butterfly_smem_elems(n, static_cast<int>(es)) * es);
  const int64_t occ = std::min<int64_t>(estimated_occupancy(threads, static_cast<int64_t>(plan.main.smem), lim),
                                        detail::butterfly_blocks_per_sm(threads));
  plan.main.grid = dim3(static_cast<unsigned>(persistent_blocks(a.groups, occ, 1, lim)));
  plan.describe = "path=butterfly T=" + str(p.d / kChunk) + " threads=" + str(threads) + " R=" + str(a.R) +
                  " group_rows=" + str(group_rows) + " vec=" + str(plan.vec) + " grid=" + str(plan.main.grid.x) +
                  " smem=" + str(plan.main.smem);
  return plan;
}

// Whether the backward runs layouts.butterfly(d) on butterfly_backward_kernel (docs/CUDA.md, "The butterfly backward
// on the register path"): as the forward (butterfly_forward_applies) for a single butterfly (its stacks keep the general
// kernels), its shared memory within the device's.
bool butterfly_backward_applies(const Problem& p, const Limits& lim, const Knobs& k) {
  if (p.butterfly_reps != 1 || !butterfly_forward_applies(p, lim, k)) return false;
  const int64_t es = acc_size(p.dtype);
  return detail::butterfly_backward_smem_elems(detail::ceil_log2(p.d), static_cast<int>(es)) * es <= lim.smem_optin;
}

// Slot lanes per item of the reduction (ReduceItems): Split, the fewest (a power of two, at most kReduceMaxLanes)
// that leave each lane at most kReduceBatch slots, i.e. one batch of loads in flight; Serial, 1.
int reduce_lanes(int64_t slots, const Knobs& k) {
  if (resolved(k.reduce, reduce_kind_from_env) == ReduceKind::Serial) return 1;
  int lanes = 1;
  while (lanes < detail::kReduceMaxLanes && int64_t(lanes) * detail::kReduceBatch < slots) lanes *= 2;
  return lanes;
}

// The reduction's part of the verbose line.
std::string describe_reduce(const BackwardPlan& plan) {
  return " slots=" + str(plan.slots) + " reduce_lanes=" + str(plan.ra.lanes) + " reduce_grid=" + str(plan.reduce.grid.x);
}

}  // namespace

Variant variant_from_env() {
  return env_switch<Variant>("QGOFT_CUDA_VARIANT", Variant::Reg,
                             {{"base", Variant::Base}, {"table", Variant::Table}, {"reg", Variant::Reg}});
}

XorPath xor_path_from_env() {
  return env_switch<XorPath>("QGOFT_CUDA_XOR", XorPath::Stack,
                             {{"general", XorPath::General}, {"stack", XorPath::Stack}, {"fused", XorPath::Fused}});
}

int butterfly_reps(const int32_t* pairs, const int32_t* offsets, int64_t num_pairs, int64_t num_layers, int64_t d) {
  if (d < 4 || (d & (d - 1)) != 0) return 0;
  const int n = detail::ceil_log2(d);
  if (num_layers == 0 || num_layers % n != 0 || num_pairs != num_layers * (d / 2)) return 0;
  int64_t p = 0;
  for (int64_t r = 0; r < num_layers; ++r) {
    if (offsets[r] != p) return 0;
    const int64_t bit = int64_t(1) << (r % n);
    for (int64_t i = 0; i < d; ++i) {
      if (i & bit) continue;
      if (pairs[2 * p] != i || pairs[2 * p + 1] != (i | bit)) return 0;
      ++p;
    }
  }
  return offsets[num_layers] == p ? static_cast<int>(num_layers / n) : 0;
}

ForwardKernel forward_kernel_from_env() {
  return env_switch<ForwardKernel>("QGOFT_CUDA_FORWARD", ForwardKernel::Prefetch,
                                   {{"plain", ForwardKernel::Plain}, {"prefetch", ForwardKernel::Prefetch}});
}

ReduceKind reduce_kind_from_env() {
  return env_switch<ReduceKind>("QGOFT_CUDA_REDUCE", ReduceKind::Split,
                                {{"split", ReduceKind::Split}, {"serial", ReduceKind::Serial}});
}

void plan_reduce(BackwardPlan& plan, const Problem& p, const Knobs& knobs) {
  ReduceArgs& r = plan.ra;
  r.partial_ld = plan.partial_ld;
  r.slots = plan.slots;
  r.num_pairs = p.num_pairs;
  r.d = p.d;
  r.lanes = reduce_lanes(plan.slots, knobs);
  const detail::ReduceItems items(p.num_pairs, p.d, p.want_blocks, p.want_scale);
  const int64_t per_block = detail::kReduceThreads / r.lanes;
  plan.reduce.grid = dim3(static_cast<unsigned>(
      std::clamp<int64_t>(ceil_div(items.end - items.first, per_block), 1, kMaxGridX)));
  plan.reduce.threads = detail::kReduceThreads;
  plan.reduce.smem = static_cast<size_t>(4 * detail::kReduceThreads * acc_size(p.dtype));
}

RegBackward reg_backward_from_env() {
  return env_switch<RegBackward>("QGOFT_CUDA_BACKWARD", RegBackward::Auto,
                                 {{"auto", RegBackward::Auto}, {"single", RegBackward::Single}, {"pair", RegBackward::Pair}});
}

TopsKind tops_kind_from_env() {
  return env_switch<TopsKind>("QGOFT_CUDA_TOPS", TopsKind::Saved,
                              {{"saved", TopsKind::Saved}, {"recompute", TopsKind::Recompute}});
}

PairPrefetch pair_prefetch_from_env() {
  return env_switch<PairPrefetch>("QGOFT_CUDA_PAIR_PREFETCH", PairPrefetch::On,
                                  {{"on", PairPrefetch::On}, {"off", PairPrefetch::Off}});
}

ForwardPlan plan_forward(const Problem& p, const Limits& lim, const Knobs& knobs) {
  if (butterfly_forward_applies(p, lim, knobs)) return plan_butterfly_forward(p, lim);
  ForwardPlan plan;
  const int64_t es = acc_size(p.dtype);
  const int reps = parallel_reps(p, knobs);
  // table variant: segments of at most 4096 elements (a table of <= 64 KiB in float32)
  const bool vec = rows16(p.d, p.x_ld, p.x) && aligned16(p.out);
  bool table = reps > 0 && (table_variant(knobs, reps) || stack_prefetch_table(knobs, reps, vec));
  ParallelShape s = reps > 0 ? parallel_shape(p.d, table ? kParallelBackwardMaxThreads : kParallelForwardMaxThreads,
                                              knobs.segment)
                             : ParallelShape{};
  if (reps > 1 && table && s.nseg > 1) {  // a stack keeps whole rows: 8192-element segments without a table
    table = false;
    s = parallel_shape(p.d, kParallelForwardMaxThreads, knobs.segment);
  }
  if (reps == 1 || (reps > 1 && s.nseg == 1)) {  // a stack needs whole rows in one block
    plan.parallel = true;
    ParallelArgs& a = plan.pa;
    fill_parallel(a, p, s, reps, /*backward=*/false);
    plan.vec = vec;
    plan.main.grid = dim3(static_cast<unsigned>(std::min(a.groups, kMaxGridX)), s.nseg);
    plan.main.threads = s.R * s.T;
    plan.main.smem = static_cast<size_t>(32 * es);
    if (table && detail::parallel_forward_smem(kChunk * s.T, reps) * es <= lim.smem_optin) {
      a.table = kChunk * s.T;
      plan.main.smem = static_cast<size_t>(detail::parallel_forward_smem(a.table, reps) * es);
      int64_t occ = estimated_occupancy(plan.main.threads, plan.main.smem, lim);
      if (prefetch_forward(knobs, reps, a.table, plan.vec)) {  // its registers allow fewer blocks per SM
        a.prefetch = 1;
        occ = prefetch_occupancy(p.dtype, plan.main.threads, occ, reps > 1 && s.logT == detail::kRegLogT);
      }
      plan.main.grid.x = static_cast<unsigned>(persistent_blocks(a.groups, occ, s.nseg, lim));
    }
    if (s.nseg > 1) {
      plan.top_pass = true;
      plan.top_elems = p.rows * s.nseg;
      plan.top.grid = dim3(static_cast<unsigned>(std::min<int64_t>(ceil_div(p.rows, kTopRowsPerBlock), 65535)));
      plan.top.threads = 32 * kTopRowsPerBlock;
      plan.top.smem = 0;
      // the backward's segments (parallel_shape as plan_backward calls it) are this forward's: its top buffer
      // holds the backward's segment tops (under `base` the forward's segments are 8192 elements: not kept)
      const ParallelShape b = parallel_shape(p.d, kParallelBackwardMaxThreads, knobs.segment);
      plan.tops_for_backward = reps == 1 && b.T == s.T && b.nseg == s.nseg;
    }
    plan.describe =
        describe_parallel(reps, s, plan.vec, a.table) + " prefetch=" + str(a.prefetch) + " grid=" + str(plan.main.grid.x);
    return plan;
  }
  GeneralArgs& a = plan.ga;
  fill_general(a, p, /*backward=*/false);
  const int64_t row_bytes = p.d * es;
  plan.main.threads = kGeneralThreads;
  if (knobs.path != ForcedPath::Global && row_bytes <= lim.smem_optin) {
    int R = 1;
    while (R < kGeneralMaxRows && R < p.rows && 2 * R * row_bytes <= kGeneralSmemTarget) R *= 2;
    a.R = R;
    a.groups = ceil_div(p.rows, R);
    plan.main.grid = dim3(static_cast<unsigned>(std::min(a.groups, kMaxGridX)));
    plan.main.smem = static_cast<size_t>(R * row_bytes);
  } else {
    a.R = 1;
    a.groups = p.rows;
    const int64_t blocks = std::max<int64_t>(
        1, std::min({p.rows, int64_t(lim.sm_count) * 4, kWorkspaceCapBytes / std::max<int64_t>(row_bytes, 1)}));
    a.ws_stride = p.d;
    plan.workspace_elems = blocks * p.d;
    plan.main.grid = dim3(static_cast<unsigned>(blocks));
    plan.main.smem = 0;
  }
  plan.describe = std::string("path=general") + (plan.workspace_elems ? "(global)" : "(smem)") +
                  " R=" + str(a.R) + " grid=" + str(plan.main.grid.x) + " smem=" + str(plan.main.smem);
  return plan;
}

BackwardPlan plan_backward(const Problem& p, const Limits& lim, const Knobs& knobs,
                           const OccupancyFn& occupancy) {
  BackwardPlan plan;
  const int64_t es = acc_size(p.dtype);
  const bool want_scale = p.want_scale;
  const bool grads = p.want_blocks || want_scale;
  plan.grads = grads;
  const int64_t width = 4 * p.num_pairs + p.d;
  plan.partial_ld = round_up(width, 4);
  const int64_t partial_cap = std::max<int64_t>(1, kPartialCapBytes / (plan.partial_ld * es));
  // With parameter gradients, both paths: one partial row per block of the grid (blocks, capped here by
  // partial_cap) and their reduction; returns the reduction's part of the verbose line ("" without gradients).
  auto plan_partials = [&](int64_t& blocks, int64_t& args_partial_ld) -> std::string {
    if (!grads) return {};
    blocks = std::min(blocks, partial_cap);
    plan.slots = blocks;
    args_partial_ld = plan.partial_ld;
    plan_reduce(plan, p, knobs);
    return describe_reduce(plan);
  };

  if (butterfly_backward_applies(p, lim, knobs)) {
    // the forward's threads and sub-blocks, butterfly_backward_rows rows per thread; a persistent grid of the blocks
    // resident at once; one partial row per sub-block (slot blockIdx.x Q + sub)
    plan.butterfly = true;
    GeneralArgs& a = plan.ga;
    fill_general(a, p, /*backward=*/true);
    const int n = detail::ceil_log2(p.d);
    const int threads = detail::butterfly_threads(n);
    const int64_t Q = threads / (p.d / kChunk);
    a.R = detail::butterfly_backward_rows(static_cast<int>(es));
    a.groups = ceil_div(p.rows, Q * a.R);
    // x's rows are read as 8-element chunks (parameter gradients only), dx written so; grad element by element
    plan.vec = (!grads || rows16(p.d, p.x_ld, p.x)) && (a.out == nullptr || aligned16(a.out));
    plan.main.threads = threads;
    plan.main.smem = static_cast<size_t>(detail::butterfly_backward_smem_elems(n, static_cast<int>(es)) * es);
    const int64_t occ = std::min<int64_t>(estimated_occupancy(threads, static_cast<int64_t>(plan.main.smem), lim),
                                          detail::butterfly_blocks_per_sm(threads));
    int64_t blocks = persistent_blocks(a.groups, occ, 1, lim);
    std::string reduce;
    if (grads) {
      // goft's block gradients: one angle sum per pair in the partial rows (ButterflySums), reduced without the givens
      // combination, the scale's sums by a second reduction
      plan.angle_sums = p.givens && p.want_blocks;
      a.angle_sums = plan.angle_sums ? 1 : 0;
      const detail::ButterflySums sums(p.num_pairs, p.d, plan.angle_sums);
      plan.partial_ld = round_up(sums.width, 4);
      a.partial_ld = plan.partial_ld;
      const int64_t cap = std::max<int64_t>(1, kPartialCapBytes / (plan.partial_ld * es));
      blocks = std::max<int64_t>(1, std::min(blocks, cap / Q));
      plan.slots = blocks * Q;
      if (plan.angle_sums) {
        Problem scale_cols = p;  // the scale's columns alone (as "scale" items of a problem without pairs)
        scale_cols.num_pairs = 0;
        scale_cols.want_blocks = false;
        if (p.want_scale) {
          plan_reduce(plan, scale_cols, knobs);
          plan.ra_scale = plan.ra;
          plan.reduce_scale = plan.reduce;
          plan.reduce_scale_launch = true;
          plan.scale_offset_bytes = sums.scale * es;
        }
        Problem angle_cols = scale_cols;  // the angle columns, as "scale" items of width P
        angle_cols.d = p.num_pairs;
        angle_cols.want_scale = true;
        plan_reduce(plan, angle_cols, knobs);
        reduce = describe_reduce(plan) + " angle_sums=1" +
                 (plan.reduce_scale_launch ? " scale_reduce_grid=" + str(plan.reduce_scale.grid.x) : std::string());
      } else {
        plan_reduce(plan, p, knobs);
        reduce = describe_reduce(plan);
      }
    }
    plan.main.grid = dim3(static_cast<unsigned>(blocks));
    plan.describe = "path=butterfly T=" + str(p.d / kChunk) + " threads=" + str(threads) + " R=" + str(a.R) +
                    " group_rows=" + str(Q * a.R) + " vec=" + str(plan.vec) + " grads=" + str(grads) +
                    " grid=" + str(blocks) + " smem=" + str(plan.main.smem) + reduce;
    return plan;
  }

  const int reps = parallel_reps(p, knobs);
  ParallelShape s = reps > 0 ? parallel_shape(p.d, kParallelBackwardMaxThreads, knobs.segment) : ParallelShape{};
  // reg: the single layout's backward with register accumulators (its shared memory has a larger exchange)
  const bool reg = reps == 1 && resolved_variant(knobs) == Variant::Reg;
  // a stack under reg where the reg stacked backward applies (set below, stack_reg_applies) and fits; else the
  // stacked kernel of base
  bool stack_reg = false;
  // reg with 16-byte rows (set below): whether its launched instantiation reads a lane table; rows per thread in
  // flight (2: the paired reg backward, QGOFT_CUDA_BACKWARD=pair)
  bool reg_lanes = false;
  int reg_rows = 1;
  // shared memory (accumulation-type elements) of the parallel or stacked backward kernel with a table of S
  // (stacks: and the earlier repetitions' tapes kept, `tape`)
  auto smem_elems = [&](int S, bool tape) {
    return reps > 1 ? detail::StackBackwardSmem(reps, s.R, s.T, width, p.want_blocks, grads, S, tape, stack_reg && S > 0)
                          .total
                    : detail::ParallelBackwardSmem(s.R, s.T, s.nseg, width, grads, S, reg && S > 0,
                                                   reg && S > 0 && reg_lanes, reg && S > 0 ? reg_rows : 1)
                          .total;
  };
  auto fits = [&](int S, bool tape) { return smem_elems(S, tape) * es <= lim.smem_optin; };
  // a stack's shared memory grows with its rows per block (float64 at small d: 128 rows of 2 threads need
  // more than an H100's 227 KiB): fewer rows per block, down to one warp, before giving up the fused path
  while (reps > 1 && s.nseg == 1 && s.R > 1 && s.R * s.T > 32 && !fits(0, false)) s.R /= 2;
  if (reps == 1 || (reps > 1 && s.nseg == 1 && fits(0, false))) {
    const bool table = table_variant(knobs, reps);
    const BackwardKernel kernel = reps > 1 ? BackwardKernel::ParallelStack : BackwardKernel::Parallel;
    plan.parallel = true;
    ParallelArgs& a = plan.pa;
    fill_parallel(a, p, s, reps, /*backward=*/true);
    const bool vec = rows16(p.d, p.grad_ld, p.grad) && (a.out == nullptr || aligned16(a.out)) &&
                     (!grads || rows16(p.d, p.x_ld, p.x));
    plan.vec = vec;
    reg_lanes = reg && detail::reg_branch_free(s.logT, vec, grads, static_cast<int>(es));
    const RegBackward reg_kernel = resolved(knobs.backward, reg_backward_from_env);
    const bool pair = reg_kernel == RegBackward::Pair || (reg_kernel == RegBackward::Auto && !want_scale);
    if (reg && pair && detail::reg_pair_applies(s.logT, vec, grads, elem_size(p.dtype))) {
      reg_rows = detail::kPairRows;
      if (table && !fits(kChunk * s.T, false)) reg_rows = 1;  // its larger exchange does not fit: the reg kernel
    }
    const int threads = s.R * s.T;
    if (reps > 1 && resolved_variant(knobs) == Variant::Reg &&
        detail::stack_reg_applies(reps, s.logT, vec, grads, static_cast<int>(es))) {
      stack_reg = true;  // so that fits() sizes its shared memory: every repetition's table beside its accumulators
      stack_reg = fits(kChunk * s.T, false);
    }
    a.stack_tape = reps > 1 && grads && !stack_reg && fits(0, true) ? 1 : 0;  // a kept tape saves a forward pass
    if ((table || stack_reg) && fits(kChunk * s.T, a.stack_tape)) {
      a.table = kChunk * s.T;
      a.reg = reg || stack_reg ? 1 : 0;
      // 2: the paired kernel's instantiations without the scale's gradient, under QGOFT_CUDA_BACKWARD=pair only (not
      // yet timed on a GPU; docs/CUDA.md, "The paired reg backward without the scale's gradient")
      a.pair = reg && reg_rows > 1 ? (reg_kernel == RegBackward::Pair && !want_scale ? 2 : 1) : 0;
      // pair=2 of rows of one segment: with or without the L2 prefetch of the pair after the next (an A/B switch)
      if (a.pair == 2 && s.nseg == 1 && resolved(knobs.pair_prefetch, pair_prefetch_from_env) == PairPrefetch::Off) {
        a.pair_prefetch = 0;
      }
    }
    if (grads && s.nseg > 1) plan.top_cols = s.nseg;
    const bool saved_tops = plan.top_cols > 0 && resolved(knobs.tops, tops_kind_from_env) == TopsKind::Saved;
    if (saved_tops && p.tops != nullptr && p.tops_cols == plan.top_cols) {
      plan.top_saved = true;  // the forward's segment tops: no top pass
      a.top = const_cast<void*>(p.tops);
    } else if (plan.top_cols > 0) {  // the forward kernel, with the same variant, recomputes the segment starts
      plan.top_pass = true;
      plan.top_elems = p.rows * s.nseg;
      plan.top.grid = dim3(static_cast<unsigned>(std::min(a.groups, kMaxGridX)), s.nseg);
      plan.top.threads = s.T;
      plan.top.smem = static_cast<size_t>(detail::parallel_forward_smem(a.table) * es);
      if (a.table > 0) {
        int64_t occ = estimated_occupancy(s.T, plan.top.smem, lim);
        // QGOFT_CUDA_FORWARD=prefetch: the prefetching forward, whose top-only mode reads x alone (16-byte x rows
        // suffice, whatever grad and grad_x are)
        if (prefetch_forward(knobs, reps, a.table, rows16(p.d, p.x_ld, p.x))) {
          plan.top_prefetch = 1;
          occ = prefetch_occupancy(p.dtype, s.T, occ);
        }
        plan.top.grid.x = static_cast<unsigned>(persistent_blocks(a.groups, occ, s.nseg, lim));
      }
    }
    plan.main.threads = threads;
    plan.main.smem = static_cast<size_t>(smem_elems(a.table, a.stack_tape) * es);
    int64_t blocks = std::min(a.groups, kMaxGridX);
    if (a.table > 0 || grads) {  // persistent grid: the table read, the parameter gradients summed once per block
      blocks = persistent_blocks(a.groups, occupancy(kernel, vec, grads, threads, plan.main.smem, a), s.nseg, lim);
    }
    const std::string reduce = plan_partials(blocks, a.partial_ld);
    plan.main.grid = dim3(static_cast<unsigned>(blocks), s.nseg);
    plan.describe = describe_parallel(reps, s, vec, a.table) + " reg=" + str(a.reg) + " pair=" + str(a.pair) +
                    (a.pair_prefetch == 0 ? " pair_prefetch=0" : std::string()) +
                    (reps > 1 ? " tape=" + str(a.stack_tape) : std::string()) + " grads=" + str(grads) +
                    " grid=" + str(blocks) + " smem=" + str(plan.main.smem) +
                    (plan.top_pass ? " top_prefetch=" + str(plan.top_prefetch) + " top_grid=" + str(plan.top.grid.x)
                                   : std::string()) +
                    (plan.top_saved ? " top_saved=1" : std::string()) +
                    reduce;
    return plan;
  }

  GeneralArgs& a = plan.ga;
  fill_general(a, p, /*backward=*/true);
  const int64_t row_elems = detail::general_row_elems(p.d, p.num_pairs, grads, grads && p.want_blocks);
  const int64_t acc_elems = grads ? detail::general_acc_elems(p.d, p.num_pairs, p.want_blocks, want_scale) : 0;
  plan.main.threads = kGeneralThreads;
  bool smem_rows = false;
  if (knobs.path != ForcedPath::Global) {
    if ((row_elems + acc_elems) * es <= lim.smem_optin) {
      smem_rows = true;
      a.acc_in_smem = grads ? 1 : 0;
    } else if (row_elems * es <= lim.smem_optin) {
      smem_rows = true;
      a.acc_in_smem = 0;
    }
  }
  int64_t blocks;
  if (smem_rows) {
    const int64_t fixed = a.acc_in_smem ? acc_elems : 0;
    int R = 1;
    while (R < kGeneralMaxRows && R < p.rows && (2 * R * row_elems + fixed) * es <= kGeneralSmemTarget) R *= 2;
    a.R = R;
    a.groups = ceil_div(p.rows, R);
    plan.main.smem = static_cast<size_t>((R * row_elems + fixed) * es);
    blocks = std::min(a.groups, kMaxGridX);
    if (grads) {
      const int occ = occupancy(BackwardKernel::General, false, grads, plan.main.threads, plan.main.smem, plan.pa);
      blocks = persistent_blocks(a.groups, occ, 1, lim);
    }
  } else {
    a.R = 1;
    a.groups = p.rows;
    a.acc_in_smem = 0;
    blocks = std::max<int64_t>(1, std::min({p.rows, int64_t(lim.sm_count) * 2,
                                            kWorkspaceCapBytes / std::max<int64_t>(row_elems * es, 1)}));
    plan.main.smem = 0;
  }
  const std::string reduce = plan_partials(blocks, a.partial_ld);
  if (!smem_rows) {
    a.ws_stride = row_elems;
    plan.workspace_elems = blocks * row_elems;
  }
  plan.main.grid = dim3(static_cast<unsigned>(blocks));
  plan.describe = std::string("path=general") + (smem_rows ? "(smem)" : "(global)") +
                  " acc_in_smem=" + str(a.acc_in_smem) + " R=" + str(a.R) + " grads=" + str(grads) +
                  " grid=" + str(blocks) + " smem=" + str(plan.main.smem) + reduce;
  return plan;
}

}  // namespace qgoft::cuda
