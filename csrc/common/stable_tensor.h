// Helpers of the stable-ABI glue (torch::stable::Tensor, PyTorch's stable C shims): tensor metadata for
// the shared checks (common/checks.h), allocation and conversions that skip the dispatcher call when
// there is nothing to do.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/checks.h"

namespace qgoft::stable {

using Tensor = torch::stable::Tensor;

std::vector<int64_t> sizes_of(const Tensor& t);
std::string device_name(const torch::stable::Device& device);
TensorMeta meta_of(const Tensor& t);

// Uninitialised / zero-filled contiguous tensors of this size and dtype on t's device.
Tensor empty_on(const Tensor& t, std::vector<int64_t> sizes, ScalarType dtype);
Tensor zeros_on(const Tensor& t, std::vector<int64_t> sizes, ScalarType dtype);
// t in this dtype, contiguous (t itself when it already is).
Tensor contiguous_as(const Tensor& t, ScalarType dtype);
Tensor as_dtype(const Tensor& t, ScalarType dtype);
// x (..., d) as rows (rows, d) with unit stride along d (common/checks.h: num_rows, rows_need_copy).
Tensor rows_view(const Tensor& x, int64_t d);

}  // namespace qgoft::stable
