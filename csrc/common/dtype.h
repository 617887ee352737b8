// The activation dtypes of the chain kernels, shared by the CPU and CUDA kernels and their glue
// (torch-free: the kernels include it).
#pragma once

namespace qgoft {

enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

// Parameters, scale and parameter gradients are given to the kernels in the accumulation type:
// double for Float64 activations, float otherwise.
constexpr bool accumulates_in_double(DType t) { return t == DType::Float64; }

}  // namespace qgoft
