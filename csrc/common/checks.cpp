#include "common/checks.h"

#include <algorithm>

namespace qgoft {

namespace detail {
void throw_error(const std::string& message) { throw std::runtime_error(message); }
}  // namespace detail

namespace {

bool is_floating(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Float:
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e4m3fnuz:
    case ScalarType::Float8_e8m0fnu:
    case ScalarType::Float4_e2m1fn_x2:
      return true;
    default:
      return false;
  }
}

void check_same_device(const TensorMeta& t, const TensorMeta& x, const char* op, const char* name) {
  QGOFT_CHECK(t.device == x.device, op, ": ", name, " must be on the same device as x (", x.device,
              "), got ", t.device);
}

void check_floating(const TensorMeta& t, const char* op, const char* name) {
  QGOFT_CHECK(is_floating(t.dtype), op, ": ", name, " must be a floating point tensor, got ", t.dtype);
}

}  // namespace

std::string format_sizes(const std::vector<int64_t>& sizes) {
  std::ostringstream out;
  out << '[';
  for (size_t k = 0; k < sizes.size(); ++k) out << (k ? ", " : "") << sizes[k];
  out << ']';
  return out.str();
}

DType kernel_dtype(ScalarType x_dtype, const char* op) {
  switch (x_dtype) {
    case ScalarType::Float: return DType::Float32;
    case ScalarType::Double: return DType::Float64;
    case ScalarType::BFloat16: return DType::BFloat16;
    case ScalarType::Half: return DType::Float16;
    default:
      QGOFT_CHECK(false, op, ": x must be float32, float64, bfloat16 or float16, got ", x_dtype);
  }
  return DType::Float32;  // unreachable
}

DType check_chain_args(const ChainArgs& a, const char* op) {
  const char* params_name = a.givens ? "angles" : "blocks";
  QGOFT_CHECK(a.x.dim() >= 1, op, ": x must have at least one dimension (..., d), got a 0-dim tensor");
  const DType dtype = kernel_dtype(a.x.dtype, op);
  check_same_device(a.params, a.x, op, params_name);
  check_same_device(a.pairs, a.x, op, "pairs");
  check_same_device(a.layer_offsets, a.x, op, "layer_offsets");
  if (a.scale != nullptr) check_same_device(*a.scale, a.x, op, "scale");
  if (a.grad_out != nullptr) check_same_device(*a.grad_out, a.x, op, "grad_out");
  if (a.tops != nullptr) check_same_device(*a.tops, a.x, op, "tops");
  const TensorMeta& params = a.params;
  check_floating(params, op, params_name);
  if (a.scale != nullptr) check_floating(*a.scale, op, "scale");
  const TensorMeta& pairs = a.pairs;
  QGOFT_CHECK(pairs.dtype == ScalarType::Int && pairs.dim() == 2 && pairs.size(1) == 2, op,
              ": pairs must be an int32 tensor of shape (P, 2), got ", pairs.dtype, " ",
              format_sizes(pairs.sizes));
  const TensorMeta& offsets = a.layer_offsets;
  QGOFT_CHECK(offsets.dtype == ScalarType::Int && offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": layer_offsets must be an int32 tensor of shape (L + 1,), got ", offsets.dtype, " ",
              format_sizes(offsets.sizes));
  const int64_t num_pairs = pairs.size(0);
  if (a.givens) {
    QGOFT_CHECK(params.dim() == 1 && params.size(0) == num_pairs, op, ": angles must have shape (P,) = (",
                num_pairs, ",), got ", format_sizes(params.sizes));
  } else {
    QGOFT_CHECK(params.dim() == 3 && params.size(0) == num_pairs && params.size(1) == 2 &&
                    params.size(2) == 2,
                op, ": blocks must have shape (P, 2, 2) = (", num_pairs, ", 2, 2), got ",
                format_sizes(params.sizes));
  }
  if (a.scale != nullptr) {
    const int64_t d = a.x.size(-1);
    QGOFT_CHECK(a.scale->dim() == 1 && a.scale->size(0) == d, op, ": scale must have shape (d,) = (", d,
                ",), got ", format_sizes(a.scale->sizes));
  }
  if (a.grad_out != nullptr) {
    QGOFT_CHECK(a.grad_out->sizes == a.x.sizes, op, ": grad_out must have the shape of x ",
                format_sizes(a.x.sizes), ", got ", format_sizes(a.grad_out->sizes));
    check_floating(*a.grad_out, op, "grad_out");
  }
  if (a.tops != nullptr) {
    const ScalarType acc = accumulation_type(dtype);
    QGOFT_CHECK(a.tops->dtype == acc, op, ": tops must be ", acc, " (the accumulation type of x), got ",
                a.tops->dtype);
    const int64_t rows = num_rows(a.x.sizes);
    QGOFT_CHECK(a.tops->dim() == 2 && a.tops->size(0) == rows, op,
                ": tops must have shape (rows, segments) with rows = ", rows, ", got ", format_sizes(a.tops->sizes));
  }
  return dtype;
}

void check_layout_values(const int32_t* pairs, int64_t num_pairs, const int32_t* offsets,
                         int64_t num_layers, int64_t d, const char* op) {
  QGOFT_CHECK(offsets[0] == 0 && offsets[num_layers] == num_pairs, op,
              ": layer_offsets must start at 0 and end at P = ", num_pairs, ", got ", offsets[0], " and ",
              offsets[num_layers]);
  for (int64_t l = 0; l < num_layers; ++l) {
    QGOFT_CHECK(offsets[l] <= offsets[l + 1], op, ": layer_offsets must be non-decreasing, got ",
                offsets[l], " > ", offsets[l + 1], " at layer ", l);
  }
  // layer_of[c]: the last layer that touched column c (pairs of one layer must be disjoint).
  std::vector<int64_t> layer_of(std::max<int64_t>(d, 0), -1);
  for (int64_t l = 0; l < num_layers; ++l) {
    for (int64_t p = offsets[l]; p < offsets[l + 1]; ++p) {
      const int64_t i = pairs[2 * p], j = pairs[2 * p + 1];
      QGOFT_CHECK(0 <= i && i < j && j < d, op, ": pair ", p, " = (", i, ", ", j,
                  ") must satisfy 0 <= i < j < d = ", d, " (d = x.size(-1))");
      QGOFT_CHECK(layer_of[i] != l && layer_of[j] != l, op, ": pair ", p, " = (", i, ", ", j,
                  ") overlaps another pair of layer ", l);
      layer_of[i] = layer_of[j] = l;
    }
  }
}

int64_t num_rows(const std::vector<int64_t>& x_sizes) {
  int64_t rows = 1;
  for (size_t k = 0; k + 1 < x_sizes.size(); ++k) rows *= x_sizes[k];
  return rows;
}

}  // namespace qgoft
