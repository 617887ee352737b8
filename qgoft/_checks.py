"""The value-free argument checks of the chain ops (shapes, dtypes, devices, layout tensor shapes), in one place.

Used by the fake (meta) kernels of :mod:`qgoft.ops` and by :mod:`qgoft.reference`, so both refuse the same
arguments with the same words as the compiled ops (docs/CONTRACT.md, "Argument checks"). Each caller passes
its own ``check(condition, message)`` (``message`` is a zero-argument callable): the fake kernels use
``torch._check`` (a RuntimeError, and symbolic-shape friendly), the reference raises its ``InputError``.
The checks that read tensor values (offsets rising from 0 to P, pairs in range and disjoint) stay in the
reference and the C++ glue.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["KERNEL_DTYPES", "accumulation_dtype", "check_chain_arguments"]

# Activation dtypes the kernels accept.
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accumulation_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for activations of ``x_dtype``: float64 for float64, else float32."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32

Check = Callable[[bool, Callable[[], str]], None]


def check_chain_arguments(check: Check, op: str, x: Tensor, params: Tensor, params_name: str, pairs: Tensor,
                          layer_offsets: Tensor, scale: Optional[Tensor],
                          grad_out: Optional[Tensor] = None, tops: Optional[Tensor] = None) -> None:
    """Check the arguments of a chain op (or of its backward, with ``grad_out``) without reading values.

    ``params_name`` is ``"angles"`` (shape ``(P,)``) or ``"blocks"`` (``(P, 2, 2)``). In this order (the
    order of the compiled ops' glue too, csrc/common/checks.cpp): every argument is a tensor; x has a
    dimension and is float32/float64/bfloat16/float16; every tensor is on x's device; params and scale are real
    floating point; pairs is int32 ``(P, 2)``; layer_offsets is int32 ``(L + 1,)``; params have shape ``(P,)``
    or ``(P, 2, 2)``; scale ``(d,)`` with ``d = x.shape[-1]``; grad_out has x's shape and is floating point;
    tops (the backward's segment tops, docs/CONTRACT.md) has x's accumulation dtype and shape ``(rows, k)``.
    Messages read ``"<op>: <argument> must ..., got <actual>"``."""
    named = [("x", x), (params_name, params), ("pairs", pairs), ("layer_offsets", layer_offsets),
             ("scale", scale), ("grad_out", grad_out), ("tops", tops)]
    named = [(name, t) for name, t in named if t is not None or name == "x"]
    for name, t in named:
        check(isinstance(t, Tensor), lambda: f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check(x.dim() >= 1, lambda: f"{op}: x must have at least one dimension (..., d), got a 0-dim tensor")
    check(x.dtype in KERNEL_DTYPES, lambda: f"{op}: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    for name, t in named[1:]:
        check(t.device == x.device, lambda: f"{op}: {name} must be on the same device as x ({x.device}), got {t.device}")
    for name, t in ((params_name, params), ("scale", scale)):
        if t is not None:
            check(t.is_floating_point(), lambda: f"{op}: {name} must be a floating point tensor, got {t.dtype}")
    check(pairs.dtype == torch.int32 and pairs.dim() == 2 and pairs.shape[1] == 2,
          lambda: f"{op}: pairs must be an int32 tensor of shape (P, 2), got {pairs.dtype} {list(pairs.shape)}")
    check(layer_offsets.dtype == torch.int32 and layer_offsets.dim() == 1 and layer_offsets.numel() >= 1,
          lambda: f"{op}: layer_offsets must be an int32 tensor of shape (L + 1,), got {layer_offsets.dtype} "
                  f"{list(layer_offsets.shape)}")
    num_pairs = pairs.shape[0]
    if params_name == "angles":
        check(params.dim() == 1 and params.shape[0] == num_pairs,
              lambda: f"{op}: angles must have shape (P,) = ({num_pairs},), got {list(params.shape)}")
    else:
        check(params.dim() == 3 and params.shape[0] == num_pairs and params.shape[1] == 2 and params.shape[2] == 2,
              lambda: f"{op}: blocks must have shape (P, 2, 2) = ({num_pairs}, 2, 2), got {list(params.shape)}")
    if scale is not None:
        d = x.shape[-1]
        check(scale.dim() == 1 and scale.shape[0] == d,
              lambda: f"{op}: scale must have shape (d,) = ({d},), got {list(scale.shape)}")
    if grad_out is not None:
        check(grad_out.shape == x.shape,
              lambda: f"{op}: grad_out must have the shape of x {list(x.shape)}, got {list(grad_out.shape)}")
        check(grad_out.is_floating_point(),
              lambda: f"{op}: grad_out must be a floating point tensor, got {grad_out.dtype}")
    if tops is not None:
        acc = accumulation_dtype(x.dtype)
        check(tops.dtype == acc,
              lambda: f"{op}: tops must be {acc} (the accumulation type of x), got {tops.dtype}")
        rows = math.prod(x.shape[:-1])
        check(tops.dim() == 2 and tops.shape[0] == rows,
              lambda: f"{op}: tops must have shape (rows, segments) with rows = {rows}, got {list(tops.shape)}")

