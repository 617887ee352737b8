"""Property-based tests (hypothesis) against the float64 reference.

Drawn: the method (goft, goft_scaled, qgoft, qgoft_scaled), the layout (parallel, sequential, butterfly,
stacked ones, random valid custom layouts with unsorted pairs and empty layers), d, leading shapes (zero
rows included), memory layouts of x and of the incoming gradient (transposed, strided along d, padded rows,
expanded, permuted, overlapping rows), dtypes (float64, float32, bfloat16, float16; float32 parameters with
float64 x), which inputs require grad, the CPU kernel variant and the thread count. Forward and backward
(through autograd) are compared with the float64 reference evaluated on the same (rounded) values. Each test
runs on every device (the ``device`` fixture of tests/conftest.py: "cpu", and "cuda" with a GPU; the CPU
kernel variant and thread count drawn only matter on the CPU).

Profiles (registered here, selected by environment variables):

* ``ci`` (default): derandomized (the same examples every run), no example database, bounded example counts;
  the whole file takes one to two minutes on a busy 2-core machine.
* ``thorough``: ``QGOFT_FUZZ_EXAMPLES=N`` runs N examples per test with fresh random seeds (e.g. 2000;
  ``QGOFT_FUZZ_PROFILE=thorough`` alone gives 1000).

Tolerances (``M`` = largest magnitude of x and of the result, ``L`` = number of layers): float64 math within
``4 * 2^-52 * (L + 2) * M`` (about 1e-13 relative), float32 math within ``4 * 2^-23 * (L + 2) * M``, bfloat16 /
float16 results within one unit in the last place of the true value plus that float32 term, and never more
than twice the error of the reference computing in the activation dtype itself. Parameter gradients are
reductions over the rows: within ``4 * eps * (L + 2 + log2 rows) * rows * max|x| * max|g| * 8``.
"""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qgoft  # noqa: E402
from qgoft import layouts  # noqa: E402
from qgoft import ops as qops  # noqa: E402
from qgoft import reference as ref  # noqa: E402
from qgoft.nn import Linear  # noqa: E402
from chain_helpers import I32, OP_VARIANTS, has_scale, is_quasi, tensors_from_layers  # noqa: E402

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# ------------------------------------------------------------------------------------------------
# Profiles.
# ------------------------------------------------------------------------------------------------

# function_scoped_fixture: the only fixture the tests take is ``device``, a constant string.
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
_THOROUGH_EXAMPLES = int(os.environ.get("QGOFT_FUZZ_EXAMPLES", "1000") or 1000)
settings.register_profile("thorough", max_examples=_THOROUGH_EXAMPLES, derandomize=False, **_COMMON)
PROFILE = os.environ.get("QGOFT_FUZZ_PROFILE") or ("thorough" if os.environ.get("QGOFT_FUZZ_EXAMPLES") else "ci")
FUZZ = settings.get_profile(PROFILE)


def fuzz_settings(ci_examples: int) -> settings:
    """The profile, with ``ci_examples`` examples in CI (the thorough profile keeps its own count)."""
    if PROFILE == "ci":
        return settings(FUZZ, max_examples=ci_examples)
    return FUZZ


# ------------------------------------------------------------------------------------------------
# Strategies.
# ------------------------------------------------------------------------------------------------

def random_layers(d: int, num_layers: int, gen: torch.Generator, fill: float, empty_ok: bool):
    """Layers of random disjoint pairs (i < j), pairs in random order inside a layer, some indices unused."""
    layers = []
    for _ in range(num_layers):
        perm = torch.randperm(d, generator=gen).tolist()
        count = int(round(fill * (d // 2)))
        count = max(0 if empty_ok else 1, min(d // 2, count))
        layers.append([tuple(sorted(perm[2 * k:2 * k + 2])) for k in range(count)])
    return layers


@st.composite
def layout_strategy(draw, max_d=300):
    """(kind, d, pairs, offsets, num_layers)."""
    kind = draw(st.sampled_from(["parallel", "sequential", "butterfly", "parallel*2", "butterfly*3", "custom",
                                 "custom_empty_layers"]))
    if kind == "sequential":  # d - 1 layers: the reference is slow for large d
        d = draw(st.integers(2, 48))
    else:
        d = draw(st.one_of(st.integers(2, 20), st.integers(21, max_d), st.sampled_from([32, 64, 128, 256])))
    if kind.startswith("custom"):
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        num_layers = draw(st.integers(1, 5))
        fill = draw(st.sampled_from([0.2, 0.6, 1.0]))
        layers = random_layers(d, num_layers, gen, fill, empty_ok=kind == "custom_empty_layers")
        pairs, offsets = tensors_from_layers(layers)
        return kind, d, pairs, offsets, num_layers
    base, _, times = kind.partition("*")
    lay = {"parallel": layouts.parallel, "sequential": layouts.sequential, "butterfly": layouts.butterfly}[base](d)
    lay = layouts.stack(lay, int(times or 1))
    return kind, d, lay.pairs_tensor().clone(), lay.layer_offsets_tensor().clone(), lay.num_layers


MEMORY_KINDS = ["contiguous", "transposed", "d_strided", "row_padded", "expanded", "permuted", "overlapping"]


def make_strided(lead, d, kind, gen, dtype, device="cpu"):
    """A (*lead, d) tensor on ``device`` of N(0, 1) values (rounded to ``dtype``) with the memory layout
    ``kind`` (values drawn on the CPU, strides made on ``device``)."""
    full = tuple(lead) + (d,)
    rows = math.prod(lead)

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=F64).to(device=device, dtype=dtype)

    if kind == "transposed" and len(lead) >= 1:
        t = randn(*lead[:-1], d, lead[-1]).transpose(-1, -2)
    elif kind == "d_strided":
        t = randn(*lead, 2 * d)[..., ::2]
    elif kind == "row_padded":
        t = randn(*lead, d + 3)[..., 1:d + 1]
    elif kind == "expanded":
        t = randn(d).expand(full)
    elif kind == "permuted" and len(lead) >= 2:
        t = randn(lead[1], lead[0], *lead[2:], d).transpose(0, 1)
    elif kind == "overlapping" and rows > 0:
        t = randn(rows + d).as_strided((rows, d), (1, 1)).reshape(full) if rows > 1 else randn(*full)
    else:
        t = randn(*full)
    assert t.shape == full
    return t


@st.composite
def case_strategy(draw):
    kind, d, pairs, offsets, num_layers = draw(layout_strategy())
    method = draw(st.sampled_from(OP_VARIANTS))
    dtype = draw(st.sampled_from([F64, F32, BF16, F16]))
    params_dtype = F64 if dtype == F64 and draw(st.booleans()) else F32
    lead = draw(st.lists(st.integers(0, 7), min_size=0, max_size=3))
    if math.prod(lead) * d > 20000 or math.prod(lead) > 300:
        lead = lead[:1]
    if draw(st.integers(0, 9)) == 0:  # sometimes many rows: several tiles and reduction chunks
        lead = [draw(st.integers(60, 700))]
        assume(lead[0] * d <= 60000)
    x_kind = draw(st.sampled_from(MEMORY_KINDS))
    g_kind = draw(st.sampled_from(MEMORY_KINDS))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    sigma = draw(st.sampled_from([0.0, 0.2, 1.0]))
    angle_scale = draw(st.sampled_from([0.0, 1.5, 20.0]))
    requires = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    isa = draw(st.sampled_from(["generic", "avx2", "avx512"]))
    threads = draw(st.sampled_from([1, 2]))
    return dict(kind=kind, d=d, pairs=pairs, offsets=offsets, num_layers=num_layers, method=method, dtype=dtype,
                params_dtype=params_dtype, lead=tuple(lead), x_kind=x_kind, g_kind=g_kind, seed=seed,
                sigma=sigma, angle_scale=angle_scale, requires=requires, isa=isa, threads=threads)


def make_params(case, gen, device="cpu"):
    """Angles ~ angle_scale * N(0, 1); blocks = rotation + (sigma / L) N(0, 1) (bounded growth over all layers,
    so float16 never overflows); scale 1 + 0.3 N(0, 1)."""
    num_pairs, d, num_layers = case["pairs"].shape[0], case["d"], max(1, case["num_layers"])
    theta = case["angle_scale"] * torch.randn(num_pairs, generator=gen, dtype=F64)
    if is_quasi(case["method"]):
        params = ref.blocks_from_angles(theta) + case["sigma"] / num_layers * torch.randn(
            num_pairs, 2, 2, generator=gen, dtype=F64)
    else:
        params = theta
    scale = 1.0 + 0.3 * torch.randn(d, generator=gen, dtype=F64) if has_scale(case["method"]) else None
    pd = case["params_dtype"]
    return params.to(device=device, dtype=pd), None if scale is None else scale.to(device=device, dtype=pd)


# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------

class cpu_variant:
    """Select a CPU kernel variant and a thread count for a block; restore both afterwards."""

    def __init__(self, isa: str, threads: int):
        self.isa, self.threads = isa, threads

    def __enter__(self):
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.isa_before = None
        if qgoft.extension_loaded():
            c = qgoft._extension._C
            self.isa_before = c.build_info()["cpu_isa_selected"]
            if not c.set_cpu_isa(self.isa):
                c.set_cpu_isa(self.isa_before)
        return self

    def __exit__(self, *exc):
        if self.isa_before is not None:
            assert qgoft._extension._C.set_cpu_isa(self.isa_before)
        torch.set_num_threads(self.threads_before)


def chain_fn(method):
    return qops.quasi_givens_chain if is_quasi(method) else qops.givens_chain


def ref_fn(method):
    return ref.quasi_givens_chain_reference if is_quasi(method) else ref.givens_chain_reference


def eps(dtype):
    return torch.finfo(dtype).eps


def max_abs(*tensors):
    return max([t.detach().abs().max().item() if t.numel() else 0.0 for t in tensors if t is not None] + [0.0])


def check_close(name, got, want, bound):
    """``|got - want| <= bound`` elementwise (bound: scalar or tensor), NaN nowhere."""
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - want.double()).abs()
    excess = err - bound
    worst = excess.max().item()
    assert worst <= 0, f"{name}: error {err.max().item():.3g} exceeds the bound by {worst:.3g}"


# ------------------------------------------------------------------------------------------------
# 1. Forward and backward against the float64 reference.
# ------------------------------------------------------------------------------------------------

@fuzz_settings(1000)
@given(case=case_strategy())
def test_chain_matches_float64_reference(device, case):
    note({k: v for k, v in case.items() if k not in ("pairs", "offsets")})
    method, dtype, d, lead = case["method"], case["dtype"], case["d"], case["lead"]
    pairs, offsets = case["pairs"].to(device), case["offsets"].to(device)
    gen = torch.Generator().manual_seed(case["seed"])
    params, scale = make_params(case, gen, device)
    x = make_strided(lead, d, case["x_kind"], gen, dtype, device)
    g = make_strided(lead, d, case["g_kind"], gen, dtype, device)
    rows = math.prod(lead)
    layers = offsets.numel() - 1

    # the float64 truth on the same (rounded) values
    x64 = x.detach().double().requires_grad_()
    p64 = params.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_() if scale is not None else None
    leaves64 = [x64, p64] + ([s64] if s64 is not None else [])
    with cpu_variant("avx2", 1):  # the reference's own elementwise ops gain nothing from threads
        truth = ref_fn(method)(x64, p64, pairs, offsets, s64)
        truth_grads = torch.autograd.grad(truth, leaves64, g.double(), materialize_grads=True)
        truth = truth.detach()

    # the op under test, through autograd, with the drawn inputs requiring grad
    need_x, need_p, need_s = case["requires"]
    need_s = need_s and scale is not None
    xl = x.detach().requires_grad_(need_x)   # detach keeps sizes, strides and storage offset
    pl = params.detach().clone().requires_grad_(need_p)
    sl = scale.detach().clone().requires_grad_(need_s) if scale is not None else None
    with cpu_variant(case["isa"], case["threads"]):
        out = chain_fn(method)(xl, pl, pairs, offsets, sl)
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
        assert out.requires_grad == (need_x or need_p or need_s)
        leaves = [t for t, n in ((xl, need_x), (pl, need_p), (sl, need_s)) if n]
        grads = torch.autograd.grad(out, leaves, g, materialize_grads=True) if leaves else ()

    # bounds
    low = dtype in (BF16, F16)
    eps_c = eps(F64) if dtype == F64 else eps(F32)
    depth = layers + 2
    magnitude = max(max_abs(x, truth), 1e-30) * 8.0  # intermediate values: growth over all layers <= e^2
    elementwise = 4.0 * eps_c * depth * magnitude
    if low:
        bound = eps(dtype) * truth.abs() + elementwise
        # and at most twice the error of the same chain computed in the activation dtype itself
        same = ref_fn(method)(x, params.to(F32), pairs, offsets, None if scale is None else scale.to(F32),
                              compute_dtype=dtype)
        err_same = (same.double() - truth).abs().max().item() if truth.numel() else 0.0
        err = (out.detach().double() - truth).abs().max().item() if truth.numel() else 0.0
        assert err <= 2.0 * err_same + elementwise, (err, err_same)
    else:
        bound = elementwise
    check_close("out", out.detach(), truth, bound)

    want = dict(zip(["x", "params", "scale"], truth_grads))
    got = dict(zip([n for n, need in (("x", need_x), ("params", need_p), ("scale", need_s)) if need], grads))
    if "x" in got:
        gx = got["x"]
        assert gx.dtype == dtype and gx.shape == x.shape
        g_magnitude = max(max_abs(g, want["x"]), 1e-30) * 8.0
        gx_bound = 4.0 * eps_c * depth * g_magnitude
        if low:
            gx_bound = eps(dtype) * want["x"].abs() + gx_bound
        check_close("grad_x", gx, want["x"], gx_bound)
    reduction = rows * max(max_abs(x), 1e-30) * max(max_abs(g), 1e-30) * 64.0
    eps_p = eps(F64) if params.dtype == F64 and dtype == F64 else eps(F32)
    red_bound = 4.0 * eps_p * (depth + math.log2(rows + 1)) * reduction
    for name in ("params", "scale"):
        if name in got:
            param = params if name == "params" else scale
            assert got[name].dtype == param.dtype and got[name].shape == param.shape, name
            if rows == 0:
                assert torch.equal(got[name], torch.zeros_like(param)), f"grad {name}: not zero for zero rows"
            check_close(f"grad_{name}", got[name], want[name], red_bound)


# ------------------------------------------------------------------------------------------------
# 2. The compiled ops and the reference accept and refuse the same layouts, with the same words.
# ------------------------------------------------------------------------------------------------

def _message(err: Exception) -> str:
    """The message without the op prefix and without the backend-specific hint after the bound."""
    text = str(err).splitlines()[0]
    text = text.split(": ", 1)[1] if ": " in text else text
    return re.sub(r" \(d = x\.(size\(-1\)|shape\[-1\]).*$", "", text)


@st.composite
def messy_layout(draw):
    d = draw(st.integers(1, 12))
    num_pairs = draw(st.integers(0, 8))
    low = draw(st.sampled_from([0, -2]))
    high = draw(st.sampled_from([d - 1, d + 2]))
    pairs = draw(st.lists(st.tuples(st.integers(low, max(low, high)), st.integers(low, max(low, high))),
                          min_size=num_pairs, max_size=num_pairs))
    cuts = sorted(draw(st.lists(st.integers(0, num_pairs), min_size=0, max_size=4)))
    offsets = [0] + cuts + [num_pairs]
    if draw(st.integers(0, 4)) == 0:  # sometimes break the offsets too
        k = draw(st.integers(0, len(offsets) - 1))
        offsets[k] = draw(st.integers(-1, num_pairs + 2))
    return d, pairs, offsets


@pytest.mark.skipif(not qgoft.extension_loaded(), reason="compiled extension not loaded")
@fuzz_settings(600)
@given(layout=messy_layout(), quasi=st.booleans())
def test_kernel_and_reference_agree_on_layout_validation(device, layout, quasi):
    d, pair_list, offset_list = layout
    pairs = torch.tensor(pair_list, dtype=I32).reshape(-1, 2).to(device)
    offsets = torch.tensor(offset_list, dtype=I32).to(device)
    num_pairs = pairs.shape[0]
    gen = torch.Generator().manual_seed(d * 100 + num_pairs)
    x = torch.randn(3, d, generator=gen, dtype=F64).to(device)
    params = (torch.eye(2, dtype=F64) + 0.3 * torch.randn(num_pairs, 2, 2, generator=gen, dtype=F64) if quasi
              else torch.randn(num_pairs, generator=gen, dtype=F64)).to(device)
    kernel = torch.ops.qgoft.quasi_givens_chain if quasi else torch.ops.qgoft.givens_chain
    reference = ref.quasi_givens_chain_reference if quasi else ref.givens_chain_reference
    results = []
    for fn in (kernel, reference):
        try:
            results.append(("ok", fn(x, params, pairs, offsets, None)))
        except RuntimeError as err:  # the reference's InputError is a RuntimeError too
            results.append(("error", _message(err)))
    (kind_k, k), (kind_r, r) = results
    assert kind_k == kind_r, f"kernel {kind_k} ({k if kind_k == 'error' else ''}), reference {kind_r} ({r})"
    if kind_k == "error":
        assert k == r
    else:
        torch.testing.assert_close(k, r, rtol=1e-12, atol=1e-12)
        # a layout both accept is a valid one: the Layout API agrees (empty layers aside, which it refuses)
        layers = [pair_list[a:b] for a, b in zip(offset_list, offset_list[1:])]
        if d >= 2 and layers and all(layers):
            layouts.custom(d, layers)


# ------------------------------------------------------------------------------------------------
# 3. qgoft.nn.Linear: forward against the dense float64 formula, merge == forward, unmerge is bitwise.
# ------------------------------------------------------------------------------------------------

@fuzz_settings(300)
@given(method=st.sampled_from(["goft", "goft_scaled", "qgoft"]),
       d=st.integers(2, 70), n=st.integers(1, 20), bias=st.booleans(),
       spec=st.sampled_from(["parallel", "sequential", "butterfly", "custom"]), stack=st.integers(1, 3),
       lead=st.lists(st.integers(0, 4), max_size=3), seed=st.integers(0, 2 ** 31 - 1))
def test_linear_matches_dense_formula_and_merges(device, method, d, n, bias, spec, stack, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    if spec == "custom":
        spec = random_layers(d, 3, gen, 0.7, empty_ok=False)
    layer = Linear(d, n, bias=bias, method=method, layout=spec, stack=stack, dtype=F64, adapter_dtype=F64)
    with torch.no_grad():
        for param in layer.adapter_parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=gen, dtype=F64))
    layer = layer.to(device)
    x = torch.randn(*lead, d, generator=gen, dtype=F64).to(device)
    R = layer.rotation_matrix()
    s = layer.givens_scale if layer.givens_scale is not None else torch.ones(d, dtype=F64, device=device)
    want = torch.nn.functional.linear((x @ R) * s, layer.weight, layer.bias)
    y = layer(x)
    torch.testing.assert_close(y, want.detach(), rtol=1e-10, atol=1e-10)
    original = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y.detach(), rtol=1e-10, atol=1e-10)
    layer.unmerge()
    assert torch.equal(layer.weight, original)
    assert torch.equal(layer(x), y)
