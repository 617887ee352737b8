"""The CPU and CUDA glue share one set of argument checks and row views (csrc/common/checks.h): on every
device the compiled ops refuse the same arguments with the same message, and the edge shapes (d = 0, zero
rows, leading dimensions of size 0) give the same results. CUDA cases run only with a GPU."""
from __future__ import annotations

import pytest
import torch

import qgoft
from chain_helpers import I32, is_quasi, kernel_backward, kernel_chain

pytestmark = pytest.mark.skipif(not qgoft.extension_loaded(), reason="compiled extension not loaded")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=pytest.mark.skipif(not (torch.cuda.is_available() and qgoft._extension.has_kernel("cuda")),
                                          reason="needs CUDA and the CUDA kernels")),
]
METHODS = ["goft", "goft_scaled", "qgoft", "qgoft_scaled"]


def empty_layout(device):
    return torch.zeros(0, 2, dtype=I32, device=device), torch.zeros(1, dtype=I32, device=device)


def params_for(method, num_pairs, device, dtype=torch.float32):
    shape = (num_pairs, 2, 2) if is_quasi(method) else (num_pairs,)
    return torch.ones(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(5, 0), (0,), (2, 3, 0), (0, 0)])
def test_zero_width_rows(device, method, shape):
    """d = 0: an empty result of x's shape; zero-size parameter gradients (zeros of the parameters' shape)."""
    pairs, offsets = empty_layout(device)
    x = torch.randn(shape, device=device)
    params = params_for(method, 0, device)
    scale = torch.ones(0, device=device) if method.endswith("_scaled") else None
    y = kernel_chain(method, x, params, pairs, offsets, scale)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    gx, gp, gs = kernel_backward(method, torch.ones_like(x), x, params, pairs, offsets, scale)
    assert gx.shape == x.shape and gp.shape == params.shape
    assert gs.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["goft_scaled", "qgoft"])
@pytest.mark.parametrize("leading", [(0,), (3, 0), (0, 2)])
def test_zero_rows(device, method, leading):
    """No rows (a leading size 0): empty outputs, parameter and scale gradients exactly zero."""
    d = 6
    lay = qgoft.layouts.parallel(d)
    pairs, offsets = lay.pairs_tensor().to(device), lay.layer_offsets_tensor().to(device)
    x = torch.randn(*leading, d, device=device)
    params = params_for(method, pairs.shape[0], device)
    scale = torch.ones(d, device=device) if method.endswith("_scaled") else None
    assert kernel_chain(method, x, params, pairs, offsets, scale).shape == x.shape
    gx, gp, gs = kernel_backward(method, torch.ones_like(x), x, params, pairs, offsets, scale)
    assert gx.shape == x.shape
    assert torch.equal(gp, torch.zeros_like(params))
    if scale is not None:
        assert torch.equal(gs, torch.zeros_like(scale))


def _bad_calls(device):
    """(name, call, message) for one bad argument each; the message is device-independent."""
    d = 4
    pairs = torch.tensor([[0, 1], [2, 3]], dtype=I32, device=device)
    offsets = torch.tensor([0, 2], dtype=I32, device=device)
    x = torch.randn(3, d, device=device)
    angles = torch.zeros(2, device=device)
    blocks = torch.ones(2, 2, 2, device=device)
    g = torch.ones_like(x)
    op = torch.ops.qgoft
    return [
        ("x dtype", lambda: op.givens_chain(x.int(), angles, pairs, offsets, None),
         "qgoft::givens_chain: x must be float32, float64, bfloat16 or float16, got Int"),
        ("x scalar", lambda: op.givens_chain(x[0, 0], angles, pairs, offsets, None),
         "qgoft::givens_chain: x must have at least one dimension (..., d), got a 0-dim tensor"),
        ("pairs dtype", lambda: op.givens_chain(x, angles, pairs.long(), offsets, None),
         "qgoft::givens_chain: pairs must be an int32 tensor of shape (P, 2), got Long [2, 2]"),
        ("offsets shape", lambda: op.quasi_givens_chain(x, blocks, pairs, offsets[:0], None),
         "qgoft::quasi_givens_chain: layer_offsets must be an int32 tensor of shape (L + 1,), got Int [0]"),
        ("angles dtype", lambda: op.givens_chain(x, angles.int(), pairs, offsets, None),
         "qgoft::givens_chain: angles must be a floating point tensor, got Int"),
        ("angles shape", lambda: op.givens_chain(x, angles[:1], pairs, offsets, None),
         "qgoft::givens_chain: angles must have shape (P,) = (2,), got [1]"),
        ("blocks shape", lambda: op.quasi_givens_chain(x, blocks[:, :1], pairs, offsets, None),
         "qgoft::quasi_givens_chain: blocks must have shape (P, 2, 2) = (2, 2, 2), got [2, 1, 2]"),
        ("scale shape", lambda: op.givens_chain(x, angles, pairs, offsets, torch.ones(5, device=device)),
         "qgoft::givens_chain: scale must have shape (d,) = (4,), got [5]"),
        ("grad_out shape",
         lambda: op.givens_chain_backward(g[:2], x, angles, pairs, offsets, None, [True, True, False]),
         "qgoft::givens_chain_backward: grad_out must have the shape of x [3, 4], got [2, 4]"),
        ("grad_out dtype",
         lambda: op.quasi_givens_chain_backward(g.int(), x, blocks, pairs, offsets, None, [True, True, False]),
         "qgoft::quasi_givens_chain_backward: grad_out must be a floating point tensor, got Int"),
        ("pair out of range",
         lambda: op.givens_chain(x, angles, torch.tensor([[0, 1], [2, 4]], dtype=I32, device=device), offsets,
                                 None),
         "qgoft::givens_chain: pair 1 = (2, 4) must satisfy 0 <= i < j < d = 4 (d = x.size(-1))"),
        ("offsets end",
         lambda: op.givens_chain(x, angles, pairs, torch.tensor([0, 1], dtype=I32, device=device), None),
         "qgoft::givens_chain: layer_offsets must start at 0 and end at P = 2, got 0 and 1"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_same_refusals_on_every_device(device):
    for name, call, message in _bad_calls(device):
        with pytest.raises(RuntimeError) as info:
            call()
        assert message in str(info.value), (name, str(info.value))

