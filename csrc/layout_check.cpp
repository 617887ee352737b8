#include "layout_check.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

namespace qgoft {

int64_t check_pairs_tensor(const at::Tensor& pairs, const char* op) {
  TORCH_CHECK(pairs.scalar_type() == at::kInt && pairs.dim() == 2 && pairs.size(1) == 2, op,
              ": pairs must be an int32 tensor of shape (P, 2), got ", pairs.scalar_type(), " ",
              pairs.sizes());
  return pairs.size(0);
}

void check_layout_tensors(const at::Tensor& pairs, const at::Tensor& layer_offsets, const char* op) {
  check_pairs_tensor(pairs, op);
  TORCH_CHECK(layer_offsets.scalar_type() == at::kInt && layer_offsets.dim() == 1 &&
                  layer_offsets.numel() >= 1,
              op, ": layer_offsets must be an int32 tensor of shape (L + 1,), got ",
              layer_offsets.scalar_type(), " ", layer_offsets.sizes());
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

}  // namespace qgoft
