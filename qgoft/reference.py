"""Pure-PyTorch reference of the Givens-chain math (any device, differentiable; the fallback of qgoft.ops).

Conventions (docs/MATH.md Sec. 1-3 and 7, docs/CONTRACT.md):

* ``x`` has shape ``(..., d)``; each row is mapped to ``x' = s * (R^T x)``, i.e. ``X' = X R S`` for a batch of
  rows, with ``R = P_1 P_2 ... P_L`` and ``S = diag(s)``.
* ``pairs``: int32 ``(P, 2)`` tensor, canonical order (layer by layer, ascending ``i``, ``i < j``);
  ``layer_offsets``: int32 ``(L + 1,)``, layer ``r`` is ``pairs[offsets[r]:offsets[r + 1]]``.
* ``blocks``: ``(P, 2, 2)``, ``blocks[p] = [[g00, g01], [g10, g11]] = [[alpha1, beta1], [alpha2, beta2]]``.
  Block ``p`` on pair ``(i, j)`` updates a row as ``x_i <- g00 x_i + g10 x_j``, ``x_j <- g01 x_i + g11 x_j``
  (the row times ``G_p``, i.e. ``G_p^T`` applied to the column). Layers run in order 1 .. L, then the scale.
* Strict rotations: ``G(theta) = [[cos, -sin], [sin, cos]]``.
* The adjoint (transpose) maps rows ``g`` to ``g S R^T``: scale first, then layers L .. 1 with untransposed
  blocks (``x_i <- g00 x_i + g01 x_j``, ``x_j <- g10 x_i + g11 x_j``).
* ``compute_dtype``: ``x``, the parameters and the scale are cast to it for the math and the result is cast
  back to ``x.dtype``. Default: float32 for bfloat16/float16 ``x``, else ``x.dtype``.

Arguments are validated exactly like the compiled ops validate them (x float32/float64/bfloat16/float16 with
at least one dimension, real floating parameters, every tensor on x's device, int32 layout tensors, offsets from
0 to P, ``0 <= i < j < d``, disjoint pairs per layer, parameter and scale shapes), so the fallback accepts and
refuses the same inputs as the kernels; errors are :class:`InputError` (a ValueError and a RuntimeError) with
the same wording. The checks that need no values are shared with the fake kernels (:mod:`qgoft._checks`).

Every chain function is vectorised per layer (gather the i and j columns of a layer, combine, write back
out-of-place); only :func:`dense_chain_matrix` loops over pairs, as an independent check.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ._checks import check_chain_arguments

__all__ = [
    "InputError",
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


class InputError(ValueError, RuntimeError):
    """An invalid argument of a reference function. Both a ValueError and a RuntimeError (what the compiled
    ops raise for the same inputs), so code catching either works with the kernels and with the fallback."""


def _fail(op: str, message: str) -> None:
    raise InputError(f"{op}: {message}")


def _raise_input_error(condition: bool, message) -> None:
    if not condition:
        raise InputError(message())


def _check_inputs(op: str, x: Tensor, params: Tensor, params_name: str, pairs: Tensor, layer_offsets: Tensor,
                  scale: Optional[Tensor]) -> List[int]:
    """Validate every argument like the compiled ops do (same checks, same wording) and return the layer
    offsets as a Python list. ``params_name`` is ``"angles"`` ((P,)) or ``"blocks"`` ((P, 2, 2)).

    The value-free checks (types, dtypes, devices, shapes) are shared with the fake kernels
    (:func:`qgoft._checks.check_chain_arguments`); then, reading the layout's values: offsets rise from 0 to P
    (checked before any pair is read), 0 <= i < j < d = x.shape[-1] for every pair, and the pairs of one layer
    are disjoint."""
    check_chain_arguments(_raise_input_error, op, x, params, params_name, pairs, layer_offsets, scale)
    d, num_pairs = x.shape[-1], pairs.shape[0]
    if x.device.type == "meta" or pairs.device.type == "meta":
        _fail(op, "the pure-PyTorch reference needs the values of pairs and layer_offsets; they are on the meta "
                  "device (the compiled ops' fake kernels handle meta tensors)")
    offsets = [int(v) for v in layer_offsets.tolist()]
    if offsets[0] != 0 or offsets[-1] != num_pairs:
        _fail(op, f"layer_offsets must start at 0 and end at P = {num_pairs}, got {offsets[0]} and {offsets[-1]}")
    for layer, (a, b) in enumerate(zip(offsets, offsets[1:])):
        if a > b:
            _fail(op, f"layer_offsets must be non-decreasing, got {a} > {b} at layer {layer}")
    if num_pairs:
        _check_pair_values(op, pairs, offsets, d)
    return offsets


def _check_pair_values(op: str, pairs: Tensor, offsets: List[int], d: int) -> None:
    """0 <= i < j < d for every pair and disjoint pairs inside each layer (vectorised; names the first bad
    pair in storage order like the compiled ops)."""
    p = pairs.to(torch.int64)
    i, j = p[:, 0], p[:, 1]
    bad_range = (i < 0) | (i >= j) | (j >= d)
    counts = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=p.device)
    layer = torch.repeat_interleave(torch.arange(len(counts), device=p.device), counts)
    # Column c used twice in layer r: the key r * d + c appears twice (pairs in range only).
    keys = torch.cat((layer * d + i, layer * d + j))
    index = torch.arange(p.shape[0], device=p.device).repeat(2)
    valid = ~bad_range.repeat(2)
    keys, index = keys[valid], index[valid]
    order = torch.argsort(keys * p.shape[0] + index)  # by key, then by pair index
    keys, index = keys[order], index[order]
    repeated = torch.zeros_like(bad_range)
    if keys.numel() > 1:
        dup = keys[1:] == keys[:-1]
        repeated[index[1:][dup]] = True  # the later pair of each clash
    bad = bad_range | repeated
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0, 0])
        pi, pj = int(i[k]), int(j[k])
        if bool(bad_range[k]):
            _fail(op, f"pair {k} = ({pi}, {pj}) must satisfy 0 <= i < j < d = {d} (d = x.shape[-1]; indices "
                      f"in [0, {d}))")
        _fail(op, f"pair {k} = ({pi}, {pj}) overlaps another pair of layer {int(layer[k])}")


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


def _forward(x: Tensor, blocks: Tensor, pairs: Tensor, offsets: List[int], scale: Optional[Tensor],
             dtype: torch.dtype) -> Tensor:
    out = _apply_layers(x.to(dtype), blocks.to(dtype), pairs, offsets, adjoint=False)
    if scale is not None:
        out = out * scale.to(device=out.device, dtype=dtype)
    return out.to(x.dtype)


def _adjoint(g: Tensor, blocks: Tensor, pairs: Tensor, offsets: List[int], scale: Optional[Tensor],
             dtype: torch.dtype) -> Tensor:
    out = g.to(dtype)
    if scale is not None:
        out = out * scale.to(device=out.device, dtype=dtype)
    out = _apply_layers(out, blocks.to(dtype), pairs, offsets, adjoint=True)
    return out.to(g.dtype)


def _chain(op: str, rows: Tensor, params: Tensor, params_name: str, pairs: Tensor, layer_offsets: Tensor,
           scale: Optional[Tensor], compute_dtype: Optional[torch.dtype], *, adjoint: bool) -> Tensor:
    """The four public chain functions: validate like the compiled op (``op`` names it in the errors), take the
    blocks from ``params`` (``params_name`` ``"blocks"``) or build them from the angles in the compute dtype
    (``"angles"``), and map the rows through the chain or, with ``adjoint``, its transpose."""
    offsets = _check_inputs(op, rows, params, params_name, pairs, layer_offsets, scale)
    dtype = _resolve_compute_dtype(rows, compute_dtype)
    blocks = blocks_from_angles(params.to(dtype)) if params_name == "angles" else params
    return (_adjoint if adjoint else _forward)(rows, blocks, pairs, offsets, scale, dtype)


def quasi_givens_chain_reference(x: Tensor, blocks: Tensor, pairs: Tensor, layer_offsets: Tensor,
                                 scale: Optional[Tensor] = None, *,
                                 compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Rows of ``x`` ``(..., d)`` -> ``s * (R^T x)`` for quasi-Givens ``blocks`` ``(P, 2, 2)``; same shape/dtype.

    Raises :class:`InputError` for the arguments the compiled ops reject (see ``_check_inputs``)."""
    return _chain("quasi_givens_chain_reference", x, blocks, "blocks", pairs, layer_offsets, scale, compute_dtype,
                  adjoint=False)


def givens_chain_reference(x: Tensor, angles: Tensor, pairs: Tensor, layer_offsets: Tensor,
                           scale: Optional[Tensor] = None, *,
                           compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Rows of ``x`` ``(..., d)`` -> ``s * (R^T x)`` for strict rotations of ``angles`` ``(P,)``."""
    return _chain("givens_chain_reference", x, angles, "angles", pairs, layer_offsets, scale, compute_dtype,
                  adjoint=False)


def quasi_givens_chain_adjoint_reference(g: Tensor, blocks: Tensor, pairs: Tensor, layer_offsets: Tensor,
                                         scale: Optional[Tensor] = None, *,
                                         compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Transpose of the chain: rows of ``g`` ``(..., d)`` -> ``g S R^T`` (column form ``R (s * g)``)."""
    return _chain("quasi_givens_chain_adjoint_reference", g, blocks, "blocks", pairs, layer_offsets, scale,
                  compute_dtype, adjoint=True)


def givens_chain_adjoint_reference(g: Tensor, angles: Tensor, pairs: Tensor, layer_offsets: Tensor,
                                   scale: Optional[Tensor] = None, *,
                                   compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Transpose of :func:`givens_chain_reference`: rows of ``g`` -> ``g S R^T``."""
    return _chain("givens_chain_adjoint_reference", g, angles, "angles", pairs, layer_offsets, scale,
                  compute_dtype, adjoint=True)


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
