"""Thin op layer: the compiled ``torch.ops.qgoft`` ops with autograd and fake (meta) registrations,
and the functions the rest of the package calls.

Conventions (docs/MATH.md, docs/CONTRACT.md): x has shape (..., d); the chain maps each row to
``x' = s * (R^T x)``, i.e. ``X' = X R S`` for a batch of rows. ``pairs`` is int32 (P, 2) in canonical
order, ``layer_offsets`` int32 (L + 1,). Parameters: ``angles`` (P,) for strict Givens rotations,
``blocks`` (P, 2, 2) = [[alpha1, beta1], [alpha2, beta2]] for quasi-Givens blocks, optional ``scale`` (d,).

When the compiled library is not loaded, or has no kernel for x's device, every function here runs the
pure-PyTorch reference (:mod:`qgoft.reference`) instead.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _extension, reference
from ._checks import accumulation_dtype, check_chain_arguments

__all__ = [
    "givens_chain",
    "quasi_givens_chain",
    "givens_chain_adjoint",
    "quasi_givens_chain_adjoint",
    "uses_compiled_kernel",
]

_EMPTY_SHAPE = (0,)


def uses_compiled_kernel(x: Tensor) -> bool:
    """Whether an op on ``x`` runs the compiled op (else the pure-PyTorch reference). For meta tensors the
    compiled op's fake kernel computes the output's shape and dtype (the reference needs the layout values)."""
    if x.device.type == "meta":
        return _extension.extension_loaded()
    return _extension.has_kernel(x.device.type)


# --------------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd formulas for the compiled ops.
# --------------------------------------------------------------------------------------------------

# The fake kernels run the compiled kernels' value-free checks (qgoft._checks, shared with the reference), so
# meta/fake tensors (torch.compile, torch.export, meta-device modules) fail like real ones. A tensor on another
# device than x would otherwise send the whole call here (the Meta dispatch key wins) and return an
# uninitialised result.

def _make_fake_chain(name: str, params_name: str):
    op = f"qgoft::{name}"

    def _fake_chain(x: Tensor, params: Tensor, pairs: Tensor, layer_offsets: Tensor,
                    scale: Tensor | None) -> Tensor:
        check_chain_arguments(torch._check, op, x, params, params_name, pairs, layer_offsets, scale)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    return _fake_chain


def _make_fake_chain_with_tops(name: str, params_name: str):
    fake_forward = _make_fake_chain(name, params_name)  # the forward's checks, messages and output

    def _fake_chain_with_tops(x: Tensor, params: Tensor, pairs: Tensor, layer_offsets: Tensor,
                              scale: Tensor | None) -> tuple[Tensor, Tensor]:
        out = fake_forward(x, params, pairs, layer_offsets, scale)
        # The tops' column count is the backward's segment count where the device's forward keeps them, else 0
        # (the CPU, rows of one segment, other layouts): it depends on the device, the layout's values and the
        # CUDA switches, so it is a data-dependent size here.
        cols = torch.library.get_ctx().new_dynamic_size()
        tops = torch.empty((math.prod(x.shape[:-1]), cols), dtype=accumulation_dtype(x.dtype), device=x.device)
        return out, tops

    return _fake_chain_with_tops


def _make_fake_chain_backward(name: str, params_name: str):
    op = f"qgoft::{name}_backward"

    def _fake_chain_backward(grad_out: Tensor, x: Tensor, params: Tensor, pairs: Tensor,
                             layer_offsets: Tensor, scale: Tensor | None,
                             output_mask: list[bool], tops: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        check_chain_arguments(torch._check, op, x, params, params_name, pairs, layer_offsets, scale, grad_out,
                              tops)
        grad_x = (torch.empty(x.shape, dtype=x.dtype, device=x.device) if output_mask[0]
                  else x.new_empty(_EMPTY_SHAPE))
        grad_params = (torch.empty(params.shape, dtype=params.dtype, device=params.device)
                       if output_mask[1] else params.new_empty(_EMPTY_SHAPE))
        if output_mask[2] and scale is not None:
            grad_scale = torch.empty(scale.shape, dtype=scale.dtype, device=scale.device)
        else:
            grad_scale = params.new_empty(_EMPTY_SHAPE)
        return grad_x, grad_params, grad_scale

    return _fake_chain_backward


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, params, pairs, layer_offsets, scale = inputs
    ctx.save_for_backward(x, params, pairs, layer_offsets, scale, None)


def _setup_context_with_tops(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    """The forward's segment tops are saved for the backward op (which then skips recomputing them); they are
    not differentiable."""
    x, params, pairs, layer_offsets, scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, params, pairs, layer_offsets, scale, output[1])


def _make_backward(backward_op: Any, reference_fn: Any):
    def _backward(ctx: Any, grad: Tensor, *unused_grad_tops: Tensor):
        x, params, pairs, layer_offsets, scale, tops = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_scale = scale is not None and ctx.needs_input_grad[4]
        if not (need_x or need_params or need_scale):
            return None, None, None, None, None
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (grad, x, params, scale)):
            # backward(create_graph=True): the gradients must themselves be differentiable (double
            # backward, gradient penalties). The backward op has no derivative of its own, so differentiate
            # the reference's graph of the same math instead (slower, exact).
            grads = _differentiable_grads(reference_fn, grad, x, params, pairs, layer_offsets, scale,
                                          (need_x, need_params, need_scale))
            return grads[0], grads[1], None, None, grads[2]
        grad_x, grad_params, grad_scale = backward_op(
            grad, x, params, pairs, layer_offsets, scale, [need_x, need_params, need_scale],
            *(() if tops is None else (tops,)))
        return (grad_x if need_x else None, grad_params if need_params else None, None, None,
                grad_scale if need_scale else None)

    return _backward


def _differentiable_grads(reference_fn: Any, grad: Tensor, x: Tensor, params: Tensor, pairs: Tensor,
                          layer_offsets: Tensor, scale: Tensor | None,
                          need: tuple[bool, bool, bool]) -> list[Tensor | None]:
    """Gradients of ``reference_fn(x, params, ..., scale)`` w.r.t. the needed inputs, with a graph."""
    inputs = [x, params, scale]
    leaves = []
    for k, t in enumerate(inputs):
        if need[k] and not t.requires_grad:  # a needed input always requires grad; keep it safe anyway
            inputs[k] = t.detach().requires_grad_()
        if need[k]:
            leaves.append(inputs[k])
    with torch.enable_grad():
        out = reference_fn(inputs[0], inputs[1], pairs, layer_offsets, inputs[2])
        found = iter(torch.autograd.grad(out, leaves, grad, create_graph=True, allow_unused=True,
                                         materialize_grads=True))
    return [next(found) if need[k] else None for k in range(3)]


# Whether the loaded ops library has the *_with_tops forward ops (an earlier build's library may not: the autograd path
# then runs the plain forward op and the backward recomputes the tops).
_HAS_TOPS_OPS = False


def _register_compiled_ops() -> None:
    global _HAS_TOPS_OPS
    _HAS_TOPS_OPS = all(hasattr(torch.ops.qgoft, f"{name}_with_tops") for name in ("givens_chain", "quasi_givens_chain"))
    for name, params_name in (("givens_chain", "angles"), ("quasi_givens_chain", "blocks")):
        torch.library.register_fake(f"qgoft::{name}")(_make_fake_chain(name, params_name))
        torch.library.register_fake(f"qgoft::{name}_backward")(_make_fake_chain_backward(name, params_name))
        backward_op = getattr(torch.ops.qgoft, f"{name}_backward").default
        reference_fn = getattr(reference, f"{name}_reference")
        torch.library.register_autograd(
            f"qgoft::{name}", _make_backward(backward_op, reference_fn), setup_context=_setup_context)
        if not _HAS_TOPS_OPS:
            continue  # an earlier build's ops library (e.g. bench_gpu.py --ops-library): no segment tops
        torch.library.register_fake(f"qgoft::{name}_with_tops")(_make_fake_chain_with_tops(name, params_name))
        torch.library.register_autograd(f"qgoft::{name}_with_tops", _make_backward(backward_op, reference_fn),
                                        setup_context=_setup_context_with_tops)


if _extension.extension_loaded():
    _register_compiled_ops()


# --------------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------------

def _keeps_tops(x: Tensor, params: Tensor, scale: Tensor | None) -> bool:
    """Whether a compiled forward on ``x`` runs the ``*_with_tops`` op, whose segment tops autograd saves for the
    backward: on CUDA (the only device that keeps tops) where autograd records the call, and neither under
    ``torch.jit.trace`` (TorchScript and C++ programs use the plain forward op's schema) nor while torch.compile
    traces (the tops' column count depends on the layout's values, so Dynamo would break the graph at every
    adapter outside ``fullgraph=True``; compiled graphs keep the plain op and their backward recomputes the tops)."""
    return (_HAS_TOPS_OPS and x.device.type == "cuda" and torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in (x, params, scale)))


def givens_chain(x: Tensor, angles: Tensor, pairs: Tensor, layer_offsets: Tensor,
                 scale: Tensor | None = None) -> Tensor:
    """Apply a chain of strict Givens rotations: rows of x (..., d) -> ``s * (R^T x)``. Differentiable."""
    if uses_compiled_kernel(x):
        if _keeps_tops(x, angles, scale):
            return torch.ops.qgoft.givens_chain_with_tops(x, angles, pairs, layer_offsets, scale)[0]
        return torch.ops.qgoft.givens_chain(x, angles, pairs, layer_offsets, scale)
    return reference.givens_chain_reference(x, angles, pairs, layer_offsets, scale)


def quasi_givens_chain(x: Tensor, blocks: Tensor, pairs: Tensor, layer_offsets: Tensor,
                       scale: Tensor | None = None) -> Tensor:
    """Apply a chain of quasi-Givens 2x2 blocks (P, 2, 2): rows of x -> ``s * (R^T x)``. Differentiable."""
    if uses_compiled_kernel(x):
        if _keeps_tops(x, blocks, scale):
            return torch.ops.qgoft.quasi_givens_chain_with_tops(x, blocks, pairs, layer_offsets, scale)[0]
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
