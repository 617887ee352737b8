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

// Block table of one row segment of S = 8 T elements in shared memory (the "table" variant of the
// parallel kernels, ParallelArgs::table = S): layers 1 .. log2 S, layer r's S >> r blocks (4 entries
// each) from block first(S, r) = S - (S >> (r - 1)) on, S - 1 blocks in all. The in-thread layers
// (r <= 3, 8 >> r pairs per thread) are stored transposed, pair j of thread t at first(S, r) + j T + t,
// so that the threads of a warp read consecutive blocks; layers r > 3 in pair order.
struct ParallelTable {
  static QGOFT_HOST_DEVICE int64_t blocks(int S) { return S > 0 ? S - 1 : 0; }
  static QGOFT_HOST_DEVICE int first(int S, int r) { return S - (S >> (r - 1)); }
};

// Shared memory of the parallel forward kernel, in accumulation-type elements: [32] exchange words |
// [reps][4 (S - 1)] the segment's block table of each repetition (table variant, S = ParallelArgs::table > 0;
// reps > 1: the stacked kernel).
QGOFT_HOST_DEVICE inline int64_t parallel_forward_smem(int table, int reps = 1) {
  return 32 + static_cast<int64_t>(reps) * 4 * ParallelTable::blocks(table);
}

// Shared memory of the parallel backward kernel, in accumulation-type elements:
// [32] exchange words (the reg variant, `pipelined`: [2][2][32], two buffers of values and gradients) | [R][T-1][4] cross-thread pair accumulators | [31 * 4 + 32] top-layer
// accumulators (segmented rows) | [R][width] per-slot sums (R > 1) | (table variant, from a multiple
// of 4 elements) [4 (S - 1)] the segment's block table | (reg variant) [S] the segment's scale.
struct ParallelBackwardSmem {
  int64_t cacc, tacc, red, tab, scl, total;
  QGOFT_HOST_DEVICE ParallelBackwardSmem(int R, int T, int nseg, int64_t width, bool grads, int table,
                                         bool pipelined = false) {
    cacc = pipelined ? 128 : 32;
    tacc = cacc + (grads ? static_cast<int64_t>(R) * (T - 1) * 4 : 0);
    red = tacc + (grads && nseg > 1 ? 5 * kMaxTopLanes : 0);
    const int64_t end = red + (grads && R > 1 ? static_cast<int64_t>(R) * width : 0);
    tab = table > 0 ? (end + 3) / 4 * 4 : end;
    scl = tab + 4 * ParallelTable::blocks(table);
    total = scl + (pipelined ? table : 0);
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
struct StackBackwardSmem {
  int64_t cacc, iacc, vin, red, tab, total;
  QGOFT_HOST_DEVICE StackBackwardSmem(int reps, int R, int T, int64_t width, bool blocks, bool grads, int table,
                                      bool tape) {
    const int64_t rt = static_cast<int64_t>(R) * T;
    cacc = 32;
    iacc = cacc + (blocks ? static_cast<int64_t>(reps) * R * (T - 1) * 4 : 0);
    vin = iacc + (blocks ? static_cast<int64_t>(reps) * (kChunk - 1) * 4 * rt : 0);
    red = vin + (grads ? static_cast<int64_t>(reps - 1) * (tape ? kTapeWords : kChunk) * rt : 0);
    const int64_t end = red + (grads && R > 1 ? static_cast<int64_t>(R) * width : 0);
    tab = table > 0 ? (end + 3) / 4 * 4 : end;
    total = tab + static_cast<int64_t>(reps) * 4 * ParallelTable::blocks(table);
  }
};

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
