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

// Shared memory of the parallel backward kernel, in accumulation-type elements:
// [32] exchange words | [R][T-1][4] cross-thread pair accumulators | [31 * 4 + 32] top-layer
// accumulators (segmented rows) | [R][width] per-slot sums (R > 1).
struct ParallelBackwardSmem {
  int64_t cacc, tacc, red, total;
  QGOFT_HOST_DEVICE ParallelBackwardSmem(int R, int T, int nseg, int64_t width, bool grads) {
    cacc = 32;
    tacc = cacc + (grads ? static_cast<int64_t>(R) * (T - 1) * 4 : 0);
    red = tacc + (grads && nseg > 1 ? 5 * kMaxTopLanes : 0);
    total = red + (grads && R > 1 ? static_cast<int64_t>(R) * width : 0);
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
