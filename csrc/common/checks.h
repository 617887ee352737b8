// The argument checks of the chain ops, shared by the CPU glue (csrc/cpu/chain_cpu.cpp) and the CUDA glue
// (csrc/cuda/chain_cuda.cpp): one order, one wording, one error type (c10::Error, RuntimeError in
// Python) on every backend. The order and wording are those of the Python checks (qgoft/_checks.py),
// which the fake kernels and the reference use. Layout conventions: docs/CONTRACT.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "common/dtype.h"

namespace qgoft {

// The kernel dtype of x; refuses anything but float32, float64, bfloat16 and float16.
DType kernel_dtype(at::ScalarType x_dtype, const char* op);

// The accumulation type of activations of this dtype (common/dtype.h).
inline at::ScalarType accumulation_type(DType t) {
  return accumulates_in_double(t) ? at::kDouble : at::kFloat;
}

// Every check of one call that needs no tensor values, in this order: x has a dimension and a kernel
// dtype; params, pairs, layer_offsets, scale and grad_out are on x's device; params (the angles (P,) when
// givens, else the blocks (P, 2, 2)) and scale are floating point; pairs is int32 (P, 2); layer_offsets
// is int32 (L + 1,); params and scale ((d,)) have their shapes; grad_out (backward only) has x's shape and
// is floating point. Returns the kernel dtype of x.
DType check_chain_args(const at::Tensor& x, const at::Tensor& params, bool givens, const at::Tensor& pairs,
                       const at::Tensor& layer_offsets, const std::optional<at::Tensor>& scale,
                       const at::Tensor* grad_out, const char* op);

// Validates host copies of a layout for dimension d: offsets start at 0, end at num_pairs and never
// decrease (all checked before any pair is read), 0 <= i < j < d for every pair, and the pairs of one
// layer are disjoint. pairs: 2 * num_pairs values (i, j); offsets: num_layers + 1 values. Throws a
// c10::Error naming op and the offending pair or layer.
void check_layout_values(const int32_t* pairs, int64_t num_pairs, const int32_t* offsets,
                         int64_t num_layers, int64_t d, const char* op);

// x (..., d) viewed as rows (rows, d) with unit stride along d, copying only if it must. Works for
// d = 0 and for zero rows (the row count is the product of the leading sizes, never inferred).
at::Tensor rows_view(const at::Tensor& x, int64_t d);

// Rows of x (..., d): the product of the leading sizes.
int64_t num_rows(const at::Tensor& x);

}  // namespace qgoft
