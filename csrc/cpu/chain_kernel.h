// Torch-free interface of the CPU Givens-chain kernels.
//
// Conventions (docs/CONTRACT.md): rows of x of width d; block p = [[g00, g01], [g10, g11]] acts on the
// pair (i, j) = (pairs[2p], pairs[2p+1]) as x_i <- g00 x_i + g10 x_j, x_j <- g01 x_i + g11 x_j (that is
// G_p^T), for p = 0 .. P-1 in storage order, then x <- scale * x. The backward pass applies the transpose
// chain to the incoming gradient and accumulates dG_p[r][c] = sum_rows u_r g_c (u: the block's input,
// g: the gradient of its output) and d scale = sum_rows grad * (R^T x).
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace qgoft::cpu {

using DType = ::qgoft::DType;  // common/dtype.h

// Instruction sets a kernel variant is compiled for (ordered by preference).
enum class Isa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

struct ChainParams {
  DType dtype = DType::Float32;    // activation dtype of x / grad / outputs
  int64_t d = 0;                   // row width
  int64_t num_pairs = 0;           // P
  const int32_t* pairs = nullptr;  // (P, 2), validated: 0 <= i < j < d
  // (P, 4) blocks g00, g01, g10, g11 and optional (d,) scale, in the accumulation type:
  // double for Float64 activations, float otherwise.
  const void* blocks = nullptr;
  const void* scale = nullptr;
};

// Rows per tile of the kernel selected at run time for activations of this dtype and width d (row
// ranges given to the kernels below are arbitrary; this only matters for the deterministic chunking
// of the reduction, which must depend on the problem only).
int tile_rows(DType dtype, int64_t d);

// y[r] = chain(x[r]) for rows r in [row_begin, row_end). x rows have stride x_ld (elements), y is
// contiguous with stride d.
void chain_forward(const ChainParams& p, const void* x, int64_t x_ld, void* y, int64_t row_begin,
                   int64_t row_end);

// Backward over rows [row_begin, row_end).
// * grad_x (contiguous, stride d) receives the transpose chain applied to grad rows; may be null.
// * When partial_blocks is non-null, x is read, and partial_blocks (P*4 accumulation-type values) and,
//   when partial_scale is non-null, partial_scale (d values) are OVERWRITTEN with this range's sums,
//   reduced in a fixed order (bitwise reproducible for a given row range and ISA).
void chain_backward(const ChainParams& p, const void* grad, int64_t grad_ld, const void* x,
                    int64_t x_ld, void* grad_x, int64_t row_begin, int64_t row_end,
                    void* partial_blocks, void* partial_scale);

// Run-time ISA selection. The default is the best the CPU supports among the compiled variants,
// overridable with the environment variable QGOFT_CPU_ISA=generic|avx2|avx512.
Isa selected_isa();
// Selects an ISA for this process (tests, benchmarks). Returns false if not compiled or not supported.
bool set_isa(Isa isa);
bool isa_compiled(Isa isa);
bool isa_supported_by_cpu(Isa isa);
const char* isa_name(Isa isa);

// Per-ISA entry points (defined in chain_kernel_<isa>.cpp, each compiled with its own flags).
#define QGOFT_DECLARE_ISA(ns)                                                                     \
  namespace ns {                                                                                  \
  int tile_rows(DType dtype, int64_t d);                                                          \
  void chain_forward(const ChainParams& p, const void* x, int64_t x_ld, void* y,                 \
                     int64_t row_begin, int64_t row_end);                                        \
  void chain_backward(const ChainParams& p, const void* grad, int64_t grad_ld, const void* x,    \
                      int64_t x_ld, void* grad_x, int64_t row_begin, int64_t row_end,           \
                      void* partial_blocks, void* partial_scale);                                \
  }
QGOFT_DECLARE_ISA(generic)
QGOFT_DECLARE_ISA(avx2)
QGOFT_DECLARE_ISA(avx512)
#undef QGOFT_DECLARE_ISA

}  // namespace qgoft::cpu
