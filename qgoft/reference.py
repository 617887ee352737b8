"""Pure-PyTorch reference of the Givens-chain math (any device, differentiable; the fallback of qgoft.ops).

Conventions (DESIGN.md Sec. 2, docs/CONTRACT.md):

* ``x`` has shape ``(..., d)``; each row is mapped to ``x' = s * (R^T x)``, i.e. ``X' = X R S`` for a batch of
  rows, with ``R = P_1 P_2 ... P_L`` and ``S = diag(s)``.
* ``pairs``: integer ``(P, 2)`` tensor, canonical order (layer by layer, ascending ``i``, ``i < j``);
  ``layer_offsets``: integer ``(L + 1,)``, layer ``r`` is ``pairs[offsets[r]:offsets[r + 1]]``.
* ``blocks``: ``(P, 2, 2)``, ``blocks[p] = [[g00, g01], [g10, g11]] = [[alpha1, beta1], [alpha2, beta2]]``.
  Block ``p`` on pair ``(i, j)`` updates a row as ``x_i <- g00 x_i + g10 x_j``, ``x_j <- g01 x_i + g11 x_j``
  (the row times ``G_p``, i.e. ``G_p^T`` applied to the column). Layers run in order 1 .. L, then the scale.
* Strict rotations: ``G(theta) = [[cos, -sin], [sin, cos]]``.
* The adjoint (transpose) maps rows ``g`` to ``g S R^T``: scale first, then layers L .. 1 with untransposed
  blocks (``x_i <- g00 x_i + g01 x_j``, ``x_j <- g10 x_i + g11 x_j``).
* ``compute_dtype``: ``x``, the parameters and the scale are cast to it for the math and the result is cast
  back to ``x.dtype``. Default: float32 for bfloat16/float16 ``x``, else ``x.dtype``.

Every chain function is vectorised per layer (gather the i and j columns of a layer, combine, write back
out-of-place); only :func:`dense_chain_matrix` loops over pairs, as an independent check.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

__all__ = [
    "blocks_from_angles",
    "quasi_givens_chain_reference",
    "givens_chain_reference",
    "quasi_givens_chain_adjoint_reference",
    "givens_chain_adjoint_reference",
    "dense_chain_matrix",
    "orthogonality_penalty_reference",
]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def blocks_from_angles(angles: Tensor) -> Tensor:
    """Strict Givens blocks from angles: ``(P,) -> (P, 2, 2)`` with ``[[cos, -sin], [sin, cos]]``."""
    if angles.dim() != 1:
        raise ValueError(f"angles must have shape (P,), got {tuple(angles.shape)}")
    c, s = torch.cos(angles), torch.sin(angles)
    return torch.stack((torch.stack((c, -s), dim=-1), torch.stack((s, c), dim=-1)), dim=-2)


def _resolve_compute_dtype(x: Tensor, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _check_inputs(x: Tensor, blocks: Tensor, pairs: Tensor, layer_offsets: Tensor,
                  scale: Optional[Tensor]) -> List[int]:
    """Validate shapes and return the layer offsets as a Python list."""
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., d)")
    d = x.shape[-1]
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (P, 2), got {tuple(pairs.shape)}")
    num_pairs = pairs.shape[0]
    if blocks.shape != (num_pairs, 2, 2):
        raise ValueError(f"blocks must have shape ({num_pairs}, 2, 2), got {tuple(blocks.shape)}")
    if layer_offsets.dim() != 1 or layer_offsets.numel() < 1:
        raise ValueError(f"layer_offsets must have shape (L + 1,), got {tuple(layer_offsets.shape)}")
    offsets = [int(v) for v in layer_offsets.tolist()]
    if offsets[0] != 0 or offsets[-1] != num_pairs or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"layer_offsets must rise from 0 to P={num_pairs}, got {offsets}")
    if num_pairs and (int(pairs.min()) < 0 or int(pairs.max()) >= d):
        raise ValueError(f"pair indices must lie in [0, {d}) for x of shape {tuple(x.shape)}")
    if scale is not None and scale.shape != (d,):
        raise ValueError(f"scale must have shape ({d},), got {tuple(scale.shape)}")
    return offsets


def _apply_layers(x: Tensor, blocks: Tensor, pairs: Tensor, offsets: List[int], *,
                  adjoint: bool) -> Tensor:
    """Run the layers on rows of x (compute dtype already applied). Forward: layers 1..L with row-times-G;
    adjoint: layers L..1 with row-times-G^T."""
    index = pairs.to(device=x.device, dtype=torch.long)
    blocks = blocks.to(device=x.device)
    layer_ids = range(len(offsets) - 1)
    if adjoint:
        layer_ids = reversed(layer_ids)
    for r in layer_ids:
        start, stop = offsets[r], offsets[r + 1]
        if start == stop:
            continue
        idx_i, idx_j = index[start:stop, 0], index[start:stop, 1]
        g = blocks[start:stop]
        g00, g01, g10, g11 = g[:, 0, 0], g[:, 0, 1], g[:, 1, 0], g[:, 1, 1]
        xi = x.index_select(-1, idx_i)
        xj = x.index_select(-1, idx_j)
        if adjoint:
            new_i = g00 * xi + g01 * xj
            new_j = g10 * xi + g11 * xj
        else:
            new_i = g00 * xi + g10 * xj
            new_j = g01 * xi + g11 * xj
        x = x.index_copy(x.dim() - 1, torch.cat((idx_i, idx_j)), torch.cat((new_i, new_j), dim=-1))
    return x


def quasi_givens_chain_reference(x: Tensor, blocks: Tensor, pairs: Tensor, layer_offsets: Tensor,
                                 scale: Optional[Tensor] = None, *,
                                 compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Rows of ``x`` ``(..., d)`` -> ``s * (R^T x)`` for quasi-Givens ``blocks`` ``(P, 2, 2)``; same shape/dtype."""
    offsets = _check_inputs(x, blocks, pairs, layer_offsets, scale)
    dtype = _resolve_compute_dtype(x, compute_dtype)
    out = _apply_layers(x.to(dtype), blocks.to(dtype), pairs, offsets, adjoint=False)
    if scale is not None:
        out = out * scale.to(device=out.device, dtype=dtype)
    return out.to(x.dtype)


def givens_chain_reference(x: Tensor, angles: Tensor, pairs: Tensor, layer_offsets: Tensor,
                           scale: Optional[Tensor] = None, *,
                           compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Rows of ``x`` ``(..., d)`` -> ``s * (R^T x)`` for strict rotations of ``angles`` ``(P,)``."""
    dtype = _resolve_compute_dtype(x, compute_dtype)
    blocks = blocks_from_angles(angles.to(dtype))
    return quasi_givens_chain_reference(x, blocks, pairs, layer_offsets, scale, compute_dtype=dtype)


def quasi_givens_chain_adjoint_reference(g: Tensor, blocks: Tensor, pairs: Tensor, layer_offsets: Tensor,
                                         scale: Optional[Tensor] = None, *,
                                         compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Transpose of the chain: rows of ``g`` ``(..., d)`` -> ``g S R^T`` (column form ``R (s * g)``)."""
    offsets = _check_inputs(g, blocks, pairs, layer_offsets, scale)
    dtype = _resolve_compute_dtype(g, compute_dtype)
    out = g.to(dtype)
    if scale is not None:
        out = out * scale.to(device=out.device, dtype=dtype)
    out = _apply_layers(out, blocks.to(dtype), pairs, offsets, adjoint=True)
    return out.to(g.dtype)


def givens_chain_adjoint_reference(g: Tensor, angles: Tensor, pairs: Tensor, layer_offsets: Tensor,
                                   scale: Optional[Tensor] = None, *,
                                   compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Transpose of :func:`givens_chain_reference`: rows of ``g`` -> ``g S R^T``."""
    dtype = _resolve_compute_dtype(g, compute_dtype)
    blocks = blocks_from_angles(angles.to(dtype))
    return quasi_givens_chain_adjoint_reference(g, blocks, pairs, layer_offsets, scale, compute_dtype=dtype)


def dense_chain_matrix(blocks: Tensor, pairs: Tensor, layer_offsets: Tensor, d: int) -> Tensor:
    """Dense ``R = P_1 @ P_2 @ ... @ P_L`` ``(d, d)`` in ``blocks.dtype``, built block by block.

    Each ``P_r`` is the identity with ``[[g00, g01], [g10, g11]]`` written into rows/columns ``(i, j)`` of
    every pair of layer ``r``. Loops over pairs on purpose: an independent check of the vectorised chain
    (for rows, ``chain(x) == x @ R @ diag(s)``). Differentiable w.r.t. ``blocks``.
    """
    if blocks.dim() != 3 or blocks.shape[1:] != (2, 2):
        raise ValueError(f"blocks must have shape (P, 2, 2), got {tuple(blocks.shape)}")
    pair_list = [(int(i), int(j)) for i, j in pairs.tolist()]
    offsets = [int(v) for v in layer_offsets.tolist()]
    if len(pair_list) != blocks.shape[0] or offsets[0] != 0 or offsets[-1] != len(pair_list):
        raise ValueError("pairs, blocks and layer_offsets disagree on the number of pairs")
    result = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
    for r in range(len(offsets) - 1):
        layer = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
        used = set()
        for p in range(offsets[r], offsets[r + 1]):
            i, j = pair_list[p]
            if not 0 <= i < j < d:
                raise ValueError(f"pair {p} ({i}, {j}) is not a valid pair for d={d}")
            if i in used or j in used:
                raise ValueError(f"pair {p} ({i}, {j}) overlaps another pair of layer {r}")
            used.update((i, j))
            layer[i, i] = blocks[p, 0, 0]
            layer[i, j] = blocks[p, 0, 1]
            layer[j, i] = blocks[p, 1, 0]
            layer[j, j] = blocks[p, 1, 1]
        result = result @ layer
    return result


def orthogonality_penalty_reference(blocks: Tensor) -> Tensor:
    """qGOFT soft-orthogonality term ``sum_p <alpha_p, beta_p>^2`` (scalar), ``alpha = blocks[:, :, 0]``,
    ``beta = blocks[:, :, 1]``. Differentiable."""
    if blocks.dim() != 3 or blocks.shape[1:] != (2, 2):
        raise ValueError(f"blocks must have shape (P, 2, 2), got {tuple(blocks.shape)}")
    inner = (blocks[:, :, 0] * blocks[:, :, 1]).sum(dim=-1)
    return (inner * inner).sum()
