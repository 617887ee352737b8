// Torch-free interface of the CUDA Givens-chain kernels (the ATen glue is chain_cuda.cpp).
//
// Conventions (docs/CONTRACT.md): rows of x of width d; block p = [[g00, g01], [g10, g11]] acts on the
// pair (i, j) = (pairs[2p], pairs[2p+1]) as x_i <- g00 x_i + g10 x_j, x_j <- g01 x_i + g11 x_j (G_p^T),
// for p = 0 .. P-1 in storage order, then x <- scale * x. The backward pass applies the transpose chain
// to the incoming gradient (scale first, then G_p for p descending) and accumulates
// dG_p[r][c] = sum_rows u_r g_c (u: the block's input, g: the gradient of its output) and
// d scale = sum_rows grad * (R^T x).
//
// Two families of kernels (docs/CUDA.md has the full design):
// * "parallel": the paper's default layout, recognised by the glue. Each thread holds kChunk = 8
//   consecutive elements of a row in registers; layers 1-3 are in-thread, the next ones use warp
//   shuffles, the last ones go through a few words of shared memory. Rows wider than one block's
//   segment (S = 8 * threads) are cut into segments; the layers above the segment size (whose pairs
//   only join segment starts) run in a small second step (forward) or redundantly per block (backward).
// * "stack": stack(parallel(d), k), k >= 2, rows of one segment: the parallel kernels' per-layer
//   machinery run k times over the same registers (chain_stack.cuh), one pass over x.
// * "butterfly": layouts.butterfly(d), d = 2^n <= 4096 (forward: and its stacks): a thread holds 8 elements of each
//   of 8 rows (backward: 4, with their gradients), the layers in rounds of 3 index bits in-thread, the rows
//   transposed through shared memory between rounds.
// * "general": any layout. A block holds R rows in shared memory (or, when they do not fit, in a
//   global-memory workspace), threads take the pairs of a layer, a barrier separates layers.
// Parameter gradients: every block accumulates the rows it owns (a fixed, launch-independent set) in a
// fixed order into its own row of `partial`; reduce_partials() sums the rows in index order.
// Deterministic for a given problem and device (the number of blocks depends on the SM count).
//
// Accumulation type A: double for Float64 activations, float otherwise. blocks (P, 4) and scale (d)
// are given in A; blocks must be 16-byte aligned.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype.h"

namespace qgoft::cuda {

using DType = ::qgoft::DType;  // common/dtype.h

constexpr int kChunk = 8;             // elements per thread in the parallel-layout kernels
constexpr int kLogChunk = 3;
constexpr int kLayerTable = 24;       // entries of ParallelArgs::off (layers 1 .. 23)
constexpr int kMaxTopLanes = 32;      // segments per row in the parallel kernels (one warp's lanes)
constexpr int kGeneralThreads = 256;  // block size of the general kernels
constexpr int kTopRowsPerBlock = 8;   // rows (warps) per block of the top-forward kernel

struct ParallelArgs {
  int64_t rows = 0;
  int64_t d = 0;
  int64_t num_pairs = 0;
  const void* x = nullptr;     // forward input / backward x (rows with stride x_ld, unit stride in d)
  int64_t x_ld = 0;
  const void* grad = nullptr;  // backward grad_out
  int64_t grad_ld = 0;
  void* out = nullptr;         // y (forward) or grad_x (backward), contiguous (ld = d); may be null
  const void* blocks = nullptr;
  const void* scale = nullptr;
  void* top = nullptr;         // segmented rows: (rows, nseg) local results of the segment starts
  void* partial = nullptr;     // backward with parameter gradients: (slots, partial_ld)
  int64_t partial_ld = 0;
  int64_t groups = 0;          // ceil(rows / R)
  int32_t off[kLayerTable] = {};  // off[r]: first pair of layer r (1-based) of the parallel layout
  int32_t top_off[8] = {};     // off[log2(S) + 1 + s] for the top layers s = 0 .. 7
  int T = 1;                   // threads per row segment (power of two, 1 .. 1024)
  int logT = 0;
  int R = 1;                   // row slots per block (1 when segmented)
  int nseg = 1;                // segments per row; > 1 only with T >= 32 and R == 1
  int top_layers = 0;          // ceil(log2(nseg))
  int want_blocks = 0;
  int want_scale = 0;
  int store = 1;               // forward: 0 = only write `top` (recomputation for the backward)
  // > 0 (the "table" variant, = 8 T): every block first copies the blocks of its segment's layers
  // 1 .. log2(8 T) into shared memory (ParallelTable in chain_sizes.h) and reads them from there for all
  // the rows it owns; 0: every row reads them from the global (P, 4) table.
  int table = 0;
  // Repetitions of the parallel layout: 1, or k for stack(parallel(d), k) run by the stacked kernels
  // (chain_stack.cuh; rows of one segment, nseg == 1): repetition j uses blocks j (d - 1) .. (j + 1)(d - 1) - 1
  // of the table, the off[] of one repetition, and num_pairs = k (d - 1).
  int reps = 1;
  // 1 (backward, with table > 0): the "reg" variant, parallel_backward_reg_kernel (chain_parallel_reg.cuh); with
  // reps > 1 the reg stacked backward, parallel_stack_reg_kernel (chain_stack_reg.cuh; stack_reg_applies).
  int reg = 0;
  // 1 (forward, with table > 0, reps == 1 and 16-byte rows; or the backward's top pass, store == 0, with 16-byte
  // x rows): the prefetching forward, parallel_forward_prefetch_kernel (chain_parallel_prefetch.cuh;
  // QGOFT_CUDA_FORWARD=prefetch).
  int prefetch = 0;
  // 1 (backward, with reg == 1): the paired reg backward, parallel_backward_pair_kernel (chain_parallel_pair.cuh;
  // QGOFT_CUDA_BACKWARD=pair): two rows per thread in flight; only where reg_pair_applies (chain_sizes.h). 2: its
  // instantiations without the scale's gradient (want_scale == 0; one for rows of one segment, one for segmented
  // rows; QGOFT_CUDA_BACKWARD=pair only, until a GPU run times them).
  int pair = 0;
  // 1 (the default): the paired reg backward prefetches the pair of rows after the next into L2 (prefetch_chunk);
  // 0: its instantiation without that prefetch, for pair == 2 with rows of one segment only
  // (QGOFT_CUDA_PAIR_PREFETCH=off, an A/B switch until a GPU run times both; docs/CUDA.md, "The paired reg backward
  // without the scale's gradient").
  int pair_prefetch = 1;
  // Stacked backward with parameter gradients: 1 = repetitions 0 .. reps-2 keep their tape in shared memory
  // from the first pass (no recomputation), 0 = only their inputs (recomputed); the planner picks 1 when it fits.
  int stack_tape = 0;
};

struct GeneralArgs {
  int64_t rows = 0;
  int64_t d = 0;
  int64_t num_pairs = 0;
  int64_t num_layers = 0;
  const void* x = nullptr;
  int64_t x_ld = 0;
  const void* grad = nullptr;
  int64_t grad_ld = 0;
  void* out = nullptr;
  const int32_t* pairs = nullptr;    // (P, 2), 8-byte aligned
  const int32_t* offsets = nullptr;  // (L + 1)
  const void* blocks = nullptr;
  const void* scale = nullptr;
  int64_t groups = 0;
  int R = 1;                         // rows per group
  // Row buffers (z, g, tape) in shared memory, or in `workspace` (ws_stride elements per block).
  void* workspace = nullptr;
  int64_t ws_stride = 0;
  // Accumulators (4P block entries, then d scale entries) in shared memory after the row buffers, or
  // directly in the block's row of `partial`.
  int acc_in_smem = 0;
  void* partial = nullptr;
  int64_t partial_ld = 0;
  int want_blocks = 0;
  int want_scale = 0;
  // the butterfly backward only: the partial rows hold one angle sum per pair (givens: d theta of each row group's
  // sums) instead of the 4 block sums, the scale's sums after them (ButterflySums in chain_sizes.h)
  int angle_sums = 0;
};

struct GivensArgs {
  const void* angles = nullptr;  // (P,) float or double, contiguous
  void* blocks = nullptr;        // (P, 4) A: cos, -sin, sin, cos
  int64_t num_pairs = 0;
};

struct ReduceArgs {
  const void* partial = nullptr;  // (slots, partial_ld) A
  int64_t partial_ld = 0;
  int64_t slots = 0;
  int64_t num_pairs = 0;
  int64_t d = 0;
  const void* blocks = nullptr;   // (P, 4) A (givens: for d theta)
  void* grad_params = nullptr;    // givens: (P,) A; quasi: (P, 4) A; null if not wanted
  void* grad_scale = nullptr;     // (d,) A; null if not wanted
  int lanes = 1;                  // threads per item, each summing every lanes-th slot (ReduceItems in chain_sizes.h)
};

struct LaunchConfig {
  dim3 grid;
  int threads = 0;
  size_t smem = 0;
};

// Each launcher launches exactly one kernel on `stream`; the caller checks the launch
// (C10_CUDA_KERNEL_LAUNCH_CHECK). Dynamic shared memory above 48 KiB is enabled as needed.
void parallel_forward(DType t, bool vec, const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s);
void parallel_top_forward(DType t, const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s);
void parallel_backward(DType t, bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                       cudaStream_t s);
void parallel_stack_backward(DType t, bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                             cudaStream_t s);
void general_forward(DType t, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s);
// layouts.butterfly(d), d = 2^n (chain_butterfly.cuh): a as planned by plan_forward (rows, d, x, out, blocks, scale,
// groups, R); vec: x's rows read as 16-byte words.
void butterfly_forward(DType t, bool vec, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s);
// Its backward (a single butterfly): a as planned by plan_backward (rows, d, x, grad, out, blocks, scale, groups, R,
// partial, want_*); vec: x's rows read and dx's written as 16-byte words; grads: parameter gradients (partial rows).
void butterfly_backward(DType t, bool vec, bool grads, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s);
void general_backward(DType t, bool grads, const GeneralArgs& a, const LaunchConfig& c,
                      cudaStream_t s);
void givens_blocks(bool acc_double, bool angles_double, const GivensArgs& a, cudaStream_t s);
void reduce_partials(bool acc_double, bool givens, const ReduceArgs& a, const LaunchConfig& c, cudaStream_t s);

// Resident blocks per SM of the backward kernels (for sizing their persistent grids); >= 1.
// (the parallel and stacked backward: of the kernel parallel_backward / parallel_stack_backward launches for a)
int parallel_backward_occupancy(DType t, bool vec, bool grads, const ParallelArgs& a, int threads, size_t smem);
int parallel_stack_backward_occupancy(DType t, bool vec, bool grads, const ParallelArgs& a, int threads, size_t smem);
int general_backward_occupancy(DType t, bool grads, int threads, size_t smem);

}  // namespace qgoft::cuda
