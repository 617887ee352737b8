"""Bad input gets a clear error naming the argument with the expected and the actual value, or a defined
result -- never a crash or silent garbage. At three levels: the ops (the compiled ``torch.ops.qgoft`` ops and the
pure-PyTorch reference that replaces them when the extension is missing must accept and refuse the same inputs,
with the same wording), ``qgoft.nn.Linear`` and whole models (``get_qgoft_model``).

Devices: the tests take the ``device`` fixture (tests/conftest.py: "cpu", and "cuda" where the CUDA kernels can
be tested). On CUDA every op error is also checked against the CPU's: the same input gets the same error type
and the same message, word for word (``raises_same_on_every_device``). The mixed-device cases put an argument on
the ``meta`` device next to ``x`` (it used to reach the fake kernel and return uninitialised memory); the
CUDA-next-to-CPU cases run only with a GPU.
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import qgoft
from qgoft import layouts
from qgoft import ops as qops
from qgoft import reference as ref
from qgoft.nn import Linear
import chain_helpers  # noqa: E402
from chain_helpers import (I32, OP_VARIANTS, is_quasi, kernel_backward, kernel_chain, make_layout,  # noqa: E402
                           ops_chain, raises_same_on_every_device, ref_adjoint, ref_chain, require_cuda_or_skip,
                           tensors_from_layers, to_device)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
LINEAR_METHODS = ["goft", "goft_scaled", "qgoft"]
TIGHT = dict(rtol=1e-12, atol=1e-12)

needs_ops = pytest.mark.skipif(not qgoft.extension_loaded(), reason="compiled extension not loaded")


def params_name(method):
    return "blocks" if is_quasi(method) else "angles"


def layout_tensors(d=8, kind="parallel", device="cpu"):
    return make_layout(kind, d, device)


def make_params(method, num_pairs, d, dtype=F64, seed=0, device="cpu"):
    return chain_helpers.make_params(method, num_pairs, d, torch.Generator().manual_seed(seed), dtype=dtype,
                                     device=device)


# The two implementations of every op: the compiled op and the reference (the fallback).
FORWARDS = [pytest.param(kernel_chain, id="kernel", marks=needs_ops), pytest.param(ref_chain, id="reference")]


def raises_both(device, forward, method, args, pattern):
    """``forward(method, *args)`` with the tensors on ``device`` must raise a RuntimeError (the compiled ops'
    error type; the reference's InputError is one) whose message matches ``pattern``; on CUDA the same call on
    the CPU must raise the same error, word for word."""
    raises_same_on_every_device(device, forward, (method,) + tuple(args), pattern)


def dev_name(device):
    """How an error message names ``device`` (``cpu``, ``cuda:0``), as a regular expression."""
    return re.escape(str(torch.empty(0, device=device).device))


# ------------------------------------------------------------------------------------------------
# 1. x whose last dimension is not d.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_x_narrower_than_the_layout(device, forward, method):
    pairs, offsets = layout_tensors(8)  # pair 3 = (6, 7) is the first one out of range for d = 6
    params, _ = make_params(method, 7, 8)
    x = torch.randn(3, 6, dtype=F64)
    raises_both(device, forward, method, (x, params, pairs, offsets),
                r"pair 3 = \(6, 7\) must satisfy 0 <= i < j < d = 6 \(d = x\.(size\(-1\)|shape\[-1\])")


@pytest.mark.parametrize("forward", FORWARDS)
def test_scale_of_another_width_than_x(device, forward):
    pairs, offsets = layout_tensors(8, device=device)
    angles, _ = make_params("goft", 7, 8, device=device)
    x = torch.randn(3, 10, dtype=F64, device=device)  # a layout for d = 8 is valid on 10 features (8, 9 untouched)
    out = forward("goft", x, angles, pairs, offsets)
    torch.testing.assert_close(out[:, 8:], x[:, 8:], rtol=0, atol=0)
    # ... but a scale must have x's width
    raises_both(device, forward, "goft", (x, angles, pairs, offsets, torch.ones(8, dtype=F64)),
                r"scale must have shape \(d,\) = \(10,\), got \[8\]")


@pytest.mark.parametrize("method", LINEAR_METHODS)
@pytest.mark.parametrize("width", [6, 10, 1])
def test_linear_names_in_features(device, method, width):
    layer = Linear(8, 4, method=method, device=device)
    for x in (torch.randn(3, width, device=device), torch.randn(2, 3, width, device=device)):
        with pytest.raises(ValueError, match=rf"x must have shape \(\.\.\., in_features\) = \(\.\.\., 8\), "
                                             rf"got torch.Size\(\[.*{width}\]\)"):
            layer(x)
    layer.merge()  # the merged layer checks the same way (not a matmul message)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, width, device=device))
    with pytest.raises(ValueError, match=r"got torch.Size\(\[\]\)"):
        layer(torch.tensor(1.0, device=device))


# ------------------------------------------------------------------------------------------------
# 2. Parameters of the wrong shape or dtype.
# ------------------------------------------------------------------------------------------------

BAD_PARAMS = [
    # (method, params (P = 7, d = 8), message)
    ("goft", torch.zeros(6), r"angles must have shape \(P,\) = \(7,\), got \[6\]"),
    ("goft", torch.zeros(8), r"angles must have shape \(P,\) = \(7,\), got \[8\]"),
    ("goft", torch.zeros(7, 1), r"angles must have shape \(P,\) = \(7,\), got \[7, 1\]"),
    ("goft", torch.zeros(()), r"angles must have shape \(P,\) = \(7,\), got \[\]"),
    ("goft", torch.zeros(7, 2, 2), r"angles must have shape \(P,\) = \(7,\), got \[7, 2, 2\]"),
    ("goft", torch.zeros(7, dtype=torch.int64), r"angles must be a floating point tensor, got (Long|torch.int64)"),
    ("goft", torch.zeros(7, dtype=torch.bool), r"angles must be a floating point tensor, got (Bool|torch.bool)"),
    ("goft", torch.zeros(7, dtype=torch.complex64),
     r"angles must be a floating point tensor, got (ComplexFloat|torch.complex64)"),
    ("qgoft", torch.zeros(6, 2, 2), r"blocks must have shape \(P, 2, 2\) = \(7, 2, 2\), got \[6, 2, 2\]"),
    ("qgoft", torch.zeros(7, 4), r"blocks must have shape \(P, 2, 2\) = \(7, 2, 2\), got \[7, 4\]"),
    ("qgoft", torch.zeros(7, 2, 3), r"blocks must have shape \(P, 2, 2\) = \(7, 2, 2\), got \[7, 2, 3\]"),
    ("qgoft", torch.zeros(7), r"blocks must have shape \(P, 2, 2\) = \(7, 2, 2\), got \[7\]"),
    ("qgoft", torch.zeros(7, 2, 2, dtype=I32), r"blocks must be a floating point tensor, got (Int|torch.int32)"),
]


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("method,params,message", BAD_PARAMS)
def test_bad_parameters(device, forward, method, params, message):
    pairs, offsets = layout_tensors(8)
    raises_both(device, forward, method, (torch.randn(3, 8), params, pairs, offsets), message)


@needs_ops
@pytest.mark.parametrize("method,params,message", BAD_PARAMS)
def test_bad_parameters_in_backward_and_on_meta(device, method, params, message):
    """The backward op and the fake (meta) kernels refuse the same parameters with the same words."""
    pairs, offsets = layout_tensors(8)
    x = torch.randn(3, 8)
    raises_same_on_every_device(device, kernel_backward, (method, x, x, params, pairs, offsets), message)
    meta = [t.to("meta") for t in (x, params, pairs, offsets)]
    with pytest.raises(RuntimeError, match=message):
        kernel_chain(method, *meta)
    with pytest.raises(RuntimeError, match=message):
        kernel_backward(method, meta[0], *meta)


BAD_SCALES = [
    (torch.ones(7), r"scale must have shape \(d,\) = \(8,\), got \[7\]"),
    (torch.ones(1, 8), r"scale must have shape \(d,\) = \(8,\), got \[1, 8\]"),
    (torch.ones(()), r"scale must have shape \(d,\) = \(8,\), got \[\]"),
    (torch.ones(8, dtype=I32), r"scale must be a floating point tensor, got (Int|torch.int32)"),
    (torch.ones(8, dtype=torch.complex64), r"scale must be a floating point tensor, got (ComplexFloat|torch.complex64)"),
]


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("scale,message", BAD_SCALES)
def test_bad_scale(device, forward, scale, message):
    pairs, offsets = layout_tensors(8)
    for method in ("goft", "qgoft"):
        params, _ = make_params(method, 7, 8, dtype=F32)
        raises_both(device, forward, method, (torch.randn(3, 8), params, pairs, offsets, scale), message)


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_low_precision_parameters_are_a_defined_result(device, forward, dtype):
    """float16/bfloat16 parameters are accepted and widened (the kernels compute in float32): the result is
    the chain of the widened values."""
    pairs, offsets = layout_tensors(8, device=device)
    for method in ("goft_scaled", "qgoft_scaled"):
        params, scale = make_params(method, 7, 8, dtype=dtype, device=device)
        x = torch.randn(5, 8, device=device)
        out = forward(method, x, params, pairs, offsets, scale)
        want = ref_chain(method, x.double(), params.double(), pairs, offsets, scale.double())
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_linear_with_replaced_parameters_of_the_wrong_shape_or_dtype(device, method):
    name = "givens_blocks" if method == "qgoft" else "givens_angles"
    what = params_name(method)
    x = torch.randn(3, 8, device=device)
    layer = Linear(8, 4, method=method, device=device)
    setattr(layer, name, torch.nn.Parameter(getattr(layer, name).detach()[:-1].clone()))
    with pytest.raises(RuntimeError, match=rf"{what} must have shape .*7.*, got \[6"):
        layer(x)
    with pytest.raises(RuntimeError, match=rf"{what} must have shape"):
        layer.merge()
    assert not layer.merged
    layer = Linear(8, 4, method=method, device=device)
    setattr(layer, name, torch.nn.Parameter(getattr(layer, name).detach().to(torch.complex64)))
    with pytest.raises(RuntimeError, match=rf"{what} must be a floating point tensor"):
        layer(x)
    # load_state_dict refuses a wrong shape before touching the layer (torch's own check)
    layer = Linear(8, 4, method=method, device=device)
    state = layer.state_dict()
    state[name] = state[name][:-1]
    with pytest.raises(RuntimeError, match=rf"size mismatch for {name}"):
        layer.load_state_dict(state)
    if method == "goft_scaled":
        layer = Linear(8, 4, method=method, device=device)
        layer.givens_scale = torch.nn.Parameter(torch.ones(7, device=device))
        with pytest.raises(RuntimeError, match=r"scale must have shape \(d,\) = \(8,\), got \[7\]"):
            layer(x)


def test_linear_constructor_argument_errors():
    with pytest.raises(ValueError, match=r"in_features = 1, but a Givens adapter needs d >= 2"):
        Linear(1, 4)
    with pytest.raises(ValueError, match=r"in_features = 0"):
        Linear(0, 4)
    with pytest.raises(ValueError, match=r"adapter_dtype must be torch.float32 or torch.float64, got torch.float16"):
        Linear(4, 4, adapter_dtype=F16)
    with pytest.raises(ValueError, match=r"unknown method 'lora'; expected one of"):
        Linear(4, 4, method="lora")
    with pytest.raises(ValueError, match=r"layout .* is for d=5 features, but d=4 was requested"):
        Linear(4, 4, layout=layouts.parallel(5))


# ------------------------------------------------------------------------------------------------
# 3. Integer or complex input.
# ------------------------------------------------------------------------------------------------

NON_FLOAT = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128]


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("dtype", NON_FLOAT)
def test_integer_or_complex_x(device, forward, dtype):
    pairs, offsets = layout_tensors(8)
    x = torch.ones(3, 8, dtype=dtype)
    for method in ("goft", "qgoft_scaled"):
        params, scale = make_params(method, 7, 8, dtype=F32)
        raises_both(device, forward, method, (x, params, pairs, offsets, scale),
                    r"x must be float32, float64, bfloat16 or float16, got")


@needs_ops
@pytest.mark.parametrize("dtype", NON_FLOAT)
def test_integer_or_complex_x_and_grad_out_in_backward(device, dtype):
    pairs, offsets = layout_tensors(8)
    good = torch.randn(3, 8)
    bad = torch.ones(3, 8, dtype=dtype)
    for method in ("goft", "qgoft"):
        params, _ = make_params(method, 7, 8, dtype=F32)
        raises_same_on_every_device(device, kernel_backward, (method, good, bad, params, pairs, offsets),
                                    r"\bx must be float32, float64, bfloat16 or float16, got")
        # grad_out used to be cast silently (complex -> real dropped the imaginary part)
        raises_same_on_every_device(device, kernel_backward, (method, bad, good, params, pairs, offsets),
                                    r"grad_out must be a floating point tensor, got")
        with pytest.raises(RuntimeError, match=r"grad_out must be a floating point tensor, got"):
            kernel_backward(method, bad.to("meta"), good.to("meta"), params.to("meta"), pairs.to("meta"),
                            offsets.to("meta"))


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_linear_integer_or_complex_input(device, method):
    layer = Linear(8, 4, method=method, device=device)
    for dtype in (torch.int64, torch.complex64):
        with pytest.raises(RuntimeError, match=r"x must be float32, float64, bfloat16 or float16"):
            layer(torch.ones(3, 8, dtype=dtype, device=device))


def test_grad_out_of_another_float_dtype_is_cast(device):
    """A float64 grad_out for float32 x is a defined result: cast to x's dtype first."""
    if not qgoft.extension_loaded():
        pytest.skip("compiled extension not loaded")
    pairs, offsets = layout_tensors(8, device=device)
    angles, _ = make_params("goft", 7, 8, dtype=F32, device=device)
    x, g = torch.randn(3, 8, device=device), torch.randn(3, 8, device=device)
    a = kernel_backward("goft", g.double(), x, angles, pairs, offsets)
    b = kernel_backward("goft", g, x, angles, pairs, offsets)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ------------------------------------------------------------------------------------------------
# 4. x, parameters, layout tensors and base weight on different devices.
# ------------------------------------------------------------------------------------------------

def _device_args(method, x_device, other_device, which):
    pairs, offsets = layout_tensors(8)
    params, scale = make_params(method, 7, 8, dtype=F32)
    named = {"x": torch.randn(3, 8), params_name(method): params, "pairs": pairs, "layer_offsets": offsets,
             "scale": scale if scale is not None else torch.ones(8)}
    named = {k: v.to(x_device) for k, v in named.items()}
    named[which] = named[which].to(other_device)
    return named


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("method", ["goft", "qgoft"])
@pytest.mark.parametrize("which", ["params", "pairs", "layer_offsets", "scale"])
def test_argument_on_meta_next_to_cpu_x(device, forward, method, which):
    """Used to return uninitialised memory from the compiled op (the Meta dispatch key won, and the fake
    kernel did not look at devices); the reference used to copy silently. (Named for the CPU; on CUDA, x is
    a CUDA tensor.)"""
    name = params_name(method) if which == "params" else which
    a = _device_args(method, device, "meta", name)
    with pytest.raises(RuntimeError, match=rf"{name} must be on the same device as x \({dev_name(device)}\), got meta"):
        forward(method, a["x"], a[params_name(method)], a["pairs"], a["layer_offsets"], a["scale"])


@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_meta_x_next_to_cpu_arguments(device, method):
    for name in (params_name(method), "pairs", "scale"):
        b = {k: (v if k == name else v.to("meta")) for k, v in _device_args(method, device, device, "x").items()}
        with pytest.raises(RuntimeError,
                           match=rf"{name} must be on the same device as x \(meta\), got {dev_name(device)}"):
            ops_chain(method, b["x"], b[params_name(method)], b["pairs"], b["layer_offsets"], b["scale"])


@needs_ops
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_all_meta_is_shape_propagation(method):
    """Everything on meta (e.g. a model built on the meta device): a meta result of the right shape, and
    meta gradients of the right shapes."""
    pairs, offsets = layout_tensors(8)
    params, scale = make_params(method, 7, 8, dtype=F32)
    x = torch.randn(2, 3, 8, device="meta", requires_grad=True)
    params = params.to("meta").requires_grad_()
    scale = scale.to("meta").requires_grad_() if scale is not None else None
    out = ops_chain(method, x, params, pairs.to("meta"), offsets.to("meta"), scale)
    assert out.device.type == "meta" and out.shape == x.shape and out.dtype == F32
    out.sum().backward()
    assert x.grad.shape == x.shape and params.grad.shape == params.shape
    if scale is not None:
        assert scale.grad.shape == (8,)


@needs_ops
def test_grad_out_on_meta(device):
    pairs, offsets = layout_tensors(8, device=device)
    x = torch.randn(3, 8, device=device)
    with pytest.raises(RuntimeError, match=rf"grad_out must be on the same device as x \({dev_name(device)}\), got meta"):
        kernel_backward("goft", x.to("meta"), x, torch.zeros(7, device=device), pairs, offsets)


def test_reference_on_meta_explains():
    pairs, offsets = layout_tensors(8)
    meta = [t.to("meta") for t in (torch.randn(3, 8), torch.zeros(7), pairs, offsets)]
    with pytest.raises(RuntimeError, match="needs the values of pairs and layer_offsets"):
        ref.givens_chain_reference(*meta)


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_linear_on_different_devices(device, method):
    name = "givens_blocks" if method == "qgoft" else "givens_angles"
    here = dev_name(device)
    x = torch.randn(3, 8, device=device)
    # x elsewhere than the layer
    layer = Linear(8, 4, method=method, device=device)
    with pytest.raises(ValueError, match=rf"x must be on the device of the layer's weight \({here}\), got meta"):
        layer(x.to("meta"))
    # a layer built on meta: meta in, meta out; an input on another device is refused
    meta_layer = Linear(8, 4, method=method, device="meta")
    out = meta_layer(x.to("meta"))
    assert out.device.type == "meta" and out.shape == (3, 4)
    with pytest.raises(ValueError, match=rf"x must be on the device of the layer's weight \(meta\), got {here}"):
        meta_layer(x)
    # adapter parameter elsewhere than the base weight and x
    layer = Linear(8, 4, method=method, device=device)
    setattr(layer, name, torch.nn.Parameter(getattr(layer, name).detach().to("meta")))
    with pytest.raises(RuntimeError, match=rf"{params_name(method)} must be on the same device as x \({here}\), got meta"):
        layer(x)
    with pytest.raises(ValueError, match=rf"{name} is on meta but the base weight is on {here}"):
        layer.merge()
    assert not layer.merged
    # base weight elsewhere than the adapter
    layer = Linear(8, 4, method=method, device=device)
    layer.weight = torch.nn.Parameter(layer.weight.detach().to("meta"), requires_grad=False)
    with pytest.raises(ValueError, match=rf"{name} is on {here} but the base weight is on meta"):
        layer.merge()


@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_cuda_and_cpu_arguments_mixed(method):
    require_cuda_or_skip()
    a = _device_args(method, "cuda", "cuda", "x")  # every argument on CUDA, then one of them on the CPU
    for name in (params_name(method), "pairs", "layer_offsets", "scale"):
        b = dict(a)
        b[name] = b[name].to("cpu")
        with pytest.raises(RuntimeError, match=rf"{name} must be on the same device as x"):
            ops_chain(method, b["x"], b[params_name(method)], b["pairs"], b["layer_offsets"], b["scale"])
        with pytest.raises(RuntimeError, match=rf"{name} must be on the same device as x"):
            ref_chain(method, b["x"], b[params_name(method)], b["pairs"], b["layer_offsets"], b["scale"])


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_cuda_linear_on_different_devices(method):
    require_cuda_or_skip()
    layer = Linear(8, 4, method=method).cuda()
    with pytest.raises(ValueError, match="x must be on the device of the layer's weight"):
        layer(torch.randn(3, 8))
    name = "givens_blocks" if method == "qgoft" else "givens_angles"
    setattr(layer, name, torch.nn.Parameter(getattr(layer, name).detach().cpu()))
    with pytest.raises(RuntimeError, match="must be on the same device as x"):
        layer(torch.randn(3, 8, device="cuda"))
    with pytest.raises(ValueError, match=rf"{name} is on cpu but the base weight is on cuda"):
        layer.merge()


# ------------------------------------------------------------------------------------------------
# 5. Bad layouts: overlapping pairs, i >= j, out-of-range indices, empty layers.
# ------------------------------------------------------------------------------------------------

BAD_LAYOUTS = [
    # (layers as (pairs, offsets), d, message) -- the message is the same for the kernel and the reference
    (([[0, 1], [1, 2]], [0, 2]), 4, r"pair 1 = \(1, 2\) overlaps another pair of layer 0"),
    (([[0, 2], [1, 2]], [0, 2]), 4, r"pair 1 = \(1, 2\) overlaps another pair of layer 0"),
    (([[0, 1], [2, 3], [0, 1], [3, 1]], [0, 2, 4]), 4, r"pair 3 = \(3, 1\) must satisfy 0 <= i < j < d = 4"),
    (([[0, 1], [2, 3], [0, 3], [2, 3]], [0, 2, 4]), 4, r"pair 3 = \(2, 3\) overlaps another pair of layer 1"),
    (([[1, 0]], [0, 1]), 4, r"pair 0 = \(1, 0\) must satisfy 0 <= i < j < d = 4"),
    (([[2, 2]], [0, 1]), 4, r"pair 0 = \(2, 2\) must satisfy 0 <= i < j < d = 4"),
    (([[0, 4]], [0, 1]), 4, r"pair 0 = \(0, 4\) must satisfy 0 <= i < j < d = 4"),
    (([[-1, 2]], [0, 1]), 4, r"pair 0 = \(-1, 2\) must satisfy 0 <= i < j < d = 4"),
    (([[0, 1], [2, 2 ** 31 - 1]], [0, 2]), 4, r"pair 1 = \(2, 2147483647\) must satisfy"),
    (([[0, 1]], [0, 2]), 4, r"layer_offsets must start at 0 and end at P = 1, got 0 and 2"),
    (([[0, 1]], [1, 1]), 4, r"layer_offsets must start at 0 and end at P = 1, got 1 and 1"),
    (([[0, 1], [2, 3]], [0, 2, 1, 2]), 4, r"layer_offsets must be non-decreasing, got 2 > 1 at layer 1"),
    (([[0, 1], [2, 3]], []), 4, r"layer_offsets must be an int32 tensor of shape \(L \+ 1,\)"),
]


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("layout,d,message", BAD_LAYOUTS)
def test_bad_layout_values(device, forward, layout, d, message):
    pairs = torch.tensor(layout[0], dtype=I32).reshape(-1, 2)
    offsets = torch.tensor(layout[1], dtype=I32)
    num_pairs = pairs.shape[0]
    x = torch.randn(3, d, dtype=F64)
    raises_both(device, forward, "goft", (x, torch.zeros(num_pairs, dtype=F64), pairs, offsets), message)
    raises_both(device, forward, "qgoft", (x, torch.eye(2, dtype=F64).repeat(num_pairs, 1, 1), pairs, offsets),
                message)


@pytest.mark.parametrize("forward", FORWARDS)
def test_bad_layout_tensor_types(device, forward):
    pairs, offsets = layout_tensors(4)
    x = torch.randn(3, 4)
    for bad in (pairs.long(), pairs.float(), pairs.reshape(-1), pairs[:, :1]):
        raises_both(device, forward, "goft", (x, torch.zeros(bad.shape[0]), bad, offsets),
                    r"pairs must be an int32 tensor of shape \(P, 2\), got")
    for bad in (offsets.long(), offsets.view(1, -1)):
        raises_both(device, forward, "goft", (x, torch.zeros(3), pairs, bad),
                    r"layer_offsets must be an int32 tensor of shape \(L \+ 1,\), got")


@pytest.mark.parametrize("forward", FORWARDS)
def test_empty_layers_are_identity_layers(device, forward):
    """The ops accept an empty layer (offsets repeat): it changes nothing. (Layout objects refuse them.)"""
    d = 8
    layers = [[(0, 1), (2, 3)], [], [(1, 5)], []]
    pairs, offsets = tensors_from_layers(layers, device)
    pairs2, offsets2 = tensors_from_layers([layer for layer in layers if layer], device)
    assert offsets.tolist() == [0, 2, 2, 3, 3]
    for method in OP_VARIANTS:
        params, scale = make_params(method, 3, d, device=device)
        x = torch.randn(4, d, dtype=F64, device=device)
        torch.testing.assert_close(forward(method, x, params, pairs, offsets, scale),
                                   ref_chain(method, x, params, pairs2, offsets2, scale), **TIGHT)


LAYOUT_API_ERRORS = [
    (4, [[(0, 1), (1, 2)]], r"layer 0, pair 1 \(1, 2\): index 1 is already used by pair 0 \(0, 1\)"),
    (4, [[(1, 0)]], r"layer 0, pair 0 \(1, 0\): need i < j"),
    (4, [[(2, 2)]], r"layer 0, pair 0 \(2, 2\): need i < j"),
    (4, [[(0, 4)]], r"layer 0, pair 0 \(0, 4\): indices must lie in \[0, 4\)"),
    (4, [[(-1, 2)]], r"indices must lie in \[0, 4\)"),
    (4, [[(0, 1)], []], r"layer 1 is empty"),
    (4, [], r"at least one layer"),
    (4, [[(0.5, 1)]], r"must be an integer, got float"),
    (1, [[(0, 1)]], r"d >= 2 features, got d=1"),
]


@pytest.mark.parametrize("d,layers,message", LAYOUT_API_ERRORS)
def test_layout_api_and_linear_refuse_bad_layouts(d, layers, message):
    with pytest.raises(ValueError, match=message):
        layouts.custom(d, layers)
    with pytest.raises(ValueError, match=message if d >= 2 else "in_features = 1"):
        Linear(d, 3, layout=layers)


# ------------------------------------------------------------------------------------------------
# 6. d = 1.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forward", FORWARDS)
def test_d_equal_one(device, forward):
    """One feature: no pair fits, so the chain is the identity (times the scale); any pair is refused."""
    x = torch.randn(5, 1, dtype=F64, device=device)
    no_pairs, offsets = torch.zeros(0, 2, dtype=I32, device=device), torch.zeros(1, dtype=I32, device=device)
    scale = torch.tensor([1.5], dtype=F64, device=device)
    assert torch.equal(forward("goft", x, torch.zeros(0, dtype=F64, device=device), no_pairs, offsets), x)
    torch.testing.assert_close(forward("qgoft", x, torch.zeros(0, 2, 2, dtype=F64, device=device), no_pairs, offsets,
                                       scale), x * 1.5, rtol=0, atol=0)
    raises_both(device, forward, "goft", (x, torch.zeros(1, dtype=F64), torch.tensor([[0, 1]], dtype=I32),
                                  torch.tensor([0, 1], dtype=I32)), r"must satisfy 0 <= i < j < d = 1")


@needs_ops
def test_d_equal_one_gradients(device):
    x = torch.randn(5, 1, dtype=F64, device=device, requires_grad=True)
    scale = torch.tensor([1.5], dtype=F64, device=device, requires_grad=True)
    angles = torch.zeros(0, dtype=F64, device=device, requires_grad=True)
    out = qops.givens_chain(x, angles, torch.zeros(0, 2, dtype=I32, device=device),
                            torch.zeros(1, dtype=I32, device=device), scale)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1.5), rtol=0, atol=0)
    torch.testing.assert_close(scale.grad, x.detach().sum(0), **TIGHT)
    assert angles.grad.shape == (0,)


def test_d_equal_one_at_model_level():
    pytest.importorskip("transformers")
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"module '0' has in_features=1; a Givens adapter needs >= 2"):
        qgoft.get_qgoft_model(model, qgoft.QGoftConfig(target_modules=["0", "2"]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert isinstance(model[0], torch.nn.Linear) and not isinstance(model[0], Linear)


# ------------------------------------------------------------------------------------------------
# 7. Zero rows: an empty result and zero gradients.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forward", [pytest.param(ops_chain, id="ops"), pytest.param(ref_chain, id="reference")])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0), (2, 0, 5)])
def test_zero_rows_through_autograd(device, forward, shape):
    d = 6
    pairs, offsets = layout_tensors(d, device=device)
    for method in OP_VARIANTS:
        params, scale = make_params(method, d - 1, d, dtype=F32, device=device)
        x = torch.randn(*shape, d, device=device, requires_grad=True)
        leaves = [params.requires_grad_()] + ([scale.requires_grad_()] if scale is not None else [])
        out = forward(method, x, params, pairs, offsets, scale)
        assert out.shape == x.shape and out.dtype == x.dtype and out.numel() == 0
        out.sum().backward()
        assert x.grad.shape == x.shape
        for leaf in leaves:
            assert leaf.grad is not None and leaf.grad.shape == leaf.shape and leaf.grad.dtype == F32
            assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_zero_rows_linear(device, method):
    layer = Linear(8, 5, method=method, device=device)
    x = torch.randn(0, 3, 8, device=device, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 3, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for param in layer.adapter_parameters():
        assert torch.equal(param.grad, torch.zeros_like(param))
    layer.merge()
    assert layer(x).shape == (0, 3, 5)


def test_zero_rows_model(device):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).to(device)
    adapted = qgoft.get_qgoft_model(model, qgoft.QGoftConfig(method="qgoft", target_modules=["0", "2"]))
    out = adapted(torch.randn(0, 8, device=device))
    assert out.shape == (0, 3)
    (out.sum() + adapted.orthogonality_penalty()).backward()
    for param in adapted.adapter_parameters():
        assert torch.equal(param.grad, torch.zeros_like(param))


# ------------------------------------------------------------------------------------------------
# 8. NaN / Inf in x propagate like the reference.
# ------------------------------------------------------------------------------------------------

def _poisoned(shape, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g, dtype=F64)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:12]
    flat[idx[:4]] = float("nan")
    flat[idx[4:8]] = float("inf")
    flat[idx[8:]] = -float("inf")
    return x.to(dtype)


@needs_ops
@pytest.mark.parametrize("dtype", [F64, F32, BF16])
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_nan_and_inf_propagate_like_the_reference(device, method, dtype):
    d = 37
    pairs, offsets = layout_tensors(d, device=device)
    params, scale = make_params(method, d - 1, d, dtype=F64 if dtype == F64 else F32, device=device)
    x = _poisoned((5, 7), d, dtype, seed=1).to(device)
    g = torch.randn(5, 7, d, dtype=F64).to(device=device, dtype=dtype)
    got = kernel_chain(method, x, params, pairs, offsets, scale)
    want = ref_chain(method, x, params, pairs, offsets, scale)
    # the same entries are NaN / +-Inf, and the finite ones agree
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)],
                                                                            want[torch.isinf(want)])
    assert torch.isnan(got).any() and torch.isfinite(got).any()
    tol = TIGHT if dtype == F64 else dict(rtol=2e-2, atol=2e-2) if dtype == BF16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, equal_nan=True, **tol)
    # gradients: grad x (the adjoint) never reads x, so it stays finite; parameter gradients see the NaN
    gx, gp, gs = kernel_backward(method, g, x, params, pairs, offsets, scale)
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx, ref_adjoint(method, g, params, pairs, offsets, scale), equal_nan=True, **tol)
    x_leaf = x.detach().double().requires_grad_()
    p_leaf = params.detach().double().requires_grad_()
    s_leaf = scale.detach().double().requires_grad_() if scale is not None else None
    leaves = [p_leaf] + ([s_leaf] if s_leaf is not None else [])
    want_grads = torch.autograd.grad(ref_chain(method, x_leaf, p_leaf, pairs, offsets, s_leaf), leaves,
                                     g.double())
    for got_grad, want_grad in zip([gp] + ([gs] if scale is not None else []), want_grads):
        assert torch.equal(torch.isnan(got_grad), torch.isnan(want_grad))
        assert torch.isnan(got_grad).any()


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_nan_rows_stay_in_their_rows_linear(device, method):
    """A NaN in one row of the input makes (only) that row's output NaN; other rows are unchanged."""
    torch.manual_seed(0)
    layer = Linear(16, 8, method=method).to(device)
    with torch.no_grad():
        for param in layer.adapter_parameters():
            param.add_(0.3 * torch.randn_like(param))
    x = torch.randn(6, 16, device=device)
    clean = layer(x)
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    out = layer(x)
    assert torch.isnan(out[2]).all()
    assert not torch.isfinite(out[4]).all()
    keep = [0, 1, 3, 5]
    assert torch.equal(out[keep], clean[keep])


# ------------------------------------------------------------------------------------------------
# 9. Very large d and many rows: memory stays proportional to the input.
# ------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import gc, json, resource, sys
    import torch
    import qgoft
    from qgoft import layouts
    rows, d, method, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], getattr(torch, sys.argv[4])
    torch.manual_seed(0)
    lay = layouts.parallel(d)
    pairs, offsets = lay.pairs_tensor(), lay.layer_offsets_tensor()
    quasi = method.startswith("qgoft")
    params = (torch.eye(2) + 0.1 * torch.randn(lay.num_pairs, 2, 2)) if quasi else torch.randn(lay.num_pairs)
    scale = torch.rand(d) + 0.5
    fwd = torch.ops.qgoft.quasi_givens_chain if quasi else torch.ops.qgoft.givens_chain
    bwd = torch.ops.qgoft.quasi_givens_chain_backward if quasi else torch.ops.qgoft.givens_chain_backward
    x = torch.empty(rows, d, dtype=dtype).normal_()  # no float32 temporary: it would raise the baseline peak
    g = torch.empty(rows, d, dtype=dtype).normal_()
    # warm up on a small slice (allocator, thread pool, ISA selection), then measure from here
    fwd(x[:64], params, pairs, offsets, scale)
    bwd(g[:64], x[:64], params, pairs, offsets, scale, [True, True, True])
    gc.collect()
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    def current():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    base_peak, base_now = peak(), current()
    y = fwd(x, params, pairs, offsets, scale)
    after_forward = peak()
    del y
    gc.collect()
    gx, gp, gs = bwd(g, x, params, pairs, offsets, scale, [True, True, True])
    after_backward = peak()
    print(json.dumps({"x_bytes": x.numel() * x.element_size(), "base_peak": base_peak, "base_now": base_now,
                      "after_forward": after_forward, "after_backward": after_backward}))
""")


@needs_ops
@pytest.mark.parametrize("rows,d,method,dtype", [
    (1_000_000, 32, "goft_scaled", "float32"),   # many rows: 128 MB of x
    (2_000_000, 32, "qgoft", "bfloat16"),       # 128 MB of bf16 x
    (512, 65536, "qgoft", "float32"),            # very large d: 128 MB of x
])
def test_memory_stays_proportional(rows, d, method, dtype):
    """Peak RSS growth of a forward then a backward (all three outputs) in a fresh process: the output
    (forward) and grad x (backward) are one input-sized tensor each; everything else (tiles, per-chunk
    parameter-gradient partial sums) is bounded by the threads and the parameter count, not the rows.
    Measured here: forward and backward each grow the peak by one input size (+ 42 MB of partial sums at
    d = 65536). The bound, 1.25 input sizes + 64 MB, catches any extra input-sized temporary (e.g. a float32
    copy of bf16 rows, a per-layer copy) while leaving room for allocator slack."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(rows), str(d), method, dtype],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    x_bytes = m["x_bytes"]
    # the peak before the measured calls is at least the current footprint
    forward_growth = m["after_forward"] - max(m["base_peak"], m["base_now"])
    backward_growth = m["after_backward"] - max(m["base_peak"], m["base_now"])
    slack = 64 << 20
    assert forward_growth <= 1.25 * x_bytes + slack, m
    assert backward_growth <= 1.25 * x_bytes + slack, m


# ------------------------------------------------------------------------------------------------
# 10. requires_grad combinations and backward twice.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forward", [pytest.param(ops_chain, id="ops"), pytest.param(ref_chain, id="reference")])
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_requires_grad_combinations(device, forward, method):
    d = 13
    pairs, offsets = layout_tensors(d, device=device)
    params0, scale0 = make_params(method, d - 1, d, device=device)
    x0 = torch.randn(4, 5, d, dtype=F64).to(device)
    g = torch.randn(4, 5, d, dtype=F64).to(device)
    # all gradients from the reference, for comparison
    leaves = [t.clone().requires_grad_() for t in (x0, params0, scale0) if t is not None]
    full = torch.autograd.grad(ref_chain(method, leaves[0], leaves[1], pairs, offsets,
                                           leaves[2] if scale0 is not None else None), leaves, g)
    for need in itertools.product([False, True], repeat=3 if scale0 is not None else 2):
        tensors = [t.clone().requires_grad_(n) for t, n in zip((x0, params0, scale0), need)]
        scale = tensors[2] if scale0 is not None else None
        out = forward(method, tensors[0], tensors[1], pairs, offsets, scale)
        assert out.requires_grad == any(need)
        if not any(need):  # neither: a plain result; backward is torch's usual error
            assert out.grad_fn is None
            with pytest.raises(RuntimeError, match="does not require grad"):
                out.backward(g)
            continue
        out.backward(g)
        for t, n, want in zip(tensors, need, full):
            if n:
                torch.testing.assert_close(t.grad, want, **TIGHT)
            else:
                assert t.grad is None
    with torch.no_grad():
        x = x0.clone().requires_grad_()
        assert not forward(method, x, params0.clone().requires_grad_(), pairs, offsets, scale0).requires_grad


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_linear_requires_grad_combinations(device, method):
    torch.manual_seed(1)
    layer = Linear(12, 7, method=method).to(device)
    x0 = torch.randn(9, 12).to(device)
    # only x (adapter frozen), only the adapter, neither
    layer.requires_grad_(False)
    x = x0.clone().requires_grad_()
    layer(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in layer.adapter_parameters())
    for param in layer.adapter_parameters():
        param.requires_grad_(True)
    layer(x0).sum().backward()
    assert all(p.grad is not None for p in layer.adapter_parameters())
    assert layer.weight.grad is None
    layer.requires_grad_(False)
    assert not layer(x0).requires_grad


@pytest.mark.parametrize("forward", [pytest.param(ops_chain, id="ops"), pytest.param(ref_chain, id="reference")])
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_backward_twice_with_retain_graph(device, forward, method):
    d = 10
    pairs, offsets = layout_tensors(d, device=device)
    params, scale = make_params(method, d - 1, d, dtype=F32, device=device)
    x = torch.randn(6, d).to(device).requires_grad_()
    leaves = [x, params.requires_grad_()] + ([scale.requires_grad_()] if scale is not None else [])
    out = forward(method, x, params, pairs, offsets, scale)
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    out.backward(g, retain_graph=True)
    for t, f in zip(leaves, first):
        assert torch.equal(t.grad, 2 * f), "the second backward must add exactly the same gradients"
    out.backward(g)  # a third time, releasing the graph
    for t, f in zip(leaves, first):
        torch.testing.assert_close(t.grad, 3 * f, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward(g)


@pytest.mark.parametrize("method", OP_VARIANTS)
def test_double_backward_is_correct(device, method):
    """backward(create_graph=True) gives differentiable gradients (the compiled backward has no derivative of
    its own: the op differentiates the reference's graph then) -- before, the second derivative through the
    compiled op was silently zero (with only a warning)."""
    d = 6
    pairs, offsets = layout_tensors(d, device=device)
    params, scale = make_params(method, d - 1, d, device=device)
    x = torch.randn(3, d, dtype=F64).to(device)
    w = torch.randn(3, d, dtype=F64).to(device)
    inputs = [x.requires_grad_(), params.requires_grad_()] + ([scale.requires_grad_()] if scale is not None else [])

    def loss_of_grads(forward, *leaves):
        out = forward(method, leaves[0], leaves[1], pairs, offsets, leaves[2] if scale is not None else None)
        grads = torch.autograd.grad((out * w).sum(), leaves, create_graph=True)
        return sum((gr * gr).sum() for gr in grads)

    got = torch.autograd.grad(loss_of_grads(ops_chain, *inputs), inputs)
    want = torch.autograd.grad(loss_of_grads(ref_chain, *inputs), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TIGHT)
    fn = (lambda *t: ops_chain(method, t[0], t[1], pairs, offsets, t[2] if scale is not None else None))
    assert torch.autograd.gradgradcheck(fn, tuple(inputs))


# ------------------------------------------------------------------------------------------------
# 11. Whole models.
# ------------------------------------------------------------------------------------------------

def _adapted_mlp(method="qgoft", device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).to(device)
    return qgoft.get_qgoft_model(model, qgoft.QGoftConfig(method=method, target_modules=["0", "2"]))


def test_model_level_bad_inputs(device):
    model = _adapted_mlp(device=device)
    with pytest.raises(ValueError, match=r"in_features\) = \(\.\.\., 8\), got torch.Size\(\[4, 9\]\)"):
        model(torch.randn(4, 9, device=device))
    with pytest.raises(RuntimeError, match=r"x must be float32, float64, bfloat16 or float16, got Long"):
        model(torch.ones(4, 8, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=rf"x must be on the device of the layer's weight \({dev_name(device)}\), got meta"):
        model(torch.randn(4, 8, device="meta"))
    x = torch.randn(5, 8, device=device)
    x[1, 3] = float("nan")
    out = model(x)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3, 4]]).all()
    # a model moved to meta computes shapes only
    meta_model = _adapted_mlp().to("meta")
    assert meta_model(torch.randn(4, 8, device="meta")).shape == (4, 3)


def test_model_with_adapter_on_another_device_than_its_base(device):
    model = _adapted_mlp("goft", device=device)
    here = dev_name(device)
    layer = model.base_model[0]
    layer.givens_angles = torch.nn.Parameter(layer.givens_angles.detach().to("meta"))
    with pytest.raises(RuntimeError, match=rf"angles must be on the same device as x \({here}\), got meta"):
        model(torch.randn(2, 8, device=device))
    with pytest.raises(ValueError, match=rf"givens_angles is on meta but the base weight is on {here}"):
        model.merge_adapter()


def test_message_prefixes_name_the_op(device):
    """Every op error starts with the op's name, so the user sees which call failed."""
    pairs, offsets = layout_tensors(8, device=device)
    x = torch.randn(3, 8, device=device)
    cases = [(ref.givens_chain_reference, "givens_chain_reference: "),
             (ref.quasi_givens_chain_reference, "quasi_givens_chain_reference: ")]
    if qgoft.extension_loaded():
        cases += [(torch.ops.qgoft.givens_chain, "qgoft::givens_chain: "),
                  (torch.ops.qgoft.quasi_givens_chain, "qgoft::quasi_givens_chain: ")]
    for fn, prefix in cases:
        with pytest.raises(RuntimeError) as info:
            fn(x, torch.zeros(2, device=device), pairs, offsets, None)
        assert str(info.value).startswith(prefix), str(info.value)
        assert re.search(r"must have shape .* got \[2\]", str(info.value))


# How the C++ checks spell a dtype (c10::ScalarType) where the Python ones print torch's name.
_CPP_DTYPE_NAMES = {"torch.int32": "Int", "torch.int64": "Long", "torch.float32": "Float", "torch.float64": "Double",
                    "torch.float16": "Half", "torch.bfloat16": "BFloat16", "torch.bool": "Bool",
                    "torch.uint8": "Byte", "torch.complex64": "ComplexFloat", "torch.complex128": "ComplexDouble"}


def _without_op(err):
    """The message after the op's name, with dtypes spelled the C++ way."""
    text = str(err).split(": ", 1)[1]
    return re.sub(r"torch\.\w+", lambda m: _CPP_DTYPE_NAMES.get(m.group(0), m.group(0)), text)


# Arguments with two or more faults: every implementation must name the same first one.
SEVERAL_FAULTS = [
    # (x, params, pairs, offsets, scale), all for the strict op (angles)
    lambda: (torch.ones(3, 8, dtype=I32), torch.zeros(6), *layout_tensors(8), torch.ones(7)),  # x, angles, scale
    lambda: (torch.randn(3, 8), torch.zeros(7, dtype=I32), layout_tensors(8)[0].long(), layout_tensors(8)[1], None),
    lambda: (torch.randn(3, 8), torch.zeros(6), layout_tensors(8)[0], layout_tensors(8)[1].long(), None),
    lambda: (torch.randn(3, 8), torch.zeros(6), *layout_tensors(8), torch.ones(7, dtype=I32)),
    lambda: (torch.randn(3, 8), torch.zeros(6), *layout_tensors(8), torch.ones(7)),
    lambda: (torch.randn(3, 6), torch.zeros(6), *layout_tensors(8), None),  # angles shape before pair values
]


@needs_ops
@pytest.mark.parametrize("case", range(len(SEVERAL_FAULTS)))
def test_checks_run_in_the_same_order_everywhere(device, case):
    """The value-free checks are written twice, in Python (qgoft/_checks.py: fake kernels and reference) and in
    C++ (csrc/common/checks.cpp: both backends), in one order: for arguments with several faults the compiled
    op, its fake (meta) kernel and the reference report the same one, in the same words (dtypes aside: C++
    prints ``Int`` where Python prints ``torch.int32``)."""
    args = to_device(SEVERAL_FAULTS[case](), device)
    messages = []
    for fn in (torch.ops.qgoft.givens_chain, ref.givens_chain_reference):
        with pytest.raises(RuntimeError) as info:
            fn(*args)
        messages.append(_without_op(info.value))
    with pytest.raises(RuntimeError) as info:
        torch.ops.qgoft.givens_chain(*to_device(args, "meta"))
    messages.append(_without_op(info.value))
    assert messages[0] == messages[1] == messages[2], messages
