// Host-side validation of a Givens layout (DESIGN.md Sec. 3), shared by the CPU and CUDA glue.
#pragma once

#include <cstdint>

namespace at {
class Tensor;
}

namespace qgoft {

// pairs must be an int32 (P, 2) tensor (any device); returns P.
int64_t check_pairs_tensor(const at::Tensor& pairs, const char* op);

// check_pairs_tensor, and layer_offsets must be an int32 (L + 1,) tensor (any device).
void check_layout_tensors(const at::Tensor& pairs, const at::Tensor& layer_offsets, const char* op);

// Validates host copies of a layout for dimension d: offsets start at 0, end at num_pairs and never
// decrease (all checked before any pair is read), 0 <= i < j < d for every pair, and the pairs of one
// layer are disjoint. pairs: 2 * num_pairs values (i, j); offsets: num_layers + 1 values. Throws a
// c10::Error naming op and the offending pair or layer.
void check_layout_values(const int32_t* pairs, int64_t num_pairs, const int32_t* offsets,
                         int64_t num_layers, int64_t d, const char* op);

}  // namespace qgoft
