"""Thin op layer: the compiled ``torch.ops.qgoft`` ops with autograd and fake (meta) registrations,
and the functions the rest of the package calls.

Conventions (DESIGN.md Sec. 2, docs/CONTRACT.md): x has shape (..., d); the chain maps each row to
``x' = s * (R^T x)``, i.e. ``X' = X R S`` for a batch of rows. ``pairs`` is int32 (P, 2) in canonical
order, ``layer_offsets`` int32 (L + 1,). Parameters: ``angles`` (P,) for strict Givens rotations,
``blocks`` (P, 2, 2) = [[alpha1, beta1], [alpha2, beta2]] for quasi-Givens blocks, optional ``scale`` (d,).

When the compiled library is not loaded, or has no kernel for x's device, every function here runs the
pure-PyTorch reference (:mod:`qgoft.reference`) instead.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _extension, reference

__all__ = [
    "givens_chain",
    "quasi_givens_chain",
    "givens_chain_adjoint",
    "quasi_givens_chain_adjoint",
    "uses_compiled_kernel",
]

_EMPTY_SHAPE = (0,)


def uses_compiled_kernel(x: Tensor) -> bool:
    """Whether an op on ``x`` runs the compiled kernel (else the pure-PyTorch reference)."""
    return _extension.has_kernel(x.device.type)


# --------------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd formulas for the compiled ops.
# --------------------------------------------------------------------------------------------------

def _fake_chain(x: Tensor, params: Tensor, pairs: Tensor, layer_offsets: Tensor,
                scale: Tensor | None) -> Tensor:
    torch._check(x.dim() >= 1, lambda: "qgoft: x must have at least one dimension")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_chain_backward(grad_out: Tensor, x: Tensor, params: Tensor, pairs: Tensor,
                         layer_offsets: Tensor, scale: Tensor | None,
                         output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    grad_x = (torch.empty(x.shape, dtype=x.dtype, device=x.device) if output_mask[0]
              else x.new_empty(_EMPTY_SHAPE))
    grad_params = (torch.empty(params.shape, dtype=params.dtype, device=params.device)
                   if output_mask[1] else params.new_empty(_EMPTY_SHAPE))
    if output_mask[2] and scale is not None:
        grad_scale = torch.empty(scale.shape, dtype=scale.dtype, device=scale.device)
    else:
        grad_scale = params.new_empty(_EMPTY_SHAPE)
    return grad_x, grad_params, grad_scale


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, params, pairs, layer_offsets, scale = inputs
    ctx.save_for_backward(x, params, pairs, layer_offsets, scale)


def _make_backward(backward_op: Any):
    def _backward(ctx: Any, grad: Tensor):
        x, params, pairs, layer_offsets, scale = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_scale = scale is not None and ctx.needs_input_grad[4]
        if not (need_x or need_params or need_scale):
            return None, None, None, None, None
        grad_x, grad_params, grad_scale = backward_op(
            grad, x, params, pairs, layer_offsets, scale, [need_x, need_params, need_scale])
        return (grad_x if need_x else None, grad_params if need_params else None, None, None,
                grad_scale if need_scale else None)

    return _backward


def _register_compiled_ops() -> None:
    for name in ("givens_chain", "quasi_givens_chain"):
        torch.library.register_fake(f"qgoft::{name}")(_fake_chain)
        torch.library.register_fake(f"qgoft::{name}_backward")(_fake_chain_backward)
        backward_op = getattr(torch.ops.qgoft, f"{name}_backward").default
        torch.library.register_autograd(
            f"qgoft::{name}", _make_backward(backward_op), setup_context=_setup_context)


if _extension.extension_loaded():
    _register_compiled_ops()


# --------------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------------

def givens_chain(x: Tensor, angles: Tensor, pairs: Tensor, layer_offsets: Tensor,
                 scale: Tensor | None = None) -> Tensor:
    """Apply a chain of strict Givens rotations: rows of x (..., d) -> ``s * (R^T x)``. Differentiable."""
    if uses_compiled_kernel(x):
        return torch.ops.qgoft.givens_chain(x, angles, pairs, layer_offsets, scale)
    return reference.givens_chain_reference(x, angles, pairs, layer_offsets, scale)


def quasi_givens_chain(x: Tensor, blocks: Tensor, pairs: Tensor, layer_offsets: Tensor,
                       scale: Tensor | None = None) -> Tensor:
    """Apply a chain of quasi-Givens 2x2 blocks (P, 2, 2): rows of x -> ``s * (R^T x)``. Differentiable."""
    if uses_compiled_kernel(x):
        return torch.ops.qgoft.quasi_givens_chain(x, blocks, pairs, layer_offsets, scale)
    return reference.quasi_givens_chain_reference(x, blocks, pairs, layer_offsets, scale)


_ADJOINT_MASK = [True, False, False]


def givens_chain_adjoint(g: Tensor, angles: Tensor, pairs: Tensor, layer_offsets: Tensor,
                         scale: Tensor | None = None) -> Tensor:
    """The transpose of :func:`givens_chain`: rows of g (..., d) -> ``R (s * g)``, i.e. ``G S R^T``.

    Not differentiable (used for merging). Merged weight of a layer: ``W_lin S R^T`` = adjoint(W_lin).
    """
    if uses_compiled_kernel(g):
        return torch.ops.qgoft.givens_chain_backward(
            g, g, angles, pairs, layer_offsets, scale, _ADJOINT_MASK)[0]
    with torch.no_grad():
        return reference.givens_chain_adjoint_reference(g, angles, pairs, layer_offsets, scale)


def quasi_givens_chain_adjoint(g: Tensor, blocks: Tensor, pairs: Tensor, layer_offsets: Tensor,
                               scale: Tensor | None = None) -> Tensor:
    """The transpose of :func:`quasi_givens_chain` (see :func:`givens_chain_adjoint`)."""
    if uses_compiled_kernel(g):
        return torch.ops.qgoft.quasi_givens_chain_backward(
            g, g, blocks, pairs, layer_offsets, scale, _ADJOINT_MASK)[0]
    with torch.no_grad():
        return reference.quasi_givens_chain_adjoint_reference(g, blocks, pairs, layer_offsets, scale)
