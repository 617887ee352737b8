#include "common/checks.h"

#include <algorithm>
#include <vector>

namespace qgoft {

namespace {

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the same device as x (", x.device(),
              "), got ", t.device());
}

void check_float_param(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating point tensor, got ",
              t.scalar_type());
}

}  // namespace

DType kernel_dtype(at::ScalarType x_dtype, const char* op) {
  switch (x_dtype) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default:
      TORCH_CHECK(false, op, ": x must be float32, float64, bfloat16 or float16, got ", x_dtype);
  }
}

DType check_chain_args(const at::Tensor& x, const at::Tensor& params, bool givens, const at::Tensor& pairs,
                       const at::Tensor& layer_offsets, const std::optional<at::Tensor>& scale,
                       const at::Tensor* grad_out, const char* op) {
  const char* params_name = givens ? "angles" : "blocks";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (..., d), got a 0-dim tensor");
  const DType dtype = kernel_dtype(x.scalar_type(), op);
  check_same_device(params, x, op, params_name);
  check_same_device(pairs, x, op, "pairs");
  check_same_device(layer_offsets, x, op, "layer_offsets");
  if (scale.has_value()) check_same_device(*scale, x, op, "scale");
  if (grad_out != nullptr) check_same_device(*grad_out, x, op, "grad_out");
  check_float_param(params, op, params_name);
  if (scale.has_value()) check_float_param(*scale, op, "scale");
  TORCH_CHECK(pairs.scalar_type() == at::kInt && pairs.dim() == 2 && pairs.size(1) == 2, op,
              ": pairs must be an int32 tensor of shape (P, 2), got ", pairs.scalar_type(), " ",
              pairs.sizes());
  TORCH_CHECK(layer_offsets.scalar_type() == at::kInt && layer_offsets.dim() == 1 &&
                  layer_offsets.numel() >= 1,
              op, ": layer_offsets must be an int32 tensor of shape (L + 1,), got ",
              layer_offsets.scalar_type(), " ", layer_offsets.sizes());
  const int64_t num_pairs = pairs.size(0);
  if (givens) {
    TORCH_CHECK(params.dim() == 1 && params.size(0) == num_pairs, op, ": angles must have shape (P,) = (",
                num_pairs, ",), got ", params.sizes());
  } else {
    TORCH_CHECK(params.dim() == 3 && params.size(0) == num_pairs && params.size(1) == 2 &&
                    params.size(2) == 2,
                op, ": blocks must have shape (P, 2, 2) = (", num_pairs, ", 2, 2), got ", params.sizes());
  }
  if (scale.has_value()) {
    const int64_t d = x.size(-1);
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == d, op, ": scale must have shape (d,) = (", d,
                ",), got ", scale->sizes());
  }
  if (grad_out != nullptr) {
    TORCH_CHECK(grad_out->sizes() == x.sizes(), op, ": grad_out must have the shape of x ", x.sizes(),
                ", got ", grad_out->sizes());
    check_float_param(*grad_out, op, "grad_out");
  }
  return dtype;
}

void check_layout_values(const int32_t* pairs, int64_t num_pairs, const int32_t* offsets,
                         int64_t num_layers, int64_t d, const char* op) {
  TORCH_CHECK(offsets[0] == 0 && offsets[num_layers] == num_pairs, op,
              ": layer_offsets must start at 0 and end at P = ", num_pairs, ", got ", offsets[0],
              " and ", offsets[num_layers]);
  for (int64_t l = 0; l < num_layers; ++l) {
    TORCH_CHECK(offsets[l] <= offsets[l + 1], op, ": layer_offsets must be non-decreasing, got ",
                offsets[l], " > ", offsets[l + 1], " at layer ", l);
  }
  // layer_of[c]: the last layer that touched column c (pairs of one layer must be disjoint).
  std::vector<int64_t> layer_of(std::max<int64_t>(d, 0), -1);
  for (int64_t l = 0; l < num_layers; ++l) {
    for (int64_t p = offsets[l]; p < offsets[l + 1]; ++p) {
      const int64_t i = pairs[2 * p], j = pairs[2 * p + 1];
      TORCH_CHECK(0 <= i && i < j && j < d, op, ": pair ", p, " = (", i, ", ", j,
                  ") must satisfy 0 <= i < j < d = ", d, " (d = x.size(-1))");
      TORCH_CHECK(layer_of[i] != l && layer_of[j] != l, op, ": pair ", p, " = (", i, ", ", j,
                  ") overlaps another pair of layer ", l);
      layer_of[i] = layer_of[j] = l;
    }
  }
}

int64_t num_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t k = 0; k + 1 < x.dim(); ++k) rows *= x.size(k);
  return rows;
}

at::Tensor rows_view(const at::Tensor& x, int64_t d) {
  at::Tensor x2 = x.reshape({num_rows(x), d});
  if (d > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  if (d == 1 && !x2.is_contiguous()) x2 = x2.contiguous();
  return x2;
}

}  // namespace qgoft
