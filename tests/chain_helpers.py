"""Shared pieces of the op-level tests: the op variants, each op's compiled kernel, reference and public
function dispatched by variant, the builders of layouts, parameters and strided inputs (on any device), and the
helpers that run a test on several devices. Imported by tests/test_ops.py, test_bad_input.py, test_fuzz.py,
test_determinism.py, test_cuda.py and conftest.py (pytest puts tests/ on sys.path)."""
from __future__ import annotations

import math
import os

import pytest
import torch

import qgoft
from qgoft import layouts
from qgoft import ops as qops
from qgoft import reference as ref

I32 = torch.int32
F64 = torch.float64
# The op variants under test: the two ops, each with and without a scale. ``qgoft_scaled`` (blocks with a
# scale) is an op-level combination only; qgoft.nn.Linear offers goft, goft_scaled and qgoft.
OP_VARIANTS = ["goft", "goft_scaled", "qgoft", "qgoft_scaled"]


def is_quasi(method: str) -> bool:
    return method.startswith("qgoft")


def has_scale(method: str) -> bool:
    return method.endswith("_scaled")


# ------------------------------------------------------------------------------------------------
# Devices.
# ------------------------------------------------------------------------------------------------

def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be tested here, or None when they can."""
    if not qgoft.extension_loaded():
        return f"compiled extension not loaded ({qgoft._extension.extension_error()})"
    if not qgoft.build_info().get("cuda_compiled"):
        return "qgoft was built without its CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def cuda_required() -> bool:
    """``QGOFT_REQUIRE_CUDA=1`` (set by the GPU check script): CUDA tests fail instead of skipping."""
    return os.environ.get("QGOFT_REQUIRE_CUDA", "0") == "1"


def require_cuda_or_skip() -> None:
    """Skip the calling test when the CUDA kernels cannot be tested (fail under QGOFT_REQUIRE_CUDA=1)."""
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    if cuda_required():
        pytest.fail(f"QGOFT_REQUIRE_CUDA=1 but the CUDA backend cannot be tested: {reason}", pytrace=False)
    pytest.skip(f"CUDA backend not testable: {reason}")


def to_device(values, device):
    """``values`` (a tuple or list) with every tensor moved to ``device`` (other values unchanged)."""
    return type(values)(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


def raises_same_on_every_device(device, fn, args, pattern, exc=RuntimeError):
    """``fn(*args)`` with the tensors of ``args`` on ``device`` raises ``exc`` matching ``pattern``; on a device
    other than the CPU, the same call on the CPU raises the same type with the same message (the backends
    refuse the same input with the same words). Returns the exception."""
    with pytest.raises(exc, match=pattern) as info:
        fn(*to_device(args, device))
    if torch.device(device).type != "cpu":
        with pytest.raises(exc) as cpu_info:
            fn(*to_device(args, "cpu"))
        assert type(info.value) is type(cpu_info.value), (type(info.value), type(cpu_info.value))
        assert str(info.value) == str(cpu_info.value), (str(info.value), str(cpu_info.value))
    return info.value


# ------------------------------------------------------------------------------------------------
# Builders.
# ------------------------------------------------------------------------------------------------

def tensors_from_layers(layers, device="cpu"):
    """(pairs (P, 2), layer_offsets (L + 1,)) int32 tensors of a list of layers of (i, j) pairs."""
    flat = [pair for layer in layers for pair in layer]
    offsets = [0]
    for layer in layers:
        offsets.append(offsets[-1] + len(layer))
    return (torch.tensor(flat, dtype=I32).reshape(len(flat), 2).to(device),
            torch.tensor(offsets, dtype=I32).to(device))


def random_custom_pairs(d: int, generator: torch.Generator, num_layers: int = 3):
    """Layers of random disjoint pairs (i < j), NOT sorted inside a layer, leaving indices unused."""
    layers = []
    for _ in range(num_layers):
        perm = torch.randperm(d, generator=generator).tolist()
        count = max(1, d // 3)
        layers.append([tuple(sorted(perm[2 * k:2 * k + 2])) for k in range(count)])
    return layers


def make_layout(kind: str, d: int, device="cpu", generator: torch.Generator | None = None):
    """(pairs int32 (P, 2), layer_offsets int32 (L + 1,)) of a layout kind over d features, on ``device``.
    ``custom`` draws random layers from ``generator`` (default: seeded with 1000 + d)."""
    if kind == "custom":
        generator = generator if generator is not None else torch.Generator().manual_seed(1000 + d)
        return tensors_from_layers(random_custom_pairs(d, generator), device)
    lay = {
        "parallel": layouts.parallel,
        "sequential": layouts.sequential,
        "butterfly": layouts.butterfly,
        "parallel*2": lambda n: layouts.stack(layouts.parallel(n), 2),
        "parallel*3": lambda n: layouts.stack(layouts.parallel(n), 3),
        "butterfly*2": lambda n: layouts.stack(layouts.butterfly(n), 2),
    }[kind](d)
    return lay.pairs_tensor(device).clone(), lay.layer_offsets_tensor(device).clone()


def make_params(method: str, num_pairs: int, d: int, generator: torch.Generator, dtype=F64, device="cpu"):
    """(params, scale or None): angles ~ 1.5 N(0,1), blocks I + 0.5 N(0,1), scale 1 + 0.3 N(0,1) (drawn on the
    CPU in float64, so every device and dtype sees the same values)."""
    if is_quasi(method):
        params = torch.eye(2, dtype=F64) + 0.5 * torch.randn(num_pairs, 2, 2, generator=generator, dtype=F64)
    else:
        params = 1.5 * torch.randn(num_pairs, generator=generator, dtype=F64)
    scale = 1.0 + 0.3 * torch.randn(d, generator=generator, dtype=F64) if has_scale(method) else None
    return (params.to(device=device, dtype=dtype),
            scale.to(device=device, dtype=dtype) if scale is not None else None)


def make_tensor(shape, d: int, kind: str, generator: torch.Generator, dtype=F64, device="cpu"):
    """A (*shape, d) tensor on ``device`` with the memory layout ``kind`` (values ~ N(0, 1), drawn on the CPU;
    the strides are made on ``device``)."""
    full = tuple(shape) + (d,)
    rows = math.prod(shape)

    def randn(*size):
        return torch.randn(*size, generator=generator, dtype=F64).to(device=device, dtype=dtype)

    if kind == "contiguous":
        t = randn(*full)
    elif kind == "transposed":  # stride 1 along the rows, not along d
        if len(shape) == 0:
            t = randn(2 * d)[::2]
        else:
            t = randn(*shape[:-1], d, shape[-1]).transpose(-1, -2)
    elif kind == "row_slice":  # unit stride along d, row stride 2d + 3 > d, storage offset 1 (unaligned)
        t = randn(*shape, 2 * d + 3)[..., 1:d + 1]
    elif kind == "expanded_rows":  # stride 0 between rows
        t = randn(d).expand(full)
    elif kind == "expanded_all":  # stride 0 everywhere
        t = randn(()).expand(full)
    elif kind == "overlapping":  # rows overlap in memory (row stride 1 < d)
        t = randn(rows + d).as_strided((rows, d), (1, 1)).view(full) if rows else randn(*full)
    else:
        raise AssertionError(kind)
    assert t.shape == full
    if kind != "contiguous" and rows > 1:
        assert not t.is_contiguous()
    return t


# ------------------------------------------------------------------------------------------------
# The ops under test, dispatched by variant.
# ------------------------------------------------------------------------------------------------

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
