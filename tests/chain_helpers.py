"""Shared pieces of the op-level tests: the methods, and each op's compiled kernel, reference and public
function dispatched by method. Imported by tests/test_ops.py, test_bad_input.py, test_fuzz.py and
test_determinism.py (pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch

from qgoft import ops as qops
from qgoft import reference as ref

I32 = torch.int32
METHODS = ["goft", "goft_scaled", "qgoft", "qgoft_scaled"]


def is_quasi(method: str) -> bool:
    return method.startswith("qgoft")


def has_scale(method: str) -> bool:
    return method.endswith("_scaled")


def tensors_from_layers(layers):
    """(pairs (P, 2), layer_offsets (L + 1,)) int32 tensors of a list of layers of (i, j) pairs."""
    flat = [pair for layer in layers for pair in layer]
    offsets = [0]
    for layer in layers:
        offsets.append(offsets[-1] + len(layer))
    return torch.tensor(flat, dtype=I32).reshape(len(flat), 2), torch.tensor(offsets, dtype=I32)


def kernel_chain(method, x, params, pairs, offsets, scale=None):
    """The compiled forward op (torch.ops.qgoft.*), no fallback."""
    fn = torch.ops.qgoft.quasi_givens_chain if is_quasi(method) else torch.ops.qgoft.givens_chain
    return fn(x, params, pairs, offsets, scale)


def kernel_backward(method, g, x, params, pairs, offsets, scale=None, mask=(True, True, True)):
    """The compiled backward op: (grad_x, grad_params, grad_scale), unrequested ones empty."""
    fn = (torch.ops.qgoft.quasi_givens_chain_backward if is_quasi(method)
          else torch.ops.qgoft.givens_chain_backward)
    return fn(g, x, params, pairs, offsets, scale, list(mask))


def ref_chain(method, x, params, pairs, offsets, scale=None, **kwargs):
    fn = ref.quasi_givens_chain_reference if is_quasi(method) else ref.givens_chain_reference
    return fn(x, params, pairs, offsets, scale, **kwargs)


def ref_adjoint(method, g, params, pairs, offsets, scale=None, **kwargs):
    fn = ref.quasi_givens_chain_adjoint_reference if is_quasi(method) else ref.givens_chain_adjoint_reference
    return fn(g, params, pairs, offsets, scale, **kwargs)


def ops_chain(method, x, params, pairs, offsets, scale=None):
    """The public function (compiled op when loaded, else the reference)."""
    fn = qops.quasi_givens_chain if is_quasi(method) else qops.givens_chain
    return fn(x, params, pairs, offsets, scale)
