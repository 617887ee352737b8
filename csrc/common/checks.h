// The argument checks of the chain ops, shared by the CPU glue (csrc/cpu/chain_cpu.cpp, stable ABI) and
// the CUDA glue (csrc/cuda/chain_cuda.cpp, ATen): one order, one wording, one error type
// (std::runtime_error, RuntimeError in Python) on every backend. The order and wording are those of the
// Python checks (qgoft/_checks.py), which the fake kernels and the reference use. Layout conventions:
// docs/CONTRACT.md.
//
// The checks read tensor metadata only (TensorMeta: dtype, sizes, device), so they depend on no torch
// library: each glue describes its tensors (at::Tensor or torch::stable::Tensor) with meta_of().
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"

namespace qgoft {

using ScalarType = torch::headeronly::ScalarType;

// What the checks need to know of a tensor argument.
struct TensorMeta {
  ScalarType dtype = ScalarType::Float;
  std::vector<int64_t> sizes;
  std::string device;  // "cpu", "cuda:0", ... (as torch prints it)
  int64_t dim() const { return static_cast<int64_t>(sizes.size()); }
  int64_t size(int64_t k) const { return sizes[k < 0 ? k + dim() : k]; }
};

namespace detail {
[[noreturn]] void throw_error(const std::string& message);
inline void append(std::ostringstream&) {}
template <class T, class... Rest>
void append(std::ostringstream& out, const T& value, const Rest&... rest) {
  out << value;
  append(out, rest...);
}
}  // namespace detail

// "[2, 4]", as torch prints sizes.
std::string format_sizes(const std::vector<int64_t>& sizes);

// Throws std::runtime_error with the concatenated message when cond is false.
#define QGOFT_CHECK(cond, ...)                                 \
  do {                                                         \
    if (!(cond)) {                                             \
      std::ostringstream qgoft_check_message_;                 \
      ::qgoft::detail::append(qgoft_check_message_, __VA_ARGS__); \
      ::qgoft::detail::throw_error(qgoft_check_message_.str()); \
    }                                                          \
  } while (0)

// The registered name of a chain op, as the checks' messages give it: qgoft::givens_chain (givens) or
// qgoft::quasi_givens_chain, with the suffix _backward for the backward op.
constexpr const char* chain_op_name(bool givens, bool backward) {
  if (givens) return backward ? "qgoft::givens_chain_backward" : "qgoft::givens_chain";
  return backward ? "qgoft::quasi_givens_chain_backward" : "qgoft::quasi_givens_chain";
}

// The kernel dtype of x; refuses anything but float32, float64, bfloat16 and float16.
DType kernel_dtype(ScalarType x_dtype, const char* op);

// The accumulation type of activations of this dtype (common/dtype.h).
inline ScalarType accumulation_type(DType t) {
  return accumulates_in_double(t) ? ScalarType::Double : ScalarType::Float;
}

// The arguments of one call. params: the angles (P,) when givens, else the blocks (P, 2, 2); scale and
// grad_out (backward only) may be absent.
struct ChainArgs {
  TensorMeta x, params, pairs, layer_offsets;
  const TensorMeta* scale = nullptr;
  const TensorMeta* grad_out = nullptr;
  const TensorMeta* tops = nullptr;  // backward only: the segment tops kept by the forward (docs/CONTRACT.md)
  bool givens = true;
};

// Every check of one call that needs no tensor values, in this order: x has a dimension and a kernel
// dtype; params, pairs, layer_offsets, scale and grad_out are on x's device; params and scale are
// floating point; pairs is int32 (P, 2); layer_offsets is int32 (L + 1,); params and scale ((d,)) have
// their shapes; grad_out has x's shape and is floating point; tops (when given) is on x's device, of x's
// accumulation type and of shape (rows, k) (k = 0: no tops; the CUDA glue checks k against its segments).
// Returns the kernel dtype of x.
DType check_chain_args(const ChainArgs& args, const char* op);

// check_chain_args on the tensors of a glue (at::Tensor or torch::stable::Tensor), which meta_of describes.
template <class Tensor, class MetaOf>
DType check_chain_tensors(MetaOf&& meta_of, const Tensor& x, const Tensor& params, bool givens,
                          const Tensor& pairs, const Tensor& layer_offsets, const std::optional<Tensor>& scale,
                          const Tensor* grad_out, const char* op,
                          const std::optional<Tensor>* tops = nullptr) {
  ChainArgs args;
  args.x = meta_of(x);
  args.params = meta_of(params);
  args.pairs = meta_of(pairs);
  args.layer_offsets = meta_of(layer_offsets);
  TensorMeta scale_meta, grad_meta, tops_meta;
  if (scale.has_value()) {
    scale_meta = meta_of(*scale);
    args.scale = &scale_meta;
  }
  if (grad_out != nullptr) {
    grad_meta = meta_of(*grad_out);
    args.grad_out = &grad_meta;
  }
  if (tops != nullptr && tops->has_value()) {
    tops_meta = meta_of(**tops);
    args.tops = &tops_meta;
  }
  args.givens = givens;
  return check_chain_args(args, op);
}

// Validates host copies of a layout for dimension d: offsets start at 0, end at num_pairs and never
// decrease (all checked before any pair is read), 0 <= i < j < d for every pair, and the pairs of one
// layer are disjoint. pairs: 2 * num_pairs values (i, j); offsets: num_layers + 1 values. Throws naming
// op and the offending pair or layer.
void check_layout_values(const int32_t* pairs, int64_t num_pairs, const int32_t* offsets,
                         int64_t num_layers, int64_t d, const char* op);

// Rows of x (..., d): the product of the leading sizes (never inferred from numel, so d = 0 works).
int64_t num_rows(const std::vector<int64_t>& x_sizes);

// Whether a (rows, d) view with this stride along d and contiguity must be copied to give the kernels
// unit stride along d.
inline bool rows_need_copy(int64_t d, int64_t stride_d, bool contiguous) {
  return (d > 1 && stride_d != 1) || (d == 1 && !contiguous);
}

}  // namespace qgoft
