// Buffer sizes shared by the CUDA kernels and the host glue (so both sides agree by construction).
#pragma once

#include <cstdint>

#include "chain_cuda.h"

#if defined(__CUDACC__)
#define QGOFT_HOST_DEVICE __host__ __device__
#else
#define QGOFT_HOST_DEVICE
#endif

namespace qgoft::cuda::detail {

// The smallest l with 2^l >= v (v >= 1): log2 of a power of two, rounded up otherwise.
QGOFT_HOST_DEVICE constexpr int ceil_log2(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return l;
}

// Block table of one row segment of S = 8 T elements in shared memory (the "table" variant of the
// parallel kernels, ParallelArgs::table = S): layers 1 .. log2 S, layer r's S >> r blocks (4 entries
// each) from block first(S, r) = S - (S >> (r - 1)) on, S - 1 blocks in all. The in-thread layers
// (r <= 3, 8 >> r pairs per thread) are stored transposed, pair j of thread t at first(S, r) + j T + t,
// so that the threads of a warp read consecutive blocks; layers r > 3 in pair order.
struct ParallelTable {
  static QGOFT_HOST_DEVICE int64_t blocks(int S) { return S > 0 ? S - 1 : 0; }
  static QGOFT_HOST_DEVICE int first(int S, int r) { return S - (S >> (r - 1)); }
};

// The reg backward (chain_parallel_reg.cuh) is also compiled for one segment width known at compile time,
// T = 2^kRegLogT threads (S = 4096 elements: rows of 2049 .. 4096 elements, and every segmented row).
constexpr int kRegLogT = 9;

// Whether the reg backward runs its branch-free instantiation (kLive in chain_parallel_reg.cuh): segments of
// 2^kRegLogT threads, 16-byte rows, parameter gradients, float accumulation (acc_bytes 4). Only that one
// reads the lane table (ParallelLaneTable), so the planner sizes its shared memory with this same rule.
QGOFT_HOST_DEVICE constexpr bool reg_branch_free(int logT, bool vec, bool grads, int acc_bytes) {
  return logT == kRegLogT && vec && grads && acc_bytes == 4;
}

// Lane table of the reg backward's branch-free instantiation: the block each thread reads in each layer of
// its shuffle and cross-warp levels (log2 T layers: the shuffle layers, then the cross-warp layers), copied
// from the segment's ParallelTable once per block, so that the row loop reads layer L's block at one address
// per thread plus a constant instead of computing the block's index per row. The block a thread t reads
// depends on t / 2 only (in every layer, the two threads t & ~1 and t | 1 read the same one), so layer L of
// thread t is block L (T / 2) + t / 2: a warp reads 16 consecutive blocks per layer (conflict-free).
struct ParallelLaneTable {
  static QGOFT_HOST_DEVICE int64_t blocks(int logT) { return logT > 0 ? static_cast<int64_t>(logT) << (logT - 1) : 0; }
  static QGOFT_HOST_DEVICE int at(int logT, int layer, int t) { return (layer << (logT - 1)) + (t >> 1); }
};

// Whether the paired reg backward (parallel_backward_pair_kernel, chain_parallel_pair.cuh; two rows per thread in
// flight) can run a launch: the reg backward's branch-free instantiation (reg_branch_free) with 16-bit activations
// (elem_bytes 2; float32 rows' 32 bytes per chunk and row do not fit its registers twice). One rule for the
// kernel's instantiation and the planner.
QGOFT_HOST_DEVICE constexpr bool reg_pair_applies(int logT, bool vec, bool grads, int elem_bytes) {
  return elem_bytes == 2 && reg_branch_free(logT, vec, grads, 4);  // 16-bit activations accumulate in float
}
// Rows per thread in flight of the paired reg backward.
constexpr int kPairRows = 2;

// Resident blocks of 512 threads per SM the prefetching forward (parallel_forward_prefetch_kernel) is compiled
// for (its __launch_bounds__ minimum, which caps its registers) and the planner sizes its persistent grid by
// (smaller blocks: as many more as fit the same threads): 16-bit rows 3 (40 registers, like the table forward),
// float32 rows 2 (its 32 bytes of next row spilled at 40 registers), float64 1. stack512: a stack's instantiation for
// 512-thread segments (kStack, kLogT = kRegLogT): 1 (every repetition's table, >= 2 x 64 KiB, leaves room for one
// block; at 40 registers the bf16 one spilled 32 + 16 bytes).
QGOFT_HOST_DEVICE constexpr int prefetch_forward_blocks(int elem_bytes, bool stack512 = false) {
  return stack512 ? 1 : elem_bytes == 2 ? 3 : elem_bytes == 4 ? 2 : 1;
}

// Shared memory of the parallel forward kernel, in accumulation-type elements: [32] exchange words |
// [reps][4 (S - 1)] the segment's block table of each repetition (table variant, S = ParallelArgs::table > 0;
// reps > 1: the stacked kernel).
QGOFT_HOST_DEVICE inline int64_t parallel_forward_smem(int table, int reps = 1) {
  return 32 + static_cast<int64_t>(reps) * 4 * ParallelTable::blocks(table);
}

// Shared memory of the parallel backward kernel, in accumulation-type elements:
// [32] exchange words (the reg variant, `pipelined`: [2][rows][2][32], two buffers of values and gradients of each of
// the `rows` rows a thread has in flight: 1, or 2 in the paired reg backward) | [R][T-1][4] cross-thread pair
// accumulators | [31 * 4 + 32] top-layer
// accumulators (segmented rows) | [R][width] per-slot sums (R > 1) | (table variant, from a multiple
// of 4 elements) [4 (S - 1)] the segment's block table | (reg variant) [S] the segment's scale |
// (`lanes`: the reg variant's branch-free instantiation, reg_branch_free) [4 ParallelLaneTable::blocks] the
// lane table | (rows > 1: the paired reg backward) [S] the scale sums of each thread's chunk (owner-only).
struct ParallelBackwardSmem {
  int64_t cacc, tacc, red, tab, scl, lane, ssum, total;
  QGOFT_HOST_DEVICE ParallelBackwardSmem(int R, int T, int nseg, int64_t width, bool grads, int table,
                                         bool pipelined = false, bool lanes = false, int rows = 1) {
    cacc = pipelined ? 128 * rows : 32;
    tacc = cacc + (grads ? static_cast<int64_t>(R) * (T - 1) * 4 : 0);
    red = tacc + (grads && nseg > 1 ? 5 * kMaxTopLanes : 0);
    const int64_t end = red + (grads && R > 1 ? static_cast<int64_t>(R) * width : 0);
    tab = table > 0 ? (end + 3) / 4 * 4 : end;
    scl = tab + 4 * ParallelTable::blocks(table);
    lane = scl + (pipelined ? table : 0);  // a multiple of 4 elements (tab, 4 (S - 1) and S are): 16-byte blocks
    ssum = lane + (lanes ? 4 * ParallelLaneTable::blocks(ceil_log2(T)) : 0);
    total = ssum + (pipelined && rows > 1 ? table : 0);
  }
};

// Values of a thread's tape in the parallel kernels (Tape in chain_parallel.cuh): the chunk before each
// in-thread layer, one word per shuffle layer, one per cross-warp layer.
constexpr int kTapeWords = kLogChunk * kChunk + 5 + 5;

// Shared memory of the stacked parallel backward kernel (ParallelArgs::reps > 1), in accumulation-type
// elements: [32] exchange words | (blocks wanted) [reps][R][T-1][4] cross-thread pair accumulators and
// [reps][7][4][R T] in-thread pair accumulators (component-major: entry c of in-thread pair k of thread tid
// in repetition j at ((7 j + k) 4 + c) R T + tid, conflict-free) | (gradients wanted) [reps-1][W][R T] the
// saved inputs (W = 8) or tapes (`tape`, ParallelArgs::stack_tape; W = kTapeWords) of repetitions
// 0 .. reps-2 | [R][width] per-slot sums (R > 1) | (table variant, from a multiple of 4 elements)
// [reps][4 (S - 1)] each repetition's segment table.
// `reg` (the reg stacked backward, parallel_stack_reg_kernel in chain_stack_reg.cuh; R = 1, with a table): the
// exchange words are [2][2][32] (two buffers of values and gradients); the in-thread accumulators are those of
// repetitions 0 .. reps-2 only (the last one's are registers), thread-contiguous: pair k of thread t in repetition j
// at ((7 j + k) T + t) 4, one 16-byte block (owner-only); the saved words of repetitions 0 .. reps-2 are
// [reps-1][T][8] each thread's input (thread-contiguous) | [reps-1][5][T] each thread's shuffle-layer tape (word-major)
// | [reps-1][32][4] the cross-warp tape, one per block (lane q's words from 4 q; every warp computes the same):
// StackRegSaved.
struct StackRegSaved {
  static QGOFT_HOST_DEVICE int64_t input(int j, int T) { return static_cast<int64_t>(j) * T * kChunk; }
  static QGOFT_HOST_DEVICE int64_t shuffle(int reps, int j, int T) {
    return input(reps - 1, T) + static_cast<int64_t>(j) * 5 * T;
  }
  static QGOFT_HOST_DEVICE int64_t cross_warp(int reps, int j, int T) { return shuffle(reps, reps - 1, T) + 128 * j; }
  static QGOFT_HOST_DEVICE int64_t words(int reps, int T) { return cross_warp(reps, reps - 1, T); }
};
QGOFT_HOST_DEVICE constexpr bool stack_reg_applies(int reps, int logT, bool vec, bool grads, int acc_bytes) {
  return reps > 1 && reg_branch_free(logT, vec, grads, acc_bytes);  // the reg kernel's branch-free instantiation
}
struct StackBackwardSmem {
  int64_t cacc, iacc, vin, red, tab, total;
  QGOFT_HOST_DEVICE StackBackwardSmem(int reps, int R, int T, int64_t width, bool blocks, bool grads, int table,
                                      bool tape, bool reg = false) {
    const int64_t rt = static_cast<int64_t>(R) * T;
    cacc = reg ? 128 : 32;
    iacc = cacc + (blocks ? static_cast<int64_t>(reps) * R * (T - 1) * 4 : 0);
    vin = iacc + (blocks ? static_cast<int64_t>(reg ? reps - 1 : reps) * (kChunk - 1) * 4 * rt : 0);
    const int64_t saved =
        reg ? StackRegSaved::words(reps, T) : static_cast<int64_t>(reps - 1) * (tape ? kTapeWords : kChunk) * rt;
    red = vin + (grads ? saved : 0);
    const int64_t end = red + (grads && R > 1 ? static_cast<int64_t>(R) * width : 0);
    tab = table > 0 ? (end + 3) / 4 * 4 : end;
    total = tab + static_cast<int64_t>(reps) * 4 * ParallelTable::blocks(table);
  }
};

// The reduction of the backward's partial rows into the parameter gradients (reduce_partials_kernel; docs/CUDA.md,
// "Deterministic reduction"). Its items are the 4-entry columns of the partial rows: item k holds entries
// 4k .. 4k + 3 of every row, pair k's block gradient for k < P, then scale entries 4 (k - P) .. 4 (k - P) + 3 (those
// below d); the wanted ones are [first, end). Blocks of kReduceThreads threads, ReduceArgs::lanes threads per item
// (a power of two <= kReduceMaxLanes; kReduceThreads / lanes items per block), lane j summing slots j, j + lanes,
// j + 2 lanes, ... with up to kReduceBatch loads in flight; then a fixed tree over the lanes.
constexpr int kReduceThreads = 256;
constexpr int kReduceMaxLanes = 64;  // >= 4 items per block: a warp's 16-byte loads cover whole 32-byte sectors
constexpr int kReduceBatch = 8;
struct ReduceItems {
  int64_t first, end;
  QGOFT_HOST_DEVICE ReduceItems(int64_t num_pairs, int64_t d, bool params, bool scale)
      : first(params ? 0 : num_pairs), end(scale ? num_pairs + (d + 3) / 4 : num_pairs) {}
};

// The butterfly forward (butterfly_forward_kernel, chain_butterfly.cuh; docs/CUDA.md, "The butterfly forward on the
// register path"): layouts.butterfly(d) for d = 2^n, kButterflyMinLogD <= n <= kButterflyMaxLogD. d / 8 threads per
// row copy (sub-block), blocks of butterfly_threads(n) threads (several sub-blocks for d < 1024), every thread
// holding butterfly_rows values of 8 elements (rows of its sub-block); shared memory: the block's rows in the
// accumulation type, one buffer for the transposes between rounds. __launch_bounds__(kButterflyMaxThreads, 1): up to
// 128 registers, so butterfly_blocks_per_sm(threads) blocks per SM by registers. One rule for kernel and planner.
constexpr int kButterflyMinLogD = 3;
constexpr int kButterflyMaxLogD = 12;
constexpr int kButterflyMaxThreads = 512;
constexpr int kButterflyMinThreads = 128;
QGOFT_HOST_DEVICE constexpr int butterfly_rows(int acc_bytes) { return acc_bytes == 8 ? 2 : 8; }
QGOFT_HOST_DEVICE constexpr int butterfly_threads(int log_d) {
  return (1 << (log_d - kLogChunk)) > kButterflyMinThreads ? 1 << (log_d - kLogChunk) : kButterflyMinThreads;
}
QGOFT_HOST_DEVICE constexpr int64_t butterfly_smem_elems(int log_d, int acc_bytes) {
  return static_cast<int64_t>(butterfly_threads(log_d)) * butterfly_rows(acc_bytes) * kChunk;
}
QGOFT_HOST_DEVICE constexpr int butterfly_blocks_per_sm(int threads) { return kButterflyMaxThreads / threads; }
// The butterfly backward (butterfly_backward_kernel; docs/CUDA.md, "The butterfly backward on the register path"): the
// forward's sub-blocks, threads and rounds (butterfly_rounds), butterfly_backward_rows rows per thread (values and
// gradients: 16 registers per row), shared memory: one buffer of the block's rows per round after the first, round m's
// input (slots as the forward's transposes), through which the gradient goes back to round m - 1's window.
QGOFT_HOST_DEVICE constexpr int butterfly_rounds(int log_d) { return (log_d + kLogChunk - 1) / kLogChunk; }
QGOFT_HOST_DEVICE constexpr int butterfly_backward_rows(int acc_bytes) { return acc_bytes == 8 ? 2 : 4; }
// Its partial rows: 4P block sums then d scale sums (the other backward kernels' layout), or, with angle sums
// (GeneralArgs::angle_sums: goft's block gradients wanted), P angle sums (d theta = -s a00 - c a01 + c a10 - s a11 of
// each row group's block sums, as reduce_partials_kernel combines them) padded to a multiple of 4, then the d scale
// sums: `scale` is where the scale's sums start, `width` the row's entries.
struct ButterflySums {
  int64_t scale, width;
  QGOFT_HOST_DEVICE ButterflySums(int64_t num_pairs, int64_t d, bool angle_sums)
      : scale(angle_sums ? (num_pairs + 3) / 4 * 4 : 4 * num_pairs), width(scale + d) {}
};
QGOFT_HOST_DEVICE constexpr int64_t butterfly_backward_smem_elems(int log_d, int acc_bytes) {
  return static_cast<int64_t>(butterfly_rounds(log_d) - 1) * butterfly_threads(log_d) * butterfly_backward_rows(acc_bytes) *
         kChunk;
}

// General kernels: per-row buffer elements (z and g rows, and the tape of block inputs) and the
// accumulator elements (4P block entries, d scale entries).
QGOFT_HOST_DEVICE inline int64_t general_row_elems(int64_t d, int64_t num_pairs, bool grads,
                                                   bool want_blocks) {
  return (grads ? 2 * d : d) + (grads && want_blocks ? 2 * num_pairs : 0);
}
QGOFT_HOST_DEVICE inline int64_t general_acc_elems(int64_t d, int64_t num_pairs, bool want_blocks,
                                                   bool want_scale) {
  return (want_blocks ? 4 * num_pairs : 0) + (want_scale ? d : 0);
}

}  // namespace qgoft::cuda::detail
