// Launch planning of the CUDA Givens-chain kernels: which kernels, grid shapes, shared memory and the
// sizes of the buffers the caller allocates. Torch-free and host-only, so the same code drives the real
// launches (chain_cuda.cpp) and the host emulation of the kernels (csrc/cuda/sim).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "chain_cuda.h"

namespace qgoft::cuda {

// Debug / testing knobs (environment variables QGOFT_CUDA_PATH and QGOFT_CUDA_SEGMENT in the glue).
enum class ForcedPath { Auto, General, Global };
// Kernel variants of the parallel layout (docs/CUDA.md, "Variants"): Base reads the block table from
// global memory for every row; Table copies each block's segment of it into shared memory once and runs a
// persistent grid; Reg is Table with the backward's register accumulators and one barrier per row
// (parallel_backward_reg_kernel; its forward is Table's). FromEnv: QGOFT_CUDA_VARIANT=base|table|reg (default
// reg: fastest on an H100, bench/RESULTS.md), read by the planner.
enum class Variant { FromEnv, Base, Table, Reg };
// Layouts pairing i with i XOR 2^k beyond the single parallel layout: stack(parallel(d), k), k >= 2, the forward
// of butterfly(d), d = 2^n, and of its stacks, and the backward of butterfly(d). General runs them on the general
// kernels; Stack runs the stacks on the register / shuffle kernels where they qualify and the butterfly on the general
// kernels; Fused runs both on the register path (docs/CUDA.md, "XOR layouts", "The butterfly forward on the register
// path", "The butterfly backward on the register path"). FromEnv:
// QGOFT_CUDA_XOR=general|stack|fused (default stack until a GPU has timed the butterfly kernel), read by the planner.
enum class XorPath { FromEnv, General, Stack, Fused };
// The forward kernel of the single parallel layout under the table variants (table and reg): Plain is
// parallel_forward_kernel; Prefetch is parallel_forward_prefetch_kernel (docs/CUDA.md, "The prefetching
// forward"), used with 16-byte rows. FromEnv: QGOFT_CUDA_FORWARD=plain|prefetch (default prefetch: 1.0-1.6x
// faster on an H100, bench/RESULTS.md), read by the planner.
enum class ForwardKernel { FromEnv, Plain, Prefetch };
// The reduction of the backward's partial rows (docs/CUDA.md, "Deterministic reduction"): Split spreads each
// item's slots over up to kReduceMaxLanes threads and a fixed tree; Serial is one thread per item over every slot
// (lanes = 1, the order of the kernel before Split). FromEnv: QGOFT_CUDA_REDUCE=split|serial (default split), read
// by the planner.
enum class ReduceKind { FromEnv, Split, Serial };
// The reg variant's backward kernel for the single parallel layout where it applies (16-bit activations, 16-byte
// rows, parameter gradients, rows of 2049 .. 4096 elements or segmented: reg_pair_applies): Single is
// parallel_backward_reg_kernel (one row per thread at a time); Pair is parallel_backward_pair_kernel (two rows per
// thread in flight; docs/CUDA.md, "The paired reg backward"; without the scale's gradient Pair, not Auto, runs its
// instantiations for that, ParallelArgs::pair == 2, until a GPU run times them); Auto is Pair without the scale's
// gradient, else Single (on an H100 the paired kernel was 8-9 % faster for goft and qgoft and 7 % slower with the scale's
// gradient, bench/RESULTS.md). FromEnv: QGOFT_CUDA_BACKWARD=auto|single|pair (default auto), read by the planner.
enum class RegBackward { FromEnv, Auto, Single, Pair };
// The segment starts' local results a backward of segmented rows with parameter gradients needs (docs/CUDA.md,
// "Saved segment tops"): Saved takes them from the forward that produced the layer's output when the caller gives
// them (Problem::tops), so the top pass is skipped; Recompute always runs the top pass (the forward kernel over x,
// before the backward). FromEnv: QGOFT_CUDA_TOPS=saved|recompute (default saved), read by the planner.
enum class TopsKind { FromEnv, Saved, Recompute };
// The L2 prefetch of the pair of rows after the next in the paired reg backward's instantiation for rows of one
// segment without the scale's gradient (ParallelArgs::pair == 2, nseg == 1; docs/CUDA.md, "The paired reg backward
// without the scale's gradient"): On keeps it (48 of its 786 bf16 SASS instructions per pair of rows), Off runs its
// instantiation without it (pair_prefetch=0 in the plan). FromEnv: QGOFT_CUDA_PAIR_PREFETCH=on|off (default on: an A/B
// switch until a GPU run times both), read by the planner.
enum class PairPrefetch { FromEnv, On, Off };
struct Knobs {
  ForcedPath path = ForcedPath::Auto;
  int segment = 0;  // 0 or a power of two in [256, 8192]: segment width of the parallel kernels
  Variant variant = Variant::FromEnv;
  XorPath xor_path = XorPath::FromEnv;
  ForwardKernel forward = ForwardKernel::FromEnv;
  ReduceKind reduce = ReduceKind::FromEnv;
  RegBackward backward = RegBackward::FromEnv;
  TopsKind tops = TopsKind::FromEnv;
  PairPrefetch pair_prefetch = PairPrefetch::FromEnv;
};

// The variant named by QGOFT_CUDA_VARIANT (unset or empty: Reg); throws std::invalid_argument for any
// other value than base, table or reg.
Variant variant_from_env();
// The path named by QGOFT_CUDA_XOR (unset or empty: Stack); throws std::invalid_argument for any other
// value than general, stack or fused.
XorPath xor_path_from_env();
// The forward kernel named by QGOFT_CUDA_FORWARD (unset or empty: Prefetch); throws std::invalid_argument for
// any other value than plain or prefetch.
ForwardKernel forward_kernel_from_env();
// The reduction named by QGOFT_CUDA_REDUCE (unset or empty: Split); throws std::invalid_argument for any other
// value than split or serial.
ReduceKind reduce_kind_from_env();
// The reg backward kernel named by QGOFT_CUDA_BACKWARD (unset or empty: Auto); throws std::invalid_argument for
// any other value than auto, single or pair.
RegBackward reg_backward_from_env();
// The tops named by QGOFT_CUDA_TOPS (unset or empty: Saved); throws std::invalid_argument for any other value than
// saved or recompute.
TopsKind tops_kind_from_env();
// The paired kernel's L2 prefetch named by QGOFT_CUDA_PAIR_PREFETCH (unset or empty: On); throws
// std::invalid_argument for any other value than on or off.
PairPrefetch pair_prefetch_from_env();

struct Limits {
  int sm_count = 1;
  int64_t smem_optin = 48 * 1024;  // max dynamic shared memory per block
};

// Resident blocks per SM of a backward kernel configuration (>= 1). For BackwardKernel::Parallel, `pa` is the
// launch's arguments as planned (table, reg, pair pick the instantiation, whose registers differ: e.g. the reg
// kernel without parameter gradients fits two 512-thread blocks per SM where base's fits one).
enum class BackwardKernel { General, Parallel, ParallelStack };
using OccupancyFn =
    std::function<int(BackwardKernel kernel, bool vec, bool grads, int threads, size_t smem, const ParallelArgs& pa)>;

struct Problem {
  DType dtype = DType::Float32;
  int64_t rows = 0, d = 0, num_pairs = 0, num_layers = 0;
  bool parallel_layout = false;  // the layout is exactly layouts.parallel(d)
  int parallel_reps = 0;         // k >= 2 when the layout is exactly layouts.stack(layouts.parallel(d), k)
  int butterfly_reps = 0;  // k >= 1: the layout is exactly layouts.stack(layouts.butterfly(d), k), d = 2^n (butterfly_reps)
  // data pointers / row strides (elements) of the activations, for the vectorisation decision
  const void* x = nullptr;
  int64_t x_ld = 0;
  const void* grad = nullptr;
  int64_t grad_ld = 0;
  const void* out = nullptr;
  // backward only
  bool want_x = true, want_blocks = false, want_scale = false;
  bool givens = false;  // backward: the parameters are angles (goft), whose gradients the caller wants (P,), not (P, 4)
  // backward only: the segment tops the caller kept from the forward (ForwardPlan::tops_for_backward), rows x
  // tops_cols accumulation-type elements, contiguous; null / 0: none
  const void* tops = nullptr;
  int64_t tops_cols = 0;
};

constexpr int kParallelForwardMaxThreads = 1024;  // forward segments of 8192 elements
constexpr int kParallelBackwardMaxThreads = 512;  // backward segments of 4096 (register budget)
constexpr int64_t kParallelMaxD = 131072;         // <= 32 segments of 4096
constexpr int64_t kGeneralSmemTarget = 96 * 1024;  // the general kernels' rows per block grow under this
constexpr int kGeneralMaxRows = 8;
constexpr int64_t kWorkspaceCapBytes = int64_t(1) << 30;
constexpr int64_t kPartialCapBytes = int64_t(1) << 29;

// What a forward or backward launch needs: the parallel kernels (pa; pa.reps > 1 selects the stacked kernels,
// parallel_stack_*, rows of one segment) or the general ones (ga), the main kernel's launch, and for segmented
// parallel rows a second launch `top` with `top_elems` accumulation-type elements of scratch (rows x nseg) to
// allocate and put in pa.top: the forward's top kernel after the main one, or before the backward (with
// parameter gradients) the forward kernel recomputing the segment starts' local results.
struct LaunchPlan {
  bool parallel = false;
  // butterfly_forward_kernel / butterfly_backward_kernel (chain_butterfly.cuh) with ga and `vec` (forward: x's rows;
  // backward: x's rows and dx's)
  bool butterfly = false;
  bool vec = false;
  ParallelArgs pa;
  GeneralArgs ga;
  int64_t workspace_elems = 0;  // general: accumulation-type elements to allocate and put in ga.workspace
  LaunchConfig main;
  bool top_pass = false;
  LaunchConfig top;
  int64_t top_elems = 0;
  std::string describe;  // one line for QGOFT_CUDA_VERBOSE
};

struct ForwardPlan : LaunchPlan {
  // The forward's `top` (rows x nseg: each segment start's local result, written by the main kernel, read but
  // never written by the top kernel) holds exactly what the backward's top pass would compute (the single
  // parallel layout in the backward's segments): the caller may keep it as the segment tops for the backward.
  bool tops_for_backward = false;
};

struct BackwardPlan : LaunchPlan {
  bool grads = false;                 // parameter gradients wanted: partial rows + reduction
  int64_t slots = 0, partial_ld = 0;  // partial: slots x partial_ld accumulation-type elements
  int top_prefetch = 0;  // the top pass runs the prefetching forward (QGOFT_CUDA_FORWARD=prefetch, 16-byte x rows)
  // Segmented rows with parameter gradients: the segment tops the backward kernel reads (pa.top), rows x top_cols;
  // 0 where it reads none. top_saved: they are the caller's (Problem::tops with tops_cols == top_cols, under
  // TopsKind::Saved): pa.top points to them and there is no top pass; otherwise top_pass recomputes them. Tops
  // given with another column count are the caller's error (the glue rejects them).
  int64_t top_cols = 0;
  bool top_saved = false;
  // grads: the reduction of the partial rows, launched after the backward kernel with `reduce`; ra is filled
  // except its pointers (partial, blocks, grad_params, grad_scale), which the caller sets (set_reduce_outputs)
  ReduceArgs ra;
  LaunchConfig reduce;
  // angle_sums (the butterfly backward of goft with its block gradients wanted, GeneralArgs::angle_sums): the partial
  // rows hold one angle sum per pair and the scale's sums after them (ButterflySums); ra sums the angle columns
  // (reduce_partials_kernel without the givens combination: they are combined already) into grad_params, and, with
  // the scale's gradient wanted, a second reduction ra_scale / reduce_scale sums the scale columns
  bool angle_sums = false;
  bool reduce_scale_launch = false;
  int64_t scale_offset_bytes = 0;  // angle_sums: where a partial row's scale sums start
  ReduceArgs ra_scale;
  LaunchConfig reduce_scale;

  // The reductions' pointers: the partial rows, the blocks, the outputs (null where not wanted); then launch ra with
  // `reduce` (its kernel combining givens sums where `givens && !angle_sums`) and, where reduce_scale_launch,
  // ra_scale with reduce_scale (no combination).
  void set_reduce_outputs(const void* partial, const void* blocks, void* grad_params, void* grad_scale) {
    ra.partial = partial;
    ra.blocks = blocks;
    if (angle_sums) {  // the angle columns as "scale" items of width P, written to grad_params
      ra.grad_params = nullptr;
      ra.grad_scale = grad_params;
      ra_scale.partial = static_cast<const char*>(partial) + scale_offset_bytes;
      ra_scale.blocks = blocks;
      ra_scale.grad_scale = grad_scale;
    } else {
      ra.grad_params = grad_params;
      ra.grad_scale = grad_scale;
    }
  }

  // The arguments of the top pass's forward kernel (launched with `top` and `vec`): pa writing only `top`
  // (store = 0, no out), through the prefetching forward where top_prefetch.
  ParallelArgs top_args() const {
    ParallelArgs fa = pa;
    fa.store = 0;
    fa.out = nullptr;
    fa.prefetch = top_prefetch;
    return fa;
  }
};

// k >= 1 when pairs (P, 2) / offsets (L + 1) are exactly layouts.stack(layouts.butterfly(d), k) with d = 2^n >= 4 (k = 1:
// the butterfly itself; k n layers, layer r's d / 2 pairs (i, i + 2^((r-1) mod n)) for the i with that bit clear,
// ascending), else 0. Host values, validated already.
int butterfly_reps(const int32_t* pairs, const int32_t* offsets, int64_t num_pairs, int64_t num_layers, int64_t d);

// The plans fill every field of pa / ga except the buffers the caller allocates (top, workspace,
// partial) and the parameter pointers (blocks, scale), which the caller sets.
ForwardPlan plan_forward(const Problem& p, const Limits& lim, const Knobs& knobs);
BackwardPlan plan_backward(const Problem& p, const Limits& lim, const Knobs& knobs,
                           const OccupancyFn& occupancy);
// The reduction of plan.slots partial rows of plan.partial_ld entries (plan_backward calls it when gradients are
// wanted): plan.ra but its pointers, and plan.reduce. p: the problem's sizes, dtype and wanted gradients.
void plan_reduce(BackwardPlan& plan, const Problem& p, const Knobs& knobs);

}  // namespace qgoft::cuda
