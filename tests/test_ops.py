"""Op-level tests of the compiled ``torch.ops.qgoft.*`` ops (and the thin ``qgoft.ops`` layer).

Every result is compared with an independent computation: the pure-PyTorch reference
(``qgoft.reference``, vectorised per layer, differentiated by PyTorch's autograd), dense matrices built
pair by pair, explicit inner products, or exact (bitwise) expectations. Everything is seeded.

Devices: every test takes ``device`` ("cpu", "cuda") or ``backend`` (each CPU kernel variant, "cuda") from
tests/conftest.py; the CUDA cases skip without a GPU. Inputs are drawn on the CPU and built (strides included)
on the device, so both backends see the same values. tests/test_cuda.py has what only CUDA has (kernel paths,
the layout cache, streams, graphs).

Conventions (docs/CONTRACT.md): rows of x map to ``x' = s * (R^T x)``; ``pairs`` int32 (P, 2),
``layer_offsets`` int32 (L + 1,); angles (P,) or blocks (P, 2, 2); optional scale (d,).
"""
from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

import qgoft
from qgoft import layouts
from qgoft import ops as qops
from qgoft import reference as ref
from chain_helpers import (I32, OP_VARIANTS, has_scale, is_quasi, kernel_backward, kernel_chain,  # noqa: E402
                           make_layout, make_params, make_tensor, raises_same_on_every_device, random_custom_pairs,
                           ref_adjoint, ref_chain, tensors_from_layers)

pytestmark = pytest.mark.skipif(not qgoft.extension_loaded(),
                                reason="compiled extension not loaded (QGOFT_ALLOW_FALLBACK=1)")

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
TIGHT = dict(rtol=1e-10, atol=1e-10)

LAYOUT_KINDS = ["parallel", "sequential", "butterfly", "parallel*2", "custom"]
SMALL_DS = [2, 3, 5, 8, 13, 64, 100]
# (leading shape, x kind, grad kind): rows 1, 7, 15, 24, 37 and 65 -- none but 24 a multiple of a tile
# height (8 or 32 rows), several spanning more than one tile.
CASES = [
    ((), "contiguous", "contiguous"),
    ((7,), "row_slice", "expanded_rows"),
    ((3, 5), "transposed", "contiguous"),
    ((2, 3, 4), "contiguous", "transposed"),
    ((37,), "expanded_rows", "row_slice"),
    ((5, 13), "overlapping", "expanded_all"),
]


def op():
    return torch.ops.qgoft


# ------------------------------------------------------------------------------------------------
# The ops under test and their references.
# ------------------------------------------------------------------------------------------------

def ops_adjoint(method, g, params, pairs, offsets, scale=None):
    fn = qops.quasi_givens_chain_adjoint if is_quasi(method) else qops.givens_chain_adjoint
    return fn(g, params, pairs, offsets, scale)


def value_and_grads(fn, method, x, params, pairs, offsets, scale, g):
    """Run ``fn`` on leaves with the given values/strides; return (out, grad_x, grad_params, grad_scale)."""
    x = x.detach().requires_grad_()  # detach keeps sizes, strides and storage offset
    params = params.detach().clone().requires_grad_()
    leaves = [x, params]
    if scale is not None:
        scale = scale.detach().clone().requires_grad_()
        leaves.append(scale)
    out = fn(method, x, params, pairs, offsets, scale)
    grads = torch.autograd.grad(out, leaves, g, materialize_grads=True)  # P = 0: params unused
    return (out.detach(),) + tuple(grads) + ((None,) if scale is None else ())


@contextlib.contextmanager
def single_thread():
    """For the reference: PyTorch's own OpenMP-parallel elementwise ops are slow on a busy 2-core machine.
    The kernels keep the session's thread count (test_backward_is_deterministic compares 1 vs 2)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_against_reference(method, x, params, pairs, offsets, scale, g, **tol):
    tol = tol or TIGHT
    got = value_and_grads(kernel_chain, method, x, params, pairs, offsets, scale, g)
    with single_thread():
        want = value_and_grads(ref_chain, method, x.contiguous(), params, pairs, offsets, scale, g.contiguous())
    out = got[0]
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    for name, a, b in zip(["out", "grad_x", "grad_params", "grad_scale"], got, want):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    return got


# ------------------------------------------------------------------------------------------------
# 1. Forward and backward against the reference in float64.
# ------------------------------------------------------------------------------------------------

def _grid():
    """(d, layout kind, indices into CASES or None): for small d every case over the methods; for large d two
    cases (one with few rows for sequential, whose d - 1 layers make the reference slow); only parallel at
    d = 4096."""
    for d in SMALL_DS:
        for kind in LAYOUT_KINDS:
            yield d, kind, None
    for d, case_ids in ((768, (2, 5)), (1000, (1, 4))):
        for kind in LAYOUT_KINDS:
            yield d, kind, (1,) if kind == "sequential" else case_ids
    yield 4096, "parallel", (1, 2)


@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("d,kind,case_ids", [pytest.param(*g, id=f"d{g[0]}-{g[1]}") for g in _grid()])
def test_chain_matches_reference(backend, method, d, kind, case_ids):
    gen = torch.Generator().manual_seed(d * 31 + LAYOUT_KINDS.index(kind))
    pairs, offsets = make_layout(kind, d, backend)
    params, scale = make_params(method, pairs.shape[0], d, gen, device=backend)
    if case_ids is None:  # small d: half of CASES per method, all of them over the four methods
        m, half = OP_VARIANTS.index(method), len(CASES) // 2
        first = half * ((m + m // 2) % 2)  # goft, qgoft_scaled: first half; goft_scaled, qgoft: second
        case_ids = range(first, first + half)
    for shape, x_kind, g_kind in (CASES[k] for k in case_ids):
        x = make_tensor(shape, d, x_kind, gen, device=backend)
        g = make_tensor(shape, d, g_kind, gen, device=backend)
        check_against_reference(method, x, params, pairs, offsets, scale, g)


@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("d", [37, 300])  # float64 tiles: taller for small d, single-vector beyond
def test_rows_around_tile_and_chunk_boundaries(cpu_isa, tile_rows, method, d):
    """Row counts just below/above multiples of the tile height, and enough rows for several reduction
    chunks (the parameter gradient is reduced per chunk of tiles, then across chunks)."""
    tile = tile_rows(d, "float64")
    gen = torch.Generator().manual_seed(5)
    pairs, offsets = make_layout("custom", d)
    params, scale = make_params(method, pairs.shape[0], d, gen)
    for rows in (1, tile - 1, tile, tile + 1, 3 * tile + 5, 70 * tile + 3):
        x = make_tensor((rows,), d, "row_slice", gen)
        g = make_tensor((rows,), d, "contiguous", gen)
        check_against_reference(method, x, params, pairs, offsets, scale, g)


@pytest.mark.parametrize("method", ["goft", "qgoft_scaled"])
def test_python_op_layer_matches_reference(device, method):
    """qgoft.ops.* (the functions the package calls) run the compiled op and match the reference."""
    d = 13
    gen = torch.Generator().manual_seed(2)
    pairs, offsets = make_layout("parallel", d, device)
    params, scale = make_params(method, pairs.shape[0], d, gen, device=device)
    x = make_tensor((3, 4), d, "contiguous", gen, device=device)
    g = make_tensor((3, 4), d, "contiguous", gen, device=device)
    assert qops.uses_compiled_kernel(x)
    fn = qops.quasi_givens_chain if is_quasi(method) else qops.givens_chain
    got = value_and_grads(lambda m, *a: fn(*a), method, x, params, pairs, offsets, scale, g)
    want = value_and_grads(ref_chain, method, x, params, pairs, offsets, scale, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("method", ["goft_scaled", "qgoft_scaled"])
def test_autograd_with_partial_requires_grad(device, method):
    """Only some inputs require grad: the autograd formula asks the backward op for a subset of outputs
    (e.g. only grad x: the adjoint path that does not read x) and returns None for the others."""
    d = 21
    gen = torch.Generator().manual_seed(21)
    pairs, offsets = make_layout("custom", d, device)
    params, scale = make_params(method, pairs.shape[0], d, gen, device=device)
    x = make_tensor((40,), d, "contiguous", gen, device=device)
    g = make_tensor((40,), d, "contiguous", gen, device=device)
    want = value_and_grads(ref_chain, method, x, params, pairs, offsets, scale, g)[1:]
    fn = op().quasi_givens_chain if is_quasi(method) else op().givens_chain
    for need in itertools.product([False, True], repeat=3):
        if not any(need):
            continue
        leaves = [t.detach().clone().requires_grad_(n) for t, n in zip((x, params, scale), need)]
        out = fn(leaves[0], leaves[1], pairs, offsets, leaves[2])
        out.backward(g)
        for leaf, n, w in zip(leaves, need, want):
            if n:
                torch.testing.assert_close(leaf.grad, w, **TIGHT)
            else:
                assert leaf.grad is None


def test_pair_order_inside_a_layer_is_irrelevant(device):
    """Pairs of one layer are disjoint, so any order inside a layer gives the same result."""
    d = 50
    gen = torch.Generator().manual_seed(3)
    layers = random_custom_pairs(d, gen)
    pairs, offsets = tensors_from_layers(layers, device)
    shuffled = []
    perm_all = []
    for r, layer in enumerate(layers):
        perm = torch.randperm(len(layer), generator=gen).tolist()
        shuffled.append([layer[k] for k in perm])
        perm_all += [int(offsets[r]) + k for k in perm]
    pairs2, offsets2 = tensors_from_layers(shuffled, device)
    params, scale = make_params("qgoft_scaled", pairs.shape[0], d, gen, device=device)
    x = make_tensor((9,), d, "contiguous", gen, device=device)
    a = kernel_chain("qgoft", x, params, pairs, offsets, scale)
    b = kernel_chain("qgoft", x, params[perm_all], pairs2, offsets2, scale)
    torch.testing.assert_close(a, b, **TIGHT)


def test_input_is_not_modified(device):
    d = 64
    gen = torch.Generator().manual_seed(4)
    pairs, offsets = make_layout("parallel", d, device)
    params, scale = make_params("qgoft_scaled", pairs.shape[0], d, gen, dtype=F32, device=device)
    x = make_tensor((20,), d, "contiguous", gen, dtype=F32, device=device)
    g = make_tensor((20,), d, "contiguous", gen, dtype=F32, device=device)
    copies = [t.clone() for t in (x, g, params, scale, pairs, offsets)]
    kernel_chain("qgoft", x, params, pairs, offsets, scale)
    kernel_backward("qgoft", g, x, params, pairs, offsets, scale, [True, True, True])
    kernel_backward("qgoft", g, x, params, pairs, offsets, scale, [True, False, False])
    for a, b in zip((x, g, params, scale, pairs, offsets), copies):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# 2. The adjoint.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("kind,d", [("parallel", 13), ("sequential", 8), ("butterfly", 64),
                                    ("parallel*2", 100), ("custom", 768)])
def test_adjoint(backend, method, kind, d):
    gen = torch.Generator().manual_seed(d)
    pairs, offsets = make_layout(kind, d, backend)
    params, scale = make_params(method, pairs.shape[0], d, gen, device=backend)
    x = make_tensor((3, 7), d, "contiguous", gen, device=backend)
    g = make_tensor((3, 7), d, "row_slice", gen, device=backend)
    adj = ops_adjoint(method, g, params, pairs, offsets, scale)
    assert adj.shape == g.shape and adj.dtype == g.dtype
    # <chain(x), g> == <x, adjoint(g)>
    lhs = (kernel_chain(method, x, params, pairs, offsets, scale) * g).sum()
    rhs = (x * adj).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    # equality with the reference adjoint
    torch.testing.assert_close(adj, ref_adjoint(method, g, params, pairs, offsets, scale), **TIGHT)
    # and with the grad_x of the full backward (same math; bitwise on the CPU, where both run the same code;
    # on CUDA the adjoint is a kernel of its own, without the tape)
    full = kernel_backward(method, g, x, params, pairs, offsets, scale, [True, True, True])[0]
    torch.testing.assert_close(adj, full, **(dict(rtol=0, atol=0) if backend == "cpu" else TIGHT))


@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16])
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_adjoint_does_not_read_x(backend, method, dtype):
    d = 29
    gen = torch.Generator().manual_seed(6)
    pairs, offsets = make_layout("parallel*2", d, backend)
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F64 if dtype == F64 else F32, device=backend)
    g = make_tensor((45,), d, "contiguous", gen, dtype=dtype, device=backend)
    x_nan = torch.full((45, d), float("nan"), dtype=dtype, device=backend)
    gx, gp, gs = kernel_backward(method, g, x_nan, params, pairs, offsets, scale, [True, False, False])
    assert torch.isfinite(gx).all()
    assert gp.shape == (0,) and gs.shape == (0,)
    want = ref_adjoint(method, g, params, pairs, offsets, scale)
    torch.testing.assert_close(ops_adjoint(method, g, params, pairs, offsets, scale), gx, rtol=0, atol=0)
    if dtype in (F32, F64):
        torch.testing.assert_close(gx, want, **(TIGHT if dtype == F64 else {}))
    else:
        torch.testing.assert_close(gx.float(), want.float(), rtol=2 ** -7, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# 3. output_mask.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_output_mask_subsets(backend, method, dtype):
    d = 100
    gen = torch.Generator().manual_seed(7)
    pairs, offsets = make_layout("parallel", d, backend)
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F32, device=backend)
    x = make_tensor((300,), d, "contiguous", gen, dtype=dtype, device=backend)
    g = make_tensor((300,), d, "contiguous", gen, dtype=dtype, device=backend)
    full = kernel_backward(method, g, x, params, pairs, offsets, scale, [True, True, True])
    assert full[0].shape == x.shape and full[0].dtype == dtype
    assert full[1].shape == params.shape and full[1].dtype == F32
    if scale is None:
        assert full[2].shape == (0,)
    else:
        assert full[2].shape == (d,) and full[2].dtype == F32
    for mask in itertools.product([False, True], repeat=3):
        outs = kernel_backward(method, g, x, params, pairs, offsets, scale, mask)
        assert len(outs) == 3
        for k, (want, got) in enumerate(zip(full, outs)):
            if mask[k] and want.numel() > 0 and k == 0 and backend != "cpu":
                # CUDA: grad_x without parameter gradients comes from another kernel (no tape), which may
                # round differently; the CPU runs the same code for every mask
                tol = 2 ** -7 if dtype == BF16 else 1e-5
                torch.testing.assert_close(got.float(), want.float(), rtol=tol,
                                           atol=tol * want.float().abs().max().item())
            elif mask[k] and want.numel() > 0:
                assert torch.equal(got, want), f"mask {mask}: output {k} differs from the full backward"
            else:
                assert got.shape == (0,), f"mask {mask}: output {k} should be empty, got {tuple(got.shape)}"


# ------------------------------------------------------------------------------------------------
# 4. gradcheck and opcheck.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("kind,d", [("parallel", 5), ("custom", 8), ("sequential", 4)])
def test_gradcheck(device, method, kind, d):
    gen = torch.Generator().manual_seed(8)
    pairs, offsets = make_layout(kind, d, device)
    params, scale = make_params(method, pairs.shape[0], d, gen, device=device)
    x = make_tensor((3,), d, "contiguous", gen, device=device).requires_grad_()
    params.requires_grad_()
    fn = qops.quasi_givens_chain if is_quasi(method) else qops.givens_chain
    assert qops.uses_compiled_kernel(x)
    if scale is None:
        inputs = (x, params)
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, pairs, offsets), inputs)
    else:
        scale.requires_grad_()
        inputs = (x, params, scale)
        assert torch.autograd.gradcheck(lambda a, b, s: fn(a, b, pairs, offsets, s), inputs)


def _opcheck_args(method, with_scale, requires_grad, device):
    d = 6
    gen = torch.Generator().manual_seed(9)
    pairs, offsets = make_layout("parallel", d, device)
    params, scale = make_params(method + ("_scaled" if with_scale else ""), pairs.shape[0], d, gen, device=device)
    x = make_tensor((2, 3), d, "contiguous", gen, device=device)
    g = make_tensor((2, 3), d, "contiguous", gen, device=device)
    if requires_grad:
        x.requires_grad_()
        params.requires_grad_()
        if scale is not None:
            scale.requires_grad_()
    return g, x, params, pairs, offsets, scale


@pytest.mark.parametrize("suffix", ["", "_with_tops"])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_opcheck_forward(device, method, with_scale, suffix):
    """The forward, and the forward that also returns the backward's segment tops (a data-dependent column count in
    its fake kernel)."""
    g, x, params, pairs, offsets, scale = _opcheck_args(method, with_scale, requires_grad=True, device=device)
    fn = getattr(op(), ("quasi_givens_chain" if is_quasi(method) else "givens_chain") + suffix)
    torch.library.opcheck(fn.default, (x, params, pairs, offsets, scale))


def _opcheck_backward_cases():
    for with_scale in (False, True):
        for mask in itertools.product([False, True], repeat=3):
            bits = "".join(str(int(m)) for m in mask)
            yield pytest.param(with_scale, list(mask), id=f"scale{int(with_scale)}-mask{bits}")


@pytest.mark.parametrize("with_scale,mask", list(_opcheck_backward_cases()))
@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_opcheck_backward(device, method, with_scale, mask):
    g, x, params, pairs, offsets, scale = _opcheck_args(method, with_scale, requires_grad=False, device=device)
    fn = op().quasi_givens_chain_backward if is_quasi(method) else op().givens_chain_backward
    torch.library.opcheck(fn.default, (g, x, params, pairs, offsets, scale, list(mask)))


@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_opcheck_backward_with_tops(device, method):
    g, x, params, pairs, offsets, scale = _opcheck_args(method, True, requires_grad=False, device=device)
    fwd = op().quasi_givens_chain_with_tops if is_quasi(method) else op().givens_chain_with_tops
    tops = fwd(x, params, pairs, offsets, scale)[1]
    fn = op().quasi_givens_chain_backward if is_quasi(method) else op().givens_chain_backward
    torch.library.opcheck(fn.default, (g, x, params, pairs, offsets, scale, [True, True, True], tops))


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_with_tops_forward_and_backward(device, method, dtype):
    """``*_with_tops`` gives the plain forward's output bitwise, and tops (rows, k) in the accumulation dtype on
    x's device (k = 0 where the forward keeps none: always on the CPU, rows of one segment on CUDA); the backward
    given them gives bitwise the results it gives without them."""
    gen = torch.Generator().manual_seed(7)
    d = 40
    pairs, offsets = make_layout("parallel", d, device)
    params, scale = make_params(method, pairs.shape[0], d, gen, device=device)
    x = make_tensor((2, 3), d, "contiguous", gen, device=device).to(dtype)
    g = make_tensor((2, 3), d, "contiguous", gen, device=device).to(dtype)
    if dtype == F64:
        params, scale = params.double(), None if scale is None else scale.double()
    fwd = op().quasi_givens_chain_with_tops if is_quasi(method) else op().givens_chain_with_tops
    y, tops = fwd(x, params, pairs, offsets, scale)
    assert torch.equal(y, kernel_chain(method, x, params, pairs, offsets, scale))
    assert tops.dtype == (F64 if dtype == F64 else F32) and tops.device == x.device
    assert tops.shape == (6, 0)
    for mask in ([True, True, True], [True, False, False], [False, True, False]):
        want = kernel_backward(method, g, x, params, pairs, offsets, scale, mask)
        bwd = op().quasi_givens_chain_backward if is_quasi(method) else op().givens_chain_backward
        got = bwd(g, x, params, pairs, offsets, scale, mask, tops)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_autograd_keeps_the_forwards_tops(device):
    """The public function runs ``*_with_tops`` on CUDA where autograd records the call (its tops saved for the
    backward), the plain op otherwise (no_grad, nothing requiring grad, the CPU, which keeps no tops)."""
    gen = torch.Generator().manual_seed(3)
    pairs, offsets = make_layout("parallel", 16, device)
    angles, _ = make_params("goft", pairs.shape[0], 16, gen, device=device)
    x = make_tensor((5,), 16, "contiguous", gen, device=device)
    y = qops.givens_chain(x, angles.requires_grad_(), pairs, offsets)
    assert ("with_tops" in type(y.grad_fn).__name__) == (x.device.type == "cuda")
    with torch.no_grad():
        assert qops.givens_chain(x, angles, pairs, offsets).grad_fn is None
    assert qops.givens_chain(x, angles.detach(), pairs, offsets).grad_fn is None


@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_backward_outputs_are_fresh_tensors(device, method):
    """Custom-op outputs must be fresh tensors (the schema has no alias annotations), like the fake kernel's."""
    g, x, params, pairs, offsets, scale = _opcheck_args(method, True, requires_grad=False, device=device)
    outs = kernel_backward(method, g, x, params, pairs, offsets, scale, [True, True, True])
    assert len({t.untyped_storage().data_ptr() for t in outs}) == 3, "outputs share storage"
    assert [t.storage_offset() for t in outs] == [0, 0, 0], "outputs are offset views"


# ------------------------------------------------------------------------------------------------
# 5. bfloat16 / float16 activations (float32 parameters).
# ------------------------------------------------------------------------------------------------

def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("kind,d", [("parallel", 64), ("sequential", 24), ("custom", 100)])
def test_low_precision_accuracy(backend, dtype, method, kind, d):
    gen = torch.Generator().manual_seed(10 + d)
    pairs, offsets = make_layout(kind, d, backend)
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F32, device=backend)
    x = make_tensor((3, 41), d, "contiguous", gen, dtype=dtype, device=backend)
    g = make_tensor((3, 41), d, "contiguous", gen, dtype=dtype, device=backend)
    p64 = params.double()
    s64 = scale.double() if scale is not None else None

    # forward: kernel (float32 math) vs float64 truth, against the same math done in `dtype`
    out = kernel_chain(method, x, params, pairs, offsets, scale)
    assert out.dtype == dtype and out.shape == x.shape
    truth = ref_chain(method, x.double(), p64, pairs, offsets, s64)
    low = ref_chain(method, x, params, pairs, offsets, scale, compute_dtype=dtype)
    err, err_low = _max_err(out, truth), _max_err(low, truth)
    assert err <= 2.0 * err_low + 1e-6, (err, err_low)
    # the only rounding left is the final one to `dtype`: within one unit in the last place
    ulp = torch.finfo(dtype).eps
    assert ((out.double() - truth).abs() <= ulp * truth.abs() + 1e-5).all()

    # grad x (the adjoint) the same way
    gx, gp, gs = kernel_backward(method, g, x, params, pairs, offsets, scale, [True, True, True])
    assert gx.dtype == dtype
    truth_gx = ref_adjoint(method, g.double(), p64, pairs, offsets, s64)
    low_gx = ref_adjoint(method, g, params, pairs, offsets, scale, compute_dtype=dtype)
    err, err_low = _max_err(gx, truth_gx), _max_err(low_gx, truth_gx)
    assert err <= 2.0 * err_low + 1e-6, (err, err_low)

    # grad params / scale: float32, close to the float64 gradient of the same (exactly representable) inputs
    x64 = x.double().requires_grad_()
    p_leaf = p64.clone().requires_grad_()
    leaves = [x64, p_leaf]
    if s64 is not None:
        s_leaf = s64.clone().requires_grad_()
        leaves.append(s_leaf)
    want = torch.autograd.grad(ref_chain(method, x64, p_leaf, pairs, offsets,
                                         s_leaf if s64 is not None else None), leaves, g.double())
    assert gp.dtype == F32 and gp.shape == params.shape
    torch.testing.assert_close(gp.double(), want[1], rtol=1e-4, atol=1e-4 * want[1].abs().max().item())
    if scale is not None:
        assert gs.dtype == F32 and gs.shape == (d,)
        torch.testing.assert_close(gs.double(), want[2], rtol=1e-4, atol=1e-4 * want[2].abs().max().item())


def _all_bit_patterns(dtype):
    return torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)


def _assert_same_bits(got, want):
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN must stay NaN (and only NaN)"
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), \
        "non-NaN values must be reproduced bitwise"


@pytest.mark.parametrize("d", [256, 97])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_low_precision_conversions_are_exact(backend, dtype, d):
    """With no pair (P = 0), the kernel only converts dtype -> float32 -> dtype: every one of the 65536
    bit patterns (zeros of both signs, subnormals, infinities, negatives, NaNs) must come back bitwise
    (NaN as NaN), in the forward, with a unit scale, and in the backward (grad x)."""
    values = _all_bit_patterns(dtype)
    rows = -(-values.numel() // d)
    x = torch.cat([values, values[: rows * d - values.numel()]]).view(rows, d).to(backend)
    empty_pairs, offsets = torch.zeros(0, 2, dtype=I32, device=backend), torch.zeros(1, dtype=I32, device=backend)
    angles, ones = torch.zeros(0, device=backend), torch.ones(d, device=backend)
    _assert_same_bits(op().givens_chain(x, angles, empty_pairs, offsets, None), x)
    _assert_same_bits(op().givens_chain(x, angles, empty_pairs, offsets, ones), x)
    gx = op().givens_chain_backward(x, x, angles, empty_pairs, offsets, ones, [True, True, True])[0]
    _assert_same_bits(gx, x)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_low_precision_identity_is_bitwise(backend, method, dtype):
    """Identity parameters (angles 0 / blocks I / scale 1) through a real chain reproduce x bitwise.

    Paired entries see ``1 * x_i + 0 * x_j``, which is exact for finite x (and -0 + 0 = +0 is the only
    change, so -0 is left out there). Entries the layout never touches carry the special values: infinities,
    -0, NaN and subnormals."""
    d = 128
    values = _all_bit_patterns(dtype)
    special = torch.isinf(values) | torch.isnan(values) | (values.view(torch.int16) == -(2 ** 15))
    finite = values[~special]
    # custom layout touching indices 0..95 only (three layers), indices 96..127 untouched
    gen = torch.Generator().manual_seed(11)
    layers = [[tuple(sorted(p)) for p in torch.randperm(96, generator=gen).view(-1, 2).tolist()] for _ in range(3)]
    pairs, offsets = tensors_from_layers(layers)
    rows = -(-finite.numel() // 96)
    body = torch.cat([finite, finite[: rows * 96 - finite.numel()]]).view(rows, 96)
    extra = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan"), 0.0, -1.0, 1.0],
                         dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    subnormals = torch.tensor([tiny / 2, -tiny / 4, tiny / 64], dtype=torch.float32).to(dtype)
    tail_values = torch.cat([extra, subnormals, values[values.view(torch.int16) < 0][:22]])
    assert tail_values.numel() == 32
    tail = torch.stack([tail_values.roll(r) for r in range(rows)])
    x = torch.cat([body, tail], dim=1).to(backend)
    assert x.shape[1] == d
    pairs, offsets = pairs.to(backend), offsets.to(backend)
    num_pairs = pairs.shape[0]
    params = torch.eye(2).repeat(num_pairs, 1, 1) if is_quasi(method) else torch.zeros(num_pairs)
    params = params.to(backend)
    scale = torch.ones(d, device=backend) if has_scale(method) else None
    _assert_same_bits(kernel_chain(method, x, params, pairs, offsets, scale), x)
    gx = kernel_backward(method, x, x, params, pairs, offsets, scale, [True, False, False])[0]
    _assert_same_bits(gx, x)


def test_low_precision_never_casts_params_to_activation_dtype(device):
    """docs/MATH.md Sec. 5 and 9: bf16 activations with float32 angles keep float32 angle precision
    (error far below that of the same chain with bf16-rounded angles) and get float32 gradients."""
    d = 64
    gen = torch.Generator().manual_seed(12)
    pairs, offsets = make_layout("parallel*2", d, device)
    # angles in [2, 4): bf16 spacing 2^-6 there, so rounding them to bf16 costs ~5x the output rounding
    angles = (2.0 + 2.0 * torch.rand(pairs.shape[0], generator=gen)).float().to(device)
    x = make_tensor((64,), d, "contiguous", gen, dtype=BF16, device=device)
    truth = ref_chain("goft", x.double(), angles.double(), pairs, offsets)
    out = kernel_chain("goft", x, angles, pairs, offsets)
    cast = ref_chain("goft", x, angles.to(BF16).float(), pairs, offsets)  # float32 math, bf16 angles
    err = (out.double() - truth).abs().mean().item()
    err_cast = (cast.double() - truth).abs().mean().item()
    assert err < 0.4 * err_cast, (err, err_cast)
    a = angles.clone().requires_grad_()
    qops.givens_chain(x.requires_grad_(), a, pairs, offsets).float().square().sum().backward()
    assert a.grad.dtype == F32 and x.grad.dtype == BF16


# ------------------------------------------------------------------------------------------------
# 6. Identity initialization is bitwise in float32.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("kind,d", [("parallel", 768), ("sequential", 13), ("butterfly", 64),
                                    ("parallel*2", 100), ("custom", 1000), ("parallel", 9000)])
def test_identity_init_is_bitwise_fp32(backend, method, kind, d):
    """Identity parameters reproduce x bitwise (1 * x_i + 0 * x_j is exact, also as an FMA), in the forward,
    the adjoint and the full backward; d = 9000 runs the segmented CUDA kernels."""
    gen = torch.Generator().manual_seed(13)
    pairs, offsets = make_layout(kind, d, backend)
    num_pairs = pairs.shape[0]
    params = torch.eye(2).repeat(num_pairs, 1, 1) if is_quasi(method) else torch.zeros(num_pairs)
    params = params.to(backend)
    scale = torch.ones(d, device=backend) if has_scale(method) else None
    x = make_tensor((5, 9), d, "row_slice", gen, dtype=F32, device=backend)
    x[x == 0] = 1.0  # -0 + 0 = +0 is the one legitimate change
    out = kernel_chain(method, x, params, pairs, offsets, scale)
    assert torch.equal(out, x)
    gx = kernel_backward(method, x, x, params, pairs, offsets, scale, [True, False, False])[0]
    assert torch.equal(gx, x)
    gx_full = kernel_backward(method, x, x, params, pairs, offsets, scale)[0]
    assert torch.equal(gx_full, x)


# ------------------------------------------------------------------------------------------------
# 7. Determinism.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("method", ["goft_scaled", "qgoft_scaled"])
def test_backward_is_deterministic(backend, num_threads, method, dtype):
    """Bitwise identical gradients run to run and for 1 vs 2 threads, over many reduction chunks."""
    d, rows = 300, 2000
    gen = torch.Generator().manual_seed(14)
    pairs, offsets = make_layout("parallel", d, backend)
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F32, device=backend)
    x = make_tensor((rows,), d, "contiguous", gen, dtype=dtype, device=backend)
    g = make_tensor((rows,), d, "contiguous", gen, dtype=dtype, device=backend)

    def grads():
        return value_and_grads(kernel_chain, method, x, params, pairs, offsets, scale, g)

    num_threads(2)
    first, second = grads(), grads()
    num_threads(1)
    single = grads()
    num_threads(2)
    third = grads()
    for name, a, b, c, e in zip(["out", "grad_x", "grad_params", "grad_scale"], first, second, single, third):
        assert torch.equal(a, b), f"{name}: two runs differ"
        assert torch.equal(a, c), f"{name}: 1 thread differs from 2 threads"
        assert torch.equal(a, e), f"{name}: run after a thread change differs"


# ------------------------------------------------------------------------------------------------
# 8. Edge cases and argument checks.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4)])
def test_zero_rows(backend, method, shape, dtype):
    d = 10
    pairs, offsets = make_layout("parallel", d, backend)
    params, scale = make_params(method, pairs.shape[0], d, torch.Generator().manual_seed(0),
                                dtype=F64 if dtype == F64 else F32, device=backend)
    x = torch.empty(*shape, d, dtype=dtype, device=backend)
    out = kernel_chain(method, x, params, pairs, offsets, scale)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    _, gx, gp, gs = value_and_grads(kernel_chain, method, x, params, pairs, offsets, scale, torch.empty_like(x))
    assert gx.shape == x.shape
    assert gp.shape == params.shape and gp.dtype == params.dtype and torch.equal(gp, torch.zeros_like(params))
    if scale is not None:
        assert gs.shape == (d,) and gs.dtype == scale.dtype and torch.equal(gs, torch.zeros_like(scale))


def _large_random_layout(d: int, generator: torch.Generator, num_layers: int = 2):
    """Layers of d // 2 random disjoint pairs, built with tensor ops (Python layouts are slow at d = 65536)."""
    layers = []
    for _ in range(num_layers):
        p = torch.randperm(d, generator=generator)[: 2 * (d // 2)].view(-1, 2)
        p = torch.stack([p.min(1).values, p.max(1).values], 1)
        layers.append(p[p[:, 0].argsort()])
    pairs = torch.cat(layers).to(I32).contiguous()
    offsets = torch.arange(num_layers + 1, dtype=I32) * (d // 2)
    return pairs, offsets


@pytest.mark.parametrize("kind", ["parallel", "random"])
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_very_large_d(device, method, kind):
    """d = 65536: on CUDA the parallel layout runs segmented and the random one in the global-memory general
    path (its tape does not fit shared memory)."""
    d = 65536
    gen = torch.Generator().manual_seed(15)
    pairs, offsets = make_layout("parallel", d) if kind == "parallel" else _large_random_layout(d, gen)
    pairs, offsets = pairs.to(device), offsets.to(device)
    params, scale = make_params(method, pairs.shape[0], d, gen, device=device)
    x = make_tensor((3,), d, "contiguous", gen, device=device)
    g = make_tensor((3,), d, "row_slice", gen, device=device)
    check_against_reference(method, x, params, pairs, offsets, scale, g)


@pytest.mark.parametrize("offsets", [[0], [0, 0], [0, 0, 0]])
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_empty_layout(device, method, offsets):
    d = 11
    gen = torch.Generator().manual_seed(16)
    pairs, offsets = torch.zeros(0, 2, dtype=I32, device=device), torch.tensor(offsets, dtype=I32, device=device)
    params, scale = make_params(method, 0, d, gen, device=device)
    x = make_tensor((4, 3), d, "contiguous", gen, device=device)
    g = make_tensor((4, 3), d, "contiguous", gen, device=device)
    out, gx, gp, gs = check_against_reference(method, x, params, pairs, offsets, scale, g)
    if scale is None:
        assert torch.equal(out, x) and torch.equal(gx, g)
    else:
        assert torch.equal(out, x * scale) and torch.equal(gx, g * scale)
        torch.testing.assert_close(gs, (g * x).sum((0, 1)), **TIGHT)
    assert gp.shape == params.shape


def test_float64_x_with_float32_params(device):
    """Mixed float32 params with float64 x is allowed; the math runs in float64."""
    d = 100
    gen = torch.Generator().manual_seed(17)
    pairs, offsets = make_layout("parallel*2", d, device)
    for method in OP_VARIANTS:
        params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F32, device=device)
        x = make_tensor((6, 7), d, "contiguous", gen, device=device)
        g = make_tensor((6, 7), d, "contiguous", gen, device=device)
        got = value_and_grads(kernel_chain, method, x, params, pairs, offsets, scale, g)
        want = value_and_grads(ref_chain, method, x, params.double(), pairs, offsets,
                               scale.double() if scale is not None else None, g)
        assert got[0].dtype == F64 and got[1].dtype == F64
        torch.testing.assert_close(got[0], want[0], **TIGHT)  # float32 math would be ~1e-6 off
        torch.testing.assert_close(got[1], want[1], **TIGHT)
        assert got[2].dtype == F32
        torch.testing.assert_close(got[2], want[2].float())
        if scale is not None:
            assert got[3].dtype == F32
            torch.testing.assert_close(got[3], want[3].float())


# The argument errors below are raised on every device; on CUDA each one is also checked to be the CPU's error,
# word for word (raises_same_on_every_device).

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128])
def test_rejects_non_float_x(device, dtype):
    pairs, offsets = make_layout("parallel", 4)
    x = torch.ones(2, 4, dtype=dtype)
    for method in ("goft", "qgoft"):
        params, _ = make_params(method, 3, 4, torch.Generator().manual_seed(0), dtype=F32)
        raises_same_on_every_device(device, kernel_chain, (method, x, params, pairs, offsets), r"\bx\b")
        raises_same_on_every_device(device, kernel_backward,
                                    (method, x, x, params, pairs, offsets, None, [True, True, False]), r"\bx\b")


def test_rejects_zero_dim_x(device):
    pairs, offsets = make_layout("parallel", 4)
    raises_same_on_every_device(device, op().givens_chain, (torch.tensor(1.0), torch.zeros(3), pairs, offsets, None),
                                r"\bx\b")


def test_rejects_bad_parameter_shapes_and_dtypes(device):
    d = 8
    pairs, offsets = make_layout("parallel", d)  # P = 7
    x = torch.randn(3, d)
    bad_angles = [torch.zeros(6), torch.zeros(8), torch.zeros(7, 1), torch.zeros(()), torch.zeros(7, dtype=I32)]
    for angles in bad_angles:
        raises_same_on_every_device(device, op().givens_chain, (x, angles, pairs, offsets, None), "angles")
        raises_same_on_every_device(device, op().givens_chain_backward,
                                    (x, x, angles, pairs, offsets, None, [True, True, False]), "angles")
    bad_blocks = [torch.zeros(6, 2, 2), torch.zeros(7, 4), torch.zeros(7, 2, 3), torch.zeros(7, 2, 2, 1),
                  torch.zeros(7, 2, 2, dtype=I32)]
    for blocks in bad_blocks:
        raises_same_on_every_device(device, op().quasi_givens_chain, (x, blocks, pairs, offsets, None), "blocks")
        raises_same_on_every_device(device, op().quasi_givens_chain_backward,
                                    (x, x, blocks, pairs, offsets, None, [True, True, False]), "blocks")
    for scale in [torch.ones(d - 1), torch.ones(d + 1), torch.ones(1, d), torch.ones(()), torch.ones(d, dtype=I32)]:
        raises_same_on_every_device(device, op().givens_chain, (x, torch.zeros(7), pairs, offsets, scale), "scale")
        raises_same_on_every_device(device, op().quasi_givens_chain_backward,
                                    (x, x, torch.zeros(7, 2, 2), pairs, offsets, scale, [True, True, True]), "scale")


BAD_LAYOUTS = [
    # (pairs, layer_offsets, d, expected message part)
    ([[0, 1], [2, 4]], [0, 2], 4, "pair"),            # j == d
    ([[0, 1], [2, 9]], [0, 2], 4, "pair"),            # j > d
    ([[-1, 1], [2, 3]], [0, 2], 4, "pair"),           # negative
    ([[1, 0], [2, 3]], [0, 2], 4, "pair"),            # i > j
    ([[1, 1], [2, 3]], [0, 2], 4, "pair"),            # i == j
    ([[0, 1], [1, 2]], [0, 2], 4, "pair"),            # overlap inside a layer
    ([[0, 2], [1, 2]], [0, 2], 4, "pair"),            # overlap on j
    ([[0, 1], [1, 2]], [0, 1, 3], 4, "layer_offsets"),  # ends past P
    ([[0, 1], [1, 2]], [0, 1], 4, "layer_offsets"),     # ends before P
    ([[0, 1], [2, 3]], [1, 2], 4, "layer_offsets"),     # does not start at 0
    ([[0, 1], [2, 3]], [0, 2, 1, 2], 4, "layer_offsets"),  # decreasing
    ([[0, 1], [2, 3]], [0, -1, 2], 4, "layer_offsets"),    # negative
    ([[0, 1], [2, 3]], [], 4, "layer_offsets"),            # empty
]


@pytest.mark.parametrize("pairs,offsets,d,what", BAD_LAYOUTS)
def test_rejects_invalid_layouts(device, pairs, offsets, d, what):
    pairs_t = torch.tensor(pairs, dtype=I32).reshape(-1, 2)
    offsets_t = torch.tensor(offsets, dtype=I32)
    x = torch.randn(5, d)
    num_pairs = pairs_t.shape[0]
    calls = [
        (op().givens_chain, (x, torch.zeros(num_pairs), pairs_t, offsets_t, None)),
        (op().quasi_givens_chain, (x, torch.zeros(num_pairs, 2, 2), pairs_t, offsets_t, torch.ones(d))),
        (op().givens_chain_backward, (x, x, torch.zeros(num_pairs), pairs_t, offsets_t, None, [True, True, False])),
        (op().quasi_givens_chain_backward, (x, x, torch.zeros(num_pairs, 2, 2), pairs_t, offsets_t, None,
                                            [True, False, False])),
    ]
    for fn, args in calls:
        raises_same_on_every_device(device, fn, args, what)


def test_rejects_bad_layout_tensor_types(device):
    x = torch.randn(5, 4)
    pairs, offsets = make_layout("parallel", 4)
    for bad_pairs in [pairs.long(), pairs.float(), pairs.reshape(-1), pairs[:, :1], pairs.view(-1, 3, 2)]:
        raises_same_on_every_device(device, op().givens_chain,
                                    (x, torch.zeros(bad_pairs.shape[0]), bad_pairs, offsets, None), "pairs")
    for bad_offsets in [offsets.long(), offsets.view(1, -1), offsets.float()]:
        raises_same_on_every_device(device, op().givens_chain, (x, torch.zeros(3), pairs, bad_offsets, None),
                                    "layer_offsets")


def test_zero_dim_pairs_error_names_pairs(device):
    raises_same_on_every_device(device, op().givens_chain, (torch.randn(5, 4), torch.zeros(1), torch.tensor(1, dtype=I32),
                                                            torch.tensor([0, 0], dtype=I32), None), "pairs")


def test_layer_offsets_are_checked_before_pairs_are_read(device):
    """pairs is a view of the first 2 rows of a bigger tensor; offsets [0, 3, 2] claim 3 pairs in layer 0.
    The third "pair" lies outside ``pairs`` (it is (3, 1) in the bigger tensor) and must never be read: the
    error must be about layer_offsets, not about a pair 2 that does not exist."""
    storage = torch.tensor([[0, 1], [2, 3], [3, 1]], dtype=I32, device=device)
    pairs = storage[:2]
    assert pairs.is_contiguous()
    with pytest.raises(RuntimeError, match="layer_offsets"):
        op().givens_chain(torch.randn(2, 4, device=device), torch.zeros(2, device=device), pairs,
                          torch.tensor([0, 3, 2], dtype=I32, device=device), None)


def test_non_contiguous_layout_tensors_are_accepted(device):
    d = 16
    gen = torch.Generator().manual_seed(18)
    pairs, offsets = make_layout("butterfly", d, device)
    params, scale = make_params("qgoft_scaled", pairs.shape[0], d, gen, device=device)
    pairs_nc = pairs.t().contiguous().t()
    offsets_nc = torch.stack([offsets, offsets], 1)[:, 0]
    assert not pairs_nc.is_contiguous() and not offsets_nc.is_contiguous()
    x = make_tensor((5,), d, "contiguous", gen, device=device)
    torch.testing.assert_close(kernel_chain("qgoft", x, params, pairs_nc, offsets_nc, scale),
                               ref_chain("qgoft", x, params, pairs, offsets, scale), **TIGHT)
    params_nc = params.transpose(1, 2).contiguous().transpose(1, 2)
    scale_nc = torch.stack([scale, scale], 1)[:, 1]
    torch.testing.assert_close(kernel_chain("qgoft", x, params_nc, pairs, offsets, scale_nc),
                               ref_chain("qgoft", x, params, pairs, offsets, scale), **TIGHT)


def test_rejects_grad_out_of_wrong_shape(device):
    d = 8
    pairs, offsets = make_layout("parallel", d)
    x = torch.randn(3, 4, d)
    for g in [torch.randn(3, 4, d + 1), torch.randn(12, d), torch.randn(3, 4, 1), torch.randn(4, d)]:
        raises_same_on_every_device(device, op().givens_chain_backward,
                                    (g, x, torch.zeros(7), pairs, offsets, None, [True, True, False]), "grad_out")
        raises_same_on_every_device(device, op().quasi_givens_chain_backward,
                                    (g, x, torch.zeros(7, 2, 2), pairs, offsets, None, [True, False, False]),
                                    "grad_out")


def test_rejects_hostile_tops(device):
    """The backward's segment tops (docs/CONTRACT.md): another dtype than x's accumulation type, another row
    count, another rank, or another device are refused, with the same words on every backend (and in the fake
    kernels); the column count is the CUDA glue's to check against its segments (tests/test_cuda.py)."""
    d = 8
    pairs, offsets = make_layout("parallel", d)
    x, g = torch.randn(3, 4, d), torch.randn(3, 4, d)
    cases = [(torch.zeros(12, 2, dtype=F64), r"tops must be Float \(the accumulation type of x\), got Double"),
             (torch.zeros(12, 2, dtype=BF16), r"tops must be Float \(the accumulation type of x\), got BFloat16"),
             (torch.zeros(11, 2), r"tops must have shape \(rows, segments\) with rows = 12, got \[11, 2\]"),
             (torch.zeros(24), r"tops must have shape \(rows, segments\) with rows = 12, got \[24\]"),
             (torch.zeros(3, 4, 2), r"tops must have shape \(rows, segments\) with rows = 12, got \[3, 4, 2\]")]
    for tops, pattern in cases:
        for fn, params in ((op().givens_chain_backward, torch.zeros(7)),
                           (op().quasi_givens_chain_backward, torch.zeros(7, 2, 2))):
            raises_same_on_every_device(device, fn, (g, x, params, pairs, offsets, None, [True, True, False], tops),
                                        pattern)
    # float64 x: the tops are float64
    raises_same_on_every_device(device, op().givens_chain_backward,
                                (g.double(), x.double(), torch.zeros(7, dtype=F64), pairs, offsets, None,
                                 [True, True, False], torch.zeros(12, 0)), r"tops must be Double \(.*\), got Float")
    with pytest.raises(RuntimeError, match=r"tops must be on the same device as x \(.*\), got meta"):
        op().givens_chain_backward(g.to(device), x.to(device), torch.zeros(7, device=device), pairs.to(device),
                                   offsets.to(device), None, [True, True, False], torch.zeros(12, 0, device="meta"))


# ------------------------------------------------------------------------------------------------
# 9. The original implementation's defects (docs/MATH.md Sec. 9), at op level.
# ------------------------------------------------------------------------------------------------

def _dense_via_op(method, params, pairs, offsets, d, device="cpu"):
    """R = chain applied to the identity (rows of I: e_k^T R), computed on ``device``, returned on the CPU."""
    on = [t.to(device) for t in (torch.eye(d, dtype=F64), params, pairs, offsets)]
    return kernel_chain(method, *on).cpu()


@pytest.mark.parametrize("kind,d", [("parallel", 8), ("parallel", 64), ("parallel", 1000), ("butterfly", 64),
                                    ("custom", 64), ("parallel*2", 13), ("sequential", 8)])
def test_dense_matrix_is_the_reference_product_and_orthogonal(device, one_thread, kind, d):
    gen = torch.Generator().manual_seed(19)
    pairs, offsets = make_layout(kind, d)
    angles, _ = make_params("goft", pairs.shape[0], d, gen)
    dense = _dense_via_op("goft", angles, pairs, offsets, d, device)
    expected = ref.dense_chain_matrix(ref.blocks_from_angles(angles), pairs, offsets, d)
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-12)
    assert (dense.T @ dense - torch.eye(d, dtype=F64)).abs().max().item() < 1e-12
    # qGOFT with orthogonal blocks (rotations and reflections) is orthogonal too
    theta = 2 * math.pi * torch.rand(pairs.shape[0], generator=gen, dtype=F64)
    blocks = ref.blocks_from_angles(theta)
    flip = torch.rand(pairs.shape[0], generator=gen) < 0.5
    blocks[flip, :, 1] = -blocks[flip, :, 1]
    dense_q = _dense_via_op("qgoft", blocks, pairs, offsets, d, device)
    torch.testing.assert_close(dense_q, ref.dense_chain_matrix(blocks, pairs, offsets, d), rtol=0, atol=1e-12)
    assert (dense_q.T @ dense_q - torch.eye(d, dtype=F64)).abs().max().item() < 1e-12


@pytest.mark.parametrize("d", [8, 13, 64])
def test_parallel_layers_rotate_true_pairs_at_stride(device, d):
    """Each angle of the parallel layout, alone non-zero, rotates exactly the plane (2^r k, 2^r k + 2^(r-1))
    of docs/MATH.md Sec. 4 by a true rotation (the original implementation sheared (p, p+1) instead)."""
    pairs, offsets = make_layout("parallel", d)
    expected = []
    for r in range(1, math.ceil(math.log2(d)) + 1):
        expected += [(k, k + 2 ** (r - 1)) for k in range(0, d, 2 ** r) if k + 2 ** (r - 1) < d]
    assert [tuple(p) for p in pairs.tolist()] == expected
    theta = 0.7
    c, s = math.cos(theta), math.sin(theta)
    for p, (i, j) in enumerate(expected):
        angles = torch.zeros(d - 1, dtype=F64)
        angles[p] = theta
        dense = _dense_via_op("goft", angles, pairs, offsets, d, device)
        want = torch.eye(d, dtype=F64)
        want[i, i], want[i, j], want[j, i], want[j, j] = c, -s, s, c  # G(i, j; theta) of docs/MATH.md Sec. 2
        torch.testing.assert_close(dense, want, rtol=0, atol=1e-15)


def test_d8_orthogonality_of_multilayer_chain(device):
    """The defect's own example: d = 8, random angles in every layer: |R^T R - I| tiny, not ~2.8."""
    d = 8
    pairs, offsets = make_layout("parallel", d)
    angles = torch.linspace(-2.5, 2.9, d - 1, dtype=F64)
    dense = _dense_via_op("goft", angles, pairs, offsets, d, device)
    assert (dense.T @ dense - torch.eye(d, dtype=F64)).abs().max().item() < 1e-14


@pytest.mark.parametrize("d", [3, 5, 7, 13, 101, 1001])
@pytest.mark.parametrize("kind", ["parallel", "butterfly", "sequential"])
def test_odd_d(device, kind, d):
    if kind == "sequential" and d > 200:
        pytest.skip("d - 1 layers in the reference; covered by smaller odd d")
    gen = torch.Generator().manual_seed(20 + d)
    pairs, offsets = make_layout(kind, d, device)
    for method in ("goft", "qgoft_scaled"):
        params, scale = make_params(method, pairs.shape[0], d, gen, device=device)
        x = make_tensor((9,), d, "contiguous", gen, device=device)
        g = make_tensor((9,), d, "contiguous", gen, device=device)
        check_against_reference(method, x, params, pairs, offsets, scale, g)


@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_zero_width_rows(device, method):
    """d = 0 (no features, no pairs): empty output of x's shape, zero-size gradients (on every device)."""
    x = torch.randn(5, 0, device=device, requires_grad=True)
    params = torch.zeros(0, 2, 2, device=device) if is_quasi(method) else torch.zeros(0, device=device)
    params.requires_grad_(True)
    pairs = torch.zeros(0, 2, dtype=torch.int32, device=device)
    offsets = torch.zeros(1, dtype=torch.int32, device=device)
    fn = qgoft.ops.quasi_givens_chain if is_quasi(method) else qgoft.ops.givens_chain
    y = fn(x, params, pairs, offsets)
    assert y.shape == (5, 0)
    y.sum().backward()
    assert x.grad.shape == (5, 0) and params.grad.shape == params.shape
