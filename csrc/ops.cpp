// The operator schemas of qgoft, in one place (stable ABI: torch/csrc/stable/library.h). Backends register
// kernels with STABLE_TORCH_LIBRARY_IMPL (CPU) or TORCH_LIBRARY_IMPL (CUDA); autograd and fake (meta)
// kernels are registered from Python (qgoft/ops.py). Conventions: docs/CONTRACT.md and docs/MATH.md
// (Sec. 1-3).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(qgoft, m) {
  // x (..., d) -> s * (R^T x) per row, R = P_1 ... P_L of strict Givens rotations G(angles[p]).
  m.def("givens_chain(Tensor x, Tensor angles, Tensor pairs, Tensor layer_offsets, Tensor? scale)"
        " -> Tensor");
  // The segmented backward's "tops" (docs/CONTRACT.md, docs/CUDA.md "Saved segment tops"): givens_chain_with_tops is
  // givens_chain that also returns, as a second output (rows, k) in the accumulation type, the local result of
  // every segment start of the backward's segments (k = 0 where the forward keeps none: the CPU, rows of one
  // segment, other layouts or segments); the backward reads them instead of recomputing them when given.
  m.def("givens_chain_with_tops(Tensor x, Tensor angles, Tensor pairs, Tensor layer_offsets, Tensor? scale)"
        " -> (Tensor, Tensor)");
  m.def("givens_chain_backward(Tensor grad_out, Tensor x, Tensor angles, Tensor pairs, "
        "Tensor layer_offsets, Tensor? scale, bool[3] output_mask, Tensor? tops=None) -> (Tensor, Tensor, Tensor)");
  // Same with free 2x2 quasi-Givens blocks (P, 2, 2) = [[alpha1, beta1], [alpha2, beta2]].
  m.def("quasi_givens_chain(Tensor x, Tensor blocks, Tensor pairs, Tensor layer_offsets, "
        "Tensor? scale) -> Tensor");
  m.def("quasi_givens_chain_with_tops(Tensor x, Tensor blocks, Tensor pairs, Tensor layer_offsets, "
        "Tensor? scale) -> (Tensor, Tensor)");
  m.def("quasi_givens_chain_backward(Tensor grad_out, Tensor x, Tensor blocks, Tensor pairs, "
        "Tensor layer_offsets, Tensor? scale, bool[3] output_mask, Tensor? tops=None) -> (Tensor, Tensor, Tensor)");
}
