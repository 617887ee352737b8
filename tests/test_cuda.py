"""Tests of what only the CUDA backend of the compiled ops has: its kernel paths (register, segmented, general
in shared or global memory) and their selection, the allocator-poisoned comparison against the float64 reference
and the CPU kernels over a grid of sizes, the layout validation cache, streams, several GPUs, CUDA graphs, and
the layer end to end. The op tests (tests/test_ops.py, test_bad_input.py, test_determinism.py, test_fuzz.py)
run on CUDA too, through the ``device`` / ``backend`` fixtures of tests/conftest.py.

Skipped when there is no CUDA device or qgoft was built without its CUDA kernels; with
``QGOFT_REQUIRE_CUDA=1`` (set by the GPU check script) the module fails instead of skipping.

Every case draws FRESH random inputs (the seed is printed, so a failure can be replayed with
``QGOFT_TEST_SEED=<seed>``), poisons the CUDA caching allocator with NaN bytes before each kernel call
(so an output element the kernels forget to write is NaN and fails), and checks against

* the float64 pure-PyTorch reference (autograd for the gradients): float64 to ~1e-9, float32 to 1e-4
  relative (of the largest value), bfloat16/float16 outputs within one unit in the last place (the only
  rounding left is the final one, as for the CPU kernels), parameter gradients to 1e-4;
* the CPU kernels on the same inputs (within the same tolerances);
* itself: two runs give bitwise identical outputs and gradients.

Kernel paths (docs/CUDA.md) are selected by layout and size; tests force the others with the debug
environment variables QGOFT_CUDA_PATH=general|global and QGOFT_CUDA_SEGMENT=<width>, and check the
selection through QGOFT_CUDA_VERBOSE=1.
"""
from __future__ import annotations

import copy
import itertools
import os
import random
import re

import pytest
import torch

import qgoft
from qgoft import ops as qops
from qgoft import reference as ref
import chain_helpers  # noqa: E402
from chain_helpers import (OP_VARIANTS, cuda_required, cuda_unavailable_reason,  # noqa: E402
                           is_quasi, kernel_backward, kernel_chain, ops_chain, ref_chain)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DEV = "cuda"
DTYPES = [F32, F64, BF16, F16]

_REASON = cuda_unavailable_reason()
if _REASON is not None and cuda_required():
    pytest.fail(f"QGOFT_REQUIRE_CUDA=1 but the CUDA backend cannot be tested: {_REASON}", pytrace=False)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"CUDA backend not testable: {_REASON}")


# ------------------------------------------------------------------------------------------------
# Randomness, allocator poisoning.
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def gen(request):
    """A CPU generator with a fresh seed per test (printed; QGOFT_TEST_SEED fixes it)."""
    fixed = os.environ.get("QGOFT_TEST_SEED")
    seed = int(fixed) if fixed else random.SystemRandom().randrange(2 ** 31)
    print(f"[{request.node.name}] seed {seed} (replay with QGOFT_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


_POISON_BYTES = 64 << 20
_SMALL_POOL_MAX = 1 << 20  # the caching allocator's small pool serves requests up to 1 MiB
# Poisoning statistics of this process (run_and_check): outputs that were / were not seen in a
# poisoned block. Not confirming it is reported (warning + counter), never a failure: the values are
# compared against the reference either way.
POISON_STATS = {"checked": 0, "confirmed": 0}


class PoisonNotConfirmed(UserWarning):
    """The allocator did not hand a poisoned block to an output (values are still compared)."""


def _round_alloc(n: int) -> int:
    """The caching allocator's block size for a request of n bytes (512-byte rounding; requests above
    the small pool come from 2 MiB-granular segments but blocks keep the 512-byte rounding)."""
    return max(512, (n + 511) // 512 * 512)


def poison(min_bytes: int = 0, sizes=()) -> list[tuple[int, int]]:
    """Fill the memory the CUDA caching allocator hands out next (on the current stream) with 0xFF
    bytes (NaN in every float dtype). Frees the cache, then allocates, fills and frees, on the current
    stream (blocks are cached per stream): for every expected output size in ``sizes`` (bytes) a few
    blocks of exactly that size class (best fit gives them back first, in the right pool whether the
    request is small (<= 1 MiB) or large), small-pool filler blocks, and one large block of at least
    3 x ``min_bytes``. Works with and without expandable segments (the freed blocks stay mapped and
    cached). Returns the poisoned address ranges."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = []
    for n in sizes:
        n = _round_alloc(int(n))
        held.extend(torch.full((n,), 255, dtype=torch.uint8, device=DEV) for _ in range(3))
    held.extend(torch.full(((1 << 19) - 512,), 255, dtype=torch.uint8, device=DEV) for _ in range(16))
    held.extend(torch.full((_round_alloc(n),), 255, dtype=torch.uint8, device=DEV)
                for n in (512, 4096, 65536, _SMALL_POOL_MAX) for _ in range(4))
    held.append(torch.full((max(_POISON_BYTES, 3 * min_bytes),), 255, dtype=torch.uint8, device=DEV))
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel()) for t in held]
    torch.cuda.synchronize()
    del held
    return ranges


def in_poisoned(t: torch.Tensor, ranges) -> bool:
    p = t.data_ptr()
    return any(a <= p < b for a, b in ranges)


def note_poisoning(reached: bool, what: str) -> None:
    """Record whether an output came from a poisoned block; warn (do not fail) when it did not."""
    POISON_STATS["checked"] += 1
    POISON_STATS["confirmed"] += int(reached)
    if not reached:
        import warnings
        warnings.warn(f"allocator poisoning not confirmed for {what} (values are still compared; "
                      f"poisoning counter {POISON_STATS['confirmed']}/{POISON_STATS['checked']})",
                      PoisonNotConfirmed, stacklevel=2)


# ------------------------------------------------------------------------------------------------
# Builders on the GPU (the shared ones of tests/chain_helpers.py with CUDA defaults) and the float64 truth.
# ------------------------------------------------------------------------------------------------

def make_layout(kind, d, g, device=DEV):
    return chain_helpers.make_layout(kind, d, device, generator=g)


def make_params(method, num_pairs, d, g, dtype=F32, device=DEV):
    return chain_helpers.make_params(method, num_pairs, d, g, dtype=dtype, device=device)


def make_tensor(shape, d, kind, g, dtype, device=DEV):
    return chain_helpers.make_tensor(shape, d, kind, g, dtype=dtype, device=device)


def op():
    return torch.ops.qgoft


k_forward = kernel_chain
k_backward = kernel_backward


def truth(method, x, g, params, pairs, offsets, scale):
    """float64 forward and gradients (x, params, scale) of the reference on the same input values."""
    x64 = x.detach().double().requires_grad_()
    p64 = params.detach().double().requires_grad_()
    leaves = [x64, p64]
    s64 = None
    if scale is not None:
        s64 = scale.detach().double().requires_grad_()
        leaves.append(s64)
    out = ref_chain(method, x64, p64, pairs, offsets, s64)
    grads = torch.autograd.grad(out, leaves, g.detach().double(), materialize_grads=True)
    return (out.detach(),) + tuple(grads) + ((None,) if scale is None else ())


def _tol(dtype, want):
    big = want.abs().max().item() if want.numel() else 0.0
    if dtype == F64:
        return 1e-9, 1e-9 * max(1.0, big)
    if dtype == F32:
        return 1e-4, 1e-4 * big + 1e-6
    eps = torch.finfo(dtype).eps  # bfloat16 / float16 activations: one final rounding
    return eps, 1e-4 * big + 1e-5


def check_close(got, want, dtype, what, factor=1.0):
    """``got`` (kernel, any dtype) against ``want`` (float64): |got - want| <= atol + rtol |want|."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    rtol, atol = _tol(dtype, want)
    diff = (got.double() - want.double()).abs()
    bound = factor * (atol + rtol * want.double().abs())
    bad = ~(diff <= bound)  # NaN counts as bad
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance (dtype {dtype}, rtol {rtol:g}, "
            f"atol {atol:g}); first at {idx}: got {got.double()[tuple(idx)].item()!r}, "
            f"want {want.double()[tuple(idx)].item()!r}; max |diff| {diff.max().item():g}, "
            f"NaNs in got: {int(torch.isnan(got.double()).sum())}")


def run_and_check(method, kind, d, dtype, g, shape=(3, 37), x_kind="contiguous", g_kind="contiguous",
                  compare_cpu=True, layout=None):
    """Forward and full backward on CUDA (poisoned allocator) against the float64 reference and the
    CPU kernels. Returns the CUDA results (out, grad_x, grad_params, grad_scale)."""
    pairs, offsets = layout if layout is not None else make_layout(kind, d, g)
    pdtype = F64 if dtype == F64 else F32
    params, scale = make_params(method, pairs.shape[0], d, g, dtype=pdtype)
    x = make_tensor(shape, d, x_kind, g, dtype)
    gr = make_tensor(shape, d, g_kind, g, dtype)
    nbytes = x.numel() * x.element_size() + 4 * (4 * pairs.shape[0] + d) * 8
    out_bytes = x.numel() * x.element_size()  # out and grad_x: (rows, d) in x's dtype, contiguous

    ranges = poison(nbytes, sizes=(out_bytes,))
    out = k_forward(method, x, params, pairs, offsets, scale)
    poisoned_out = in_poisoned(out, ranges)
    ranges = poison(nbytes, sizes=(out_bytes,))
    gx, gp, gs = k_backward(method, gr, x, params, pairs, offsets, scale)
    poisoned_gx = in_poisoned(gx, ranges)
    torch.cuda.synchronize()
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous() and out.device == x.device
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gp.shape == params.shape and gp.dtype == params.dtype
    if scale is None:
        assert gs.shape == (0,)
    else:
        assert gs.shape == scale.shape and gs.dtype == scale.dtype
    if x.numel():  # reported, not asserted (test_allocator_poisoning_reaches_outputs asserts it)
        note_poisoning(poisoned_out, f"{method} {kind} d={d} {dtype}: out")
        note_poisoning(poisoned_gx, f"{method} {kind} d={d} {dtype}: grad_x")

    want = truth(method, x, gr, params, pairs, offsets, scale)
    tag = f"{method} {kind} d={d} {dtype} shape={shape} x={x_kind} g={g_kind}"
    check_close(out, want[0], dtype, f"{tag}: out")
    check_close(gx, want[1], dtype, f"{tag}: grad_x")
    pd = F64 if dtype == F64 else F32
    check_close(gp, want[2], pd, f"{tag}: grad_params")
    if scale is not None:
        check_close(gs, want[3], pd, f"{tag}: grad_scale")

    if compare_cpu:
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        args = (cpu(params), pairs.cpu(), offsets.cpu(), cpu(scale))
        out_c = k_forward(method, x.cpu(), *args)
        gx_c, gp_c, gs_c = k_backward(method, gr.cpu(), x.cpu(), *args)
        check_close(out, out_c.double().to(DEV), dtype, f"{tag}: out vs CPU kernel", factor=2)
        check_close(gx, gx_c.double().to(DEV), dtype, f"{tag}: grad_x vs CPU kernel", factor=2)
        check_close(gp, gp_c.double().to(DEV), pd, f"{tag}: grad_params vs CPU kernel", factor=2)
        if scale is not None:
            check_close(gs, gs_c.double().to(DEV), pd, f"{tag}: grad_scale vs CPU kernel", factor=2)
    return out, gx, gp, gs


@pytest.fixture
def env(monkeypatch):
    """Set debug environment variables of the CUDA glue for one test."""
    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))
    return set_env


def plans(capfd):
    """Launch plans printed (QGOFT_CUDA_VERBOSE=1) since the last call."""
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("qgoft.cuda:")]


# ------------------------------------------------------------------------------------------------
# 1. Every layout, method and dtype against the float64 reference and the CPU kernels.
# ------------------------------------------------------------------------------------------------

def _grid():
    # parallel: register path (T <= 512/1024, R > 1 below 256 threads), segmented above 4096 (backward)
    # and 8192 (forward); non-multiples of 8 take the scalar (non-vectorised) loads.
    for d in (2, 3, 8, 13, 64, 100, 257, 1000, 2048, 4096, 5000, 8192, 12288):
        yield "parallel", d
    for d in (2, 5, 64, 200):
        yield "sequential", d
    # butterfly 4096: backward accumulators in global memory; 8192: rows and tape too (global path)
    for d in (2, 8, 64, 1024, 4096, 8192):
        yield "butterfly", d
    for d in (13, 100, 1000):
        yield "parallel*2", d
    for d in (7, 50, 768, 3000):
        yield "custom", d


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("kind,d", list(_grid()))
def test_matches_reference_and_cpu(gen, kind, d, method, dtype):
    if is_quasi(method) and kind == "sequential" and d > 64 and dtype != F64:
        d = 64  # free 2x2 blocks over ~200 layers grow values beyond low-precision tolerances
    run_and_check(method, kind, d, dtype, gen)


def test_allocator_poisoning_reaches_outputs(gen):
    """Test infrastructure: poison() hands NaN-filled blocks to a plain allocation and to the outputs of
    a simple large case (2 MiB float32 output, large pool). The other tests only report (warning and
    counter) when poisoning cannot be confirmed and compare values anyway; this one asserts it."""
    nbytes = 512 * 1024 * 4
    ranges = poison(nbytes, sizes=(nbytes,))
    t = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    assert in_poisoned(t, ranges), "TEST INFRASTRUCTURE: a plain 2 MiB allocation missed the poisoned blocks"
    assert bool((t == 255).all()), "TEST INFRASTRUCTURE: the poisoned block no longer holds 0xFF bytes"
    del t
    d = 1024
    pairs, offsets = make_layout("parallel", d, gen)
    params, scale = make_params("goft_scaled", pairs.shape[0], d, gen)
    x = make_tensor((512,), d, "contiguous", gen, F32)
    k_forward("goft_scaled", x, params, pairs, offsets, scale)  # validates and caches the layout
    ranges = poison(nbytes, sizes=(nbytes,))
    out = k_forward("goft_scaled", x, params, pairs, offsets, scale)
    assert in_poisoned(out, ranges), (
        "TEST INFRASTRUCTURE: allocator poisoning did not reach the output of a simple large case "
        f"(caching allocator settings: {os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '<default>')})")
    check_close(out, ref_chain("goft_scaled", x.double(), params.double(), pairs, offsets, scale.double()),
                F32, "poisoned large case")


@pytest.mark.parametrize("rows", [1, 31, 257, 100_003])
@pytest.mark.parametrize("kind,d", [("parallel", 16), ("parallel", 300), ("custom", 40)])
def test_many_rows(gen, kind, d, rows):
    """Grid-stride loops, partially filled row groups and the persistent backward grids."""
    run_and_check("goft_scaled", kind, d, F32, gen, shape=(rows,), compare_cpu=rows < 100_000)
    run_and_check("qgoft", kind, d, BF16, gen, shape=(rows,), compare_cpu=False)


# ------------------------------------------------------------------------------------------------
# 2. Forced kernel paths (debug knobs) and the path selection.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [300, 1000, 2049, 4100])
@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
def test_segmented_parallel_path(gen, env, capfd, d, method, dtype):
    """Rows cut into 256-element segments: the top layers run in the second forward kernel and in
    warp 0 of every backward block."""
    env(QGOFT_CUDA_SEGMENT=256, QGOFT_CUDA_VERBOSE=1)
    run_and_check(method, "parallel", d, dtype, gen, shape=(5, 7), x_kind="row_slice", g_kind="transposed")
    seen = plans(capfd)
    nsegs = {int(m) for line in seen for m in re.findall(r"nseg=(\d+)", line)}
    assert nsegs == {-(-d // 256)}, seen


@pytest.mark.parametrize("path", ["general", "global"])
@pytest.mark.parametrize("kind,d", [("parallel", 1000), ("parallel", 64), ("custom", 333),
                                    ("sequential", 40), ("parallel*2", 129)])
@pytest.mark.parametrize("method", ["goft", "qgoft_scaled"])
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=str)
def test_general_paths_forced(gen, env, capfd, path, kind, d, method, dtype):
    env(QGOFT_CUDA_PATH=path, QGOFT_CUDA_VERBOSE=1)
    run_and_check(method, kind, d, dtype, gen, shape=(3, 11))
    seen = plans(capfd)
    assert seen and all(("path=general(global)" if path == "global" else "path=general(smem)") in line
                        for line in seen), seen


def _fused_xor_cases():
    """(variant, kind, d, shape, method, dtype): every shape and variant in every dtype, the four methods
    taking turns (each method meets each dtype and variant), so the GPU check's test time box holds."""
    shapes = [("parallel*2", 13, (17,)), ("parallel*2", 100, (3, 11)), ("parallel*2", 1000, (5,)),
              ("parallel*2", 4096, (3,)), ("parallel*3", 64, (37,)), ("parallel*2", 5000, (2,))]
    for k, ((kind, d, shape), variant, dtype) in enumerate(itertools.product(shapes, ["base", "table"], DTYPES)):
        yield pytest.param(variant, kind, d, shape, OP_VARIANTS[(k + k // 8) % 4], dtype,
                           id=f"{kind}-{d}-{variant}-{OP_VARIANTS[(k + k // 8) % 4]}-{dtype}")


@pytest.mark.parametrize("variant,kind,d,shape,method,dtype", list(_fused_xor_cases()))
def test_fused_xor_path(gen, env, capfd, variant, kind, d, shape, method, dtype):
    """QGOFT_CUDA_XOR=fused: stack(parallel(d), k) on the stacked register kernels (docs/CUDA.md, "XOR
    layouts") against the float64 reference and the CPU kernels; rows wider than one segment (d = 5000
    backward) and shared memory that does not fit (float64 backward at d = 4096: one row per block is
    already too much; at smaller d the planner takes fewer rows per block) keep the general kernels."""
    env(QGOFT_CUDA_XOR="fused", QGOFT_CUDA_VARIANT=variant, QGOFT_CUDA_VERBOSE=1)
    run_and_check(method, kind, d, dtype, gen, shape=shape)
    seen = plans(capfd)
    reps = int(kind.rpartition("*")[2])
    for line in seen:
        fused = " forward " in line or not (d > 4096 or (dtype == F64 and d == 4096))
        assert (f"path=stack reps={reps} " in line) == fused and ("path=general" in line) != fused, (d, seen)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("kind,d,rows", [("parallel*2", 300, 20_000), ("parallel*2", 4096, 700),
                                         ("parallel*3", 40, 100_003)])
def test_fused_xor_path_many_rows_deterministic(gen, env, dtype, kind, d, rows):
    """The stacked kernels' persistent grids (several row groups per block, partial last group) against the
    reference, and bitwise identical over three runs."""
    env(QGOFT_CUDA_XOR="fused")
    run_and_check("qgoft_scaled", kind, d, dtype, gen, shape=(rows,), compare_cpu=False)
    pairs, offsets = make_layout(kind, d, gen)
    params, scale = make_params("goft_scaled", pairs.shape[0], d, gen)
    x = make_tensor((rows,), d, "contiguous", gen, dtype)
    g = make_tensor((rows,), d, "contiguous", gen, dtype)
    results = []
    for _ in range(3):
        poison()
        out = k_forward("goft_scaled", x, params, pairs, offsets, scale)
        results.append((out,) + tuple(k_backward("goft_scaled", g, x, params, pairs, offsets, scale)))
    for name, a, b, c in zip(["out", "grad_x", "grad_params", "grad_scale"], *results):
        assert torch.equal(a, b) and torch.equal(a, c), f"{name}: runs differ"


@pytest.mark.parametrize("kind,d,shape,method,dtype,x_kind", [
    ("butterfly", 4096, (1003,), "goft", BF16, "contiguous"),       # 512 threads, 8 rows each: 126 groups, last partial
    ("butterfly", 4096, (3, 37), "qgoft_scaled", F32, "contiguous"),
    ("butterfly", 4096, (21,), "goft_scaled", F16, "row_slice"),     # scalar loads (unaligned, strided rows)
    ("butterfly", 4096, (9,), "qgoft", F64, "contiguous"),           # 2 rows per thread
    ("butterfly", 2048, (300,), "qgoft", BF16, "row_slice"),
    ("butterfly", 512, (1001,), "goft_scaled", F32, "contiguous"),  # one round with fewer layers (log2 d = 9: 3 full)
    ("butterfly", 128, (5000,), "qgoft_scaled", BF16, "contiguous"),  # sub-blocks of 16 threads, 64 rows per group
    ("butterfly", 8, (20_001,), "goft", F32, "contiguous"),          # one round, 1024 rows per group
    ("butterfly", 8192, (3,), "goft", BF16, "contiguous"),           # d > 4096: the general kernels
    ("butterfly*2", 64, (7,), "goft", F32, "contiguous"),            # a stack of butterflies: repetitions in turn
    ("butterfly*2", 4096, (19,), "qgoft_scaled", BF16, "contiguous"),
])
def test_butterfly_forward(gen, env, capfd, kind, d, shape, method, dtype, x_kind):
    """QGOFT_CUDA_XOR=fused: the forward of layouts.butterfly(d) and of its stacks on the butterfly kernel (docs/CUDA.md,
    "The butterfly forward on the register path") for d = 2^n <= 4096, the general kernels otherwise and for the
    backward; against the float64 reference and the CPU kernels (run_and_check), against the general kernels on the
    same inputs (QGOFT_CUDA_XOR=general) and bitwise reproducible."""
    env(QGOFT_CUDA_XOR="fused", QGOFT_CUDA_VERBOSE=1)
    layout = make_layout(kind, d, gen)
    run_and_check(method, kind, d, dtype, gen, shape=shape, x_kind=x_kind, layout=layout)
    fused = d <= 4096
    seen = plans(capfd)
    # the forward on the butterfly kernel; the backward too for a single butterfly (test_butterfly_backward)
    on_kernel = lambda p: fused and (" forward " in p or kind == "butterfly")  # noqa: E731
    assert seen and all(("path=butterfly " in p) == on_kernel(p) for p in seen), seen
    pairs, offsets = layout
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F64 if dtype == F64 else F32)
    x = make_tensor(shape, d, x_kind, gen, dtype)
    runs = {}
    for xor in ("fused", "general", "fused"):
        env(QGOFT_CUDA_XOR=xor)
        poison()
        out = k_forward(method, x, params, pairs, offsets, scale)
        torch.cuda.synchronize()
        if xor in runs:
            assert torch.equal(out, runs[xor]), "the butterfly forward is not reproducible"
        runs[xor] = out
    check_close(runs["fused"], runs["general"], dtype, f"{method} {kind} d={d} {dtype}: fused vs general forward")


@pytest.mark.parametrize("d,shape,method,dtype,x_kind", [
    (4096, (1003,), "goft", BF16, "contiguous"),       # 512 threads, 4 rows each: 251 groups over 132 blocks, last partial
    (4096, (3, 37), "qgoft_scaled", F32, "contiguous"),
    (4096, (21,), "goft_scaled", F16, "row_slice"),     # scalar loads of x (unaligned, strided rows)
    (4096, (9,), "qgoft", F64, "contiguous"),           # 2 rows per thread
    (2048, (300,), "qgoft", BF16, "row_slice"),         # a last round of 2 layers (log2 d = 11)
    (512, (1001,), "goft_scaled", F32, "contiguous"),
    (128, (5000,), "qgoft_scaled", BF16, "contiguous"),  # sub-blocks of 16 threads, 32 rows per group, a slot each
    (8, (20_001,), "goft", F32, "contiguous"),           # one round, no buffer
])
def test_butterfly_backward(gen, env, capfd, d, shape, method, dtype, x_kind):
    """QGOFT_CUDA_XOR=fused: the backward of layouts.butterfly(d) on the butterfly backward kernel (docs/CUDA.md, "The
    butterfly backward on the register path"): against the float64 reference and the CPU kernels (run_and_check),
    every output mask against the general kernels on the same inputs (QGOFT_CUDA_XOR=general), bitwise reproducible."""
    env(QGOFT_CUDA_XOR="fused", QGOFT_CUDA_VERBOSE=1)
    layout = make_layout("butterfly", d, gen)
    run_and_check(method, "butterfly", d, dtype, gen, shape=shape, x_kind=x_kind, layout=layout)
    seen = plans(capfd)
    assert any(" backward path=butterfly " in p for p in seen), seen
    pairs, offsets = layout
    pd = F64 if dtype == F64 else F32
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=pd)
    x = make_tensor(shape, d, x_kind, gen, dtype)
    g = make_tensor(shape, d, "contiguous", gen, dtype)
    for mask in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        runs = {}
        for xor in ("fused", "general", "fused"):
            env(QGOFT_CUDA_XOR=xor)
            poison()
            res = k_backward(method, g, x, params, pairs, offsets, scale, mask=mask)
            torch.cuda.synchronize()
            if xor in runs:
                assert all(torch.equal(a, b) for a, b in zip(res, runs[xor])), f"mask {mask}: not reproducible"
            runs[xor] = res
        for name, a, b, dt in zip(("grad_x", "grad_params", "grad_scale"), runs["fused"], runs["general"],
                                  (dtype, pd, pd)):
            assert a.shape == b.shape, f"mask {mask} {name}: {tuple(a.shape)} vs {tuple(b.shape)}"
            if a.numel():
                check_close(a, b.double(), dt, f"{method} butterfly d={d} {dtype} mask {mask}: fused vs general {name}")
    assert any(" backward path=butterfly " in p and " grads=0 " in p for p in plans(capfd))  # the adjoint


@pytest.mark.parametrize("kind,d,rows,segment,method,dtype", [
    ("parallel", 120, 20_000, 0, "goft_scaled", F32),   # 16 rows per block of 256 threads (15 of 16 lanes), last group partial
    ("parallel", 120, 20_000, 0, "qgoft", BF16),
    ("parallel", 4096, 1_000, 0, "goft_scaled", BF16),  # the 512-thread instantiation, 2-4 rows per block
    ("parallel", 4096, 1_000, 0, "qgoft", F32),
    ("parallel", 4096, 1_000, 0, "qgoft_scaled", F16),
    ("parallel", 11008, 300, 0, "qgoft", BF16),         # segmented: 3 segments of 4096, top kernel after
    ("parallel", 11008, 300, 0, "goft_scaled", F32),
    ("parallel", 1000, 3_000, 256, "goft", BF16),       # 32-thread segments
    ("parallel", 1024, 3_000, 0, "qgoft_scaled", F64),
    # stacks (whole rows): the kStack instantiation, 512 threads (one block per SM) and any shape (R > 1)
    ("parallel*2", 4096, 1_000, 0, "goft", BF16),
    ("parallel*3", 4096, 300, 0, "qgoft_scaled", F32),
    ("parallel*2", 120, 20_000, 0, "qgoft", F16),
    ("parallel*2", 1024, 3_000, 0, "goft_scaled", F64),
])
def test_prefetch_forward(gen, env, capfd, kind, d, rows, segment, method, dtype):
    """QGOFT_CUDA_FORWARD=prefetch (docs/CUDA.md, "The prefetching forward"): the software-pipelined table
    forward, over persistent grids whose blocks own several row groups, against the float64 reference and
    bitwise equal to the plain table forward (same arithmetic in the same order); a stack's (fused XOR path)
    bitwise equal to its plain forward, base's kernel under reg."""
    env(QGOFT_CUDA_VERBOSE=1, QGOFT_CUDA_XOR="fused", **({"QGOFT_CUDA_SEGMENT": segment} if segment else {}))
    pairs, offsets = make_layout(kind, d, gen)
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F64 if dtype == F64 else F32)
    x = make_tensor((rows,), d, "contiguous", gen, dtype)
    outs = {}
    for forward in ("plain", "prefetch"):
        env(QGOFT_CUDA_FORWARD=forward)
        poison()
        capfd.readouterr()
        outs[forward] = k_forward(method, x, params, pairs, offsets, scale)
        torch.cuda.synchronize()
        seen = [p for p in plans(capfd) if " forward " in p]
        assert len(seen) == 1 and f" prefetch={int(forward == 'prefetch')} " in seen[0], (forward, seen)
    want = ref_chain(method, x.double(), params.double(), pairs, offsets,
                     None if scale is None else scale.double())
    check_close(outs["prefetch"], want, dtype, f"{method} {kind} d={d} rows={rows} {dtype}: prefetch out")
    assert torch.equal(outs["prefetch"], outs["plain"]), "prefetching forward differs from the plain forward"


@pytest.mark.parametrize("d,rows,segment,method,dtype,g_kind", [
    (5000, 600, 0, "qgoft_scaled", BF16, "contiguous"),  # 2 backward segments of 4096: 512-thread instantiation
    (1000, 2_000, 256, "goft", F32, "row_slice"),        # 32-thread segments; grad unaligned (backward vec=0)
])
def test_prefetch_backward_top_pass(gen, env, capfd, d, rows, segment, method, dtype, g_kind):
    """QGOFT_CUDA_FORWARD=prefetch also runs the backward's top pass (segmented rows with parameter gradients:
    the forward kernel recomputing the segment starts, docs/CUDA.md "The prefetching forward") on the
    prefetching forward, which reads only x: gradients against the float64 reference and bitwise equal to the
    plain top pass's."""
    env(QGOFT_CUDA_VERBOSE=1, **({"QGOFT_CUDA_SEGMENT": segment} if segment else {}))
    pairs, offsets = make_layout("parallel", d, gen)
    params, scale = make_params(method, pairs.shape[0], d, gen)
    x = make_tensor((rows,), d, "contiguous", gen, dtype)
    g = make_tensor((rows,), d, g_kind, gen, dtype)
    grads = {}
    for forward in ("plain", "prefetch"):
        env(QGOFT_CUDA_FORWARD=forward)
        poison()
        capfd.readouterr()
        grads[forward] = k_backward(method, g, x, params, pairs, offsets, scale)
        torch.cuda.synchronize()
        seen = [p for p in plans(capfd) if " backward " in p]
        assert len(seen) == 1 and f" top_prefetch={int(forward == 'prefetch')} " in seen[0], (forward, seen)
    want = truth(method, x, g, params, pairs, offsets, scale)
    names = ("grad_x", "grad_params", "grad_scale")
    for name, got, ref_grad, tol_dtype in zip(names, grads["prefetch"], want[1:], (dtype, F32, F32)):
        if ref_grad is not None:
            check_close(got, ref_grad, tol_dtype, f"{method} parallel d={d} rows={rows} {dtype}: prefetch {name}")
    for name, a, b in zip(names, grads["prefetch"], grads["plain"]):
        assert torch.equal(a, b), f"{name}: the prefetching top pass differs from the plain one"


@pytest.mark.parametrize("d,rows,method,dtype,mask,g_kind,pair", [
    (4096, 1_001, "goft", BF16, (True, True, False), "contiguous", 1),         # 1001 rows: blocks own pairs and a last single row
    (4096, 1_000, "goft_scaled", BF16, (True, True, True), "contiguous", 1),
    (4096, 1_000, "qgoft", F16, (True, True, False), "contiguous", 1),
    (4096, 999, "qgoft_scaled", BF16, (False, True, True), "contiguous", 1),   # no grad_x
    (4096, 1_000, "goft_scaled", BF16, (False, False, True), "contiguous", 1),  # the scale gradient alone
    (11008, 301, "goft_scaled", BF16, (True, True, True), "contiguous", 1),   # 3 segments: top layers in warp 0
    (4096, 1_000, "goft", BF16, (True, False, False), "contiguous", 0),       # the adjoint: the reg kernel
    (4096, 1_000, "qgoft", F32, (True, True, False), "contiguous", 0),        # float32: the reg kernel
    (4096, 1_000, "goft", BF16, (True, True, False), "row_slice", 0),         # unaligned grad: the reg kernel
])
def test_pair_backward(gen, env, capfd, d, rows, method, dtype, mask, g_kind, pair):
    """QGOFT_CUDA_BACKWARD=pair (docs/CUDA.md, "The paired reg backward"): the reg backward with two rows per thread
    in flight, where the planner takes it (pair=1 in the plan: 16-bit rows of 512-thread segments with parameter
    gradients; pair=2 under `pair` without the scale's gradient, its instantiations for that; elsewhere the reg
    kernel, pair=0), against the float64 reference and bitwise equal to the reg kernel's results (same arithmetic, same row
    order), run twice (bitwise reproducible); the default (auto) takes it (pair=1) where it applies without the
    scale's gradient."""
    env(QGOFT_CUDA_VERBOSE=1, QGOFT_CUDA_VARIANT="reg")
    pairs, offsets = make_layout("parallel", d, gen)
    params, scale = make_params(method, pairs.shape[0], d, gen)
    x = make_tensor((rows,), d, "contiguous", gen, dtype)
    g = make_tensor((rows,), d, g_kind, gen, dtype)
    grads = {}
    auto_pair = pair if not (scale is not None and mask[2]) else 0
    for backward in ("single", "pair", "pair", "auto"):
        env(QGOFT_CUDA_BACKWARD=backward)
        poison()
        capfd.readouterr()
        got = k_backward(method, g, x, params, pairs, offsets, scale, mask)
        torch.cuda.synchronize()
        seen = [p for p in plans(capfd) if " backward " in p]
        want_pair = {"single": 0, "pair": 2 if auto_pair else pair, "auto": auto_pair}[backward]
        assert len(seen) == 1 and f" pair={want_pair} " in seen[0], (backward, seen)
        if backward in grads:
            assert all(torch.equal(a, b) for a, b in zip(got, grads[backward])), "paired reg backward not reproducible"
        grads[backward] = got
    want = truth(method, x, g, params, pairs, offsets, scale)
    names = ("grad_x", "grad_params", "grad_scale")
    for name, wanted, got, ref_grad, tol_dtype in zip(names, mask, grads["pair"], want[1:], (dtype, F32, F32)):
        if wanted and ref_grad is not None:
            check_close(got, ref_grad, tol_dtype, f"{method} parallel d={d} rows={rows} {dtype}: pair {name}")
    for name, a, b, c in zip(names, grads["pair"], grads["single"], grads["auto"]):
        assert torch.equal(a, b) and torch.equal(c, b), f"{name}: the paired reg backward differs from the reg kernel"


@pytest.mark.parametrize("d,rows,method,dtype,mask,no_l2", [
    (4096, 1_001, "goft", BF16, (True, True, False), True),       # pair=2, one segment: blocks own pairs, a last single row
    (4096, 1_000, "qgoft", F16, (False, True, False), True),      # no grad_x
    (3000, 999, "qgoft", BF16, (True, True, False), True),        # the segment partly past the row
    (11008, 301, "goft", BF16, (True, True, False), False),       # segmented: pair=2 with the prefetch (no such kernel)
    (4096, 1_000, "goft_scaled", BF16, (True, True, True), False),  # the scale's gradient: pair=1, prefetch kept
])
def test_pair_backward_without_l2_prefetch(gen, env, capfd, d, rows, method, dtype, mask, no_l2):
    """QGOFT_CUDA_PAIR_PREFETCH=off under QGOFT_CUDA_BACKWARD=pair (docs/CUDA.md, "The paired `reg` backward without the
    scale's gradient"): rows of one segment without the scale's gradient (pair=2) run the paired kernel's
    instantiation without the L2 prefetch of the pair after the next (pair_prefetch=0 in the plan), elsewhere the
    kernel it would run with `on` (the default); a prefetch changes no result: bitwise the paired kernel's with it and
    the reg kernel's (single). An unknown value names the two."""
    env(QGOFT_CUDA_VERBOSE=1, QGOFT_CUDA_VARIANT="reg")
    pairs, offsets = make_layout("parallel", d, gen)
    params, scale = make_params(method, pairs.shape[0], d, gen)
    x = make_tensor((rows,), d, "contiguous", gen, dtype)
    g = make_tensor((rows,), d, "contiguous", gen, dtype)
    grads = {}
    for backward, prefetch in (("single", "on"), ("pair", "on"), ("pair", "off"), ("pair", "")):
        env(QGOFT_CUDA_BACKWARD=backward, QGOFT_CUDA_PAIR_PREFETCH=prefetch)
        poison()
        capfd.readouterr()
        got = k_backward(method, g, x, params, pairs, offsets, scale, mask)
        torch.cuda.synchronize()
        seen = [p for p in plans(capfd) if " backward " in p]
        off = backward == "pair" and prefetch == "off" and no_l2
        assert len(seen) == 1 and (" pair_prefetch=0 " in seen[0]) == off, (backward, prefetch, seen)
        assert backward == "single" or " pair=0 " not in seen[0], seen
        grads[(backward, prefetch)] = got
    want = truth(method, x, g, params, pairs, offsets, scale)
    names = ("grad_x", "grad_params", "grad_scale")
    for name, wanted, got, ref_grad, tol_dtype in zip(names, mask, grads[("pair", "off")], want[1:], (dtype, F32, F32)):
        if wanted and ref_grad is not None:
            check_close(got, ref_grad, tol_dtype, f"{method} parallel d={d} rows={rows} {dtype}: no L2 prefetch {name}")
    for key in (("pair", "on"), ("pair", ""), ("single", "on")):
        for name, a, b in zip(names, grads[("pair", "off")], grads[key]):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), \
                f"{name}: the paired kernel without the L2 prefetch differs from {key}"
    if no_l2:
        env(QGOFT_CUDA_BACKWARD="pair", QGOFT_CUDA_PAIR_PREFETCH="fast")
        with pytest.raises((RuntimeError, ValueError), match="QGOFT_CUDA_PAIR_PREFETCH must be on or off"):
            k_backward(method, g, x, params, pairs, offsets, scale, mask)


def _with_tops(method):
    return op().quasi_givens_chain_with_tops if is_quasi(method) else op().givens_chain_with_tops


def _backward_op(method):
    return op().quasi_givens_chain_backward if is_quasi(method) else op().givens_chain_backward


@pytest.mark.parametrize("d,rows,segment,variant,method,dtype,mask,cols", [
    (11008, 301, 0, "reg", "goft_scaled", BF16, (True, True, True), 3),   # 3 segments of 4096, reg 512-thread
    (11008, 300, 0, "reg", "qgoft", F32, (True, True, False), 3),
    (5000, 257, 0, "table", "goft", F64, (False, True, True), 2),           # float64: the top pass has no table
    (4100, 300, 0, "reg", "qgoft_scaled", F16, (True, True, True), 2),     # d % 8 != 0: scalar loads
    (1000, 500, 256, "base", "goft", BF16, (True, True, False), 4),         # base with 256-element segments
    (11008, 64, 0, "base", "goft", BF16, (True, True, False), 0),           # base: 8192-element forward segments
    (4096, 64, 0, "reg", "goft", BF16, (True, True, False), 0),             # one segment: no tops
])
def test_saved_tops(gen, env, capfd, d, rows, segment, variant, method, dtype, mask, cols):
    """The forward's segment tops (docs/CUDA.md, "Saved segment tops"): ``*_with_tops`` returns the plain forward's
    output bitwise and (rows, nseg) tops where its segments are the backward's ((rows, 0) elsewhere); the backward
    given them plans no top pass (top_saved=1) and gives bitwise the results of the backward that recomputes them
    (no tops, and QGOFT_CUDA_TOPS=recompute with them), close to the float64 reference; the public function's
    autograd (which saves them) gives the same gradients."""
    env(QGOFT_CUDA_VERBOSE=1, QGOFT_CUDA_VARIANT=variant, **({"QGOFT_CUDA_SEGMENT": segment} if segment else {}))
    pairs, offsets = make_layout("parallel", d, gen)
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F64 if dtype == F64 else F32)
    x = make_tensor((rows,), d, "contiguous", gen, dtype)
    g = make_tensor((rows,), d, "contiguous", gen, dtype)
    poison()
    y, tops = _with_tops(method)(x, params, pairs, offsets, scale)
    assert torch.equal(y, k_forward(method, x, params, pairs, offsets, scale))
    assert tops.shape == (rows, cols) and tops.dtype == (F64 if dtype == F64 else F32) and tops.is_contiguous()
    grads = {}
    for name, given, tops_env in (("recomputed", None, "saved"), ("saved", tops, "saved"),
                                  ("forced", tops, "recompute")):
        env(QGOFT_CUDA_TOPS=tops_env)
        poison()
        capfd.readouterr()
        grads[name] = _backward_op(method)(g, x, params, pairs, offsets, scale, list(mask), given)
        torch.cuda.synchronize()
        seen = [p for p in plans(capfd) if " backward " in p]
        assert len(seen) == 1, seen
        saved = name == "saved" and cols > 0 and (mask[1] or mask[2])
        assert (" top_saved=1" in seen[0]) == saved, (name, seen)
        if saved:
            assert " top_prefetch=" not in seen[0], seen  # no top pass
    for name in ("saved", "forced"):
        for a, b in zip(grads[name], grads["recomputed"]):
            assert torch.equal(a, b), f"backward {name} differs from the backward with its top pass"
    want = truth(method, x, g, params, pairs, offsets, scale)
    for label, wanted, got, ref_grad, tol_dtype in zip(("grad_x", "grad_params", "grad_scale"), mask, grads["saved"],
                                                       want[1:], (dtype, F32, F32)):
        if wanted and ref_grad is not None:
            check_close(got, ref_grad, tol_dtype, f"{method} d={d} rows={rows} {dtype}: saved-tops {label}")
    # autograd: the public function keeps the tops (with_tops in the graph); the same gradients as the backward op
    env(QGOFT_CUDA_TOPS="saved")
    leaves = [t.detach().requires_grad_() for t in (x, params)] + ([] if scale is None else
                                                                  [scale.detach().requires_grad_()])
    out = ops_chain(method, leaves[0], leaves[1], pairs, offsets, leaves[2] if scale is not None else None)
    assert "with_tops" in type(out.grad_fn).__name__
    auto = torch.autograd.grad(out, leaves, g)
    full = _backward_op(method)(g, x, params, pairs, offsets, scale, [True, True, scale is not None])
    for a, b in zip(auto, full):
        assert torch.equal(a, b), "autograd with the saved tops differs from the backward op"


def test_hostile_tops_are_refused(gen, env):
    """Tops that the checks shared with the CPU accept but whose column count is not this backward's segment count
    (another d's, another segment width's, a stale tensor of another shape) are refused before any launch; tops of
    the right shape in another memory layout are copied, not read with the wrong strides; the adjoint and rows of
    one segment ignore them; QGOFT_CUDA_TOPS names its values."""
    d, rows = 11008, 40
    pairs, offsets = make_layout("parallel", d, gen)
    angles, _ = make_params("goft", pairs.shape[0], d, gen)
    x = make_tensor((rows,), d, "contiguous", gen, BF16)
    g = make_tensor((rows,), d, "contiguous", gen, BF16)
    _, tops = op().givens_chain_with_tops(x, angles, pairs, offsets, None)
    assert tops.shape == (rows, 3)
    want = k_backward("goft", g, x, angles, pairs, offsets, None, (True, True, False))
    for bad in (torch.zeros(rows, 2, device=DEV), torch.zeros(rows, 4, device=DEV),
                torch.zeros(rows, 33, device=DEV)):
        with pytest.raises(RuntimeError, match=r"qgoft::givens_chain_backward: tops must have shape \(rows, "
                                               rf"segments\) = \({rows}, 3\) for this backward's segments"):
            op().givens_chain_backward(g, x, angles, pairs, offsets, None, [True, True, False], bad)
    strided = torch.empty(3, rows, device=DEV).t().copy_(tops)  # (rows, 3), column-major
    assert not strided.is_contiguous()
    got = op().givens_chain_backward(g, x, angles, pairs, offsets, None, [True, True, False], strided)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    adjoint = op().givens_chain_backward(g, x, angles, pairs, offsets, None, [True, False, False],
                                         torch.zeros(rows, 5, device=DEV))
    assert torch.equal(adjoint[0], op().givens_chain_backward(g, x, angles, pairs, offsets, None,
                                                              [True, False, False])[0])
    env(QGOFT_CUDA_TOPS="fast")
    with pytest.raises((RuntimeError, ValueError), match="QGOFT_CUDA_TOPS must be saved or recompute"):
        op().givens_chain_backward(g, x, angles, pairs, offsets, None, [True, True, False], tops)


def test_saved_tops_under_torch_compile(gen):
    """torch.compile of a training step through the public function: compiled graphs run the plain forward op (the
    tops' column count is data-dependent, qgoft/ops.py) and their backward recomputes the tops; eager keeps them.
    The same output and gradients either way, bitwise."""
    d, rows = 5000, 64
    pairs, offsets = make_layout("parallel", d, gen)
    blocks, scale = make_params("qgoft_scaled", pairs.shape[0], d, gen)
    x = make_tensor((rows,), d, "contiguous", gen, BF16)

    def step(x, blocks, scale):
        y = qops.quasi_givens_chain(x, blocks, pairs, offsets, scale)
        return y, torch.autograd.grad(y.float().square().sum(), (blocks, scale))

    leaves = [blocks.detach().requires_grad_(), scale.detach().requires_grad_()]
    want = step(x, *leaves)
    got = torch.compile(step, fullgraph=False)(x, *leaves)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("d,reps,rows,method,dtype,mask,stack_reg", [
    (4096, 2, 7, "goft", BF16, (True, True, False), 1),             # fewer rows than blocks
    (4096, 2, 1_001, "goft_scaled", BF16, (True, True, True), 1),   # blocks own several rows
    (4096, 2, 700, "qgoft", F32, (True, True, False), 1),
    (4096, 2, 333, "qgoft_scaled", F16, (False, True, True), 1),    # no grad_x
    (4096, 2, 300, "goft_scaled", F32, (False, False, True), 1),    # the scale gradient alone
    (4000, 2, 65, "goft", BF16, (True, True, False), 1),            # chunks past d (zeros)
    (2056, 2, 65, "qgoft", F32, (True, True, False), 1),            # 257 of 512 threads in the row
    (4096, 3, 20, "goft", BF16, (True, True, False), 0),            # k = 3: its shared memory does not fit
    (4096, 2, 50, "goft", BF16, (True, False, False), 0),           # the adjoint: the stacked kernel
    (4096, 2, 50, "qgoft", F64, (True, True, False), 0),            # float64 (the general kernels at d = 4096)
    (2048, 2, 50, "goft", BF16, (True, True, False), 0),            # rows of 2048: 256 threads, the stacked kernel
])
def test_reg_stacked_backward(gen, env, capfd, d, reps, rows, method, dtype, mask, stack_reg):
    """The reg stacked backward (docs/CUDA.md, "The `reg` stacked backward"): stack(parallel(d), k) under
    QGOFT_CUDA_VARIANT=reg runs parallel_stack_reg_kernel where the planner takes it (reg=1 in the stack's backward
    plan: k = 2, float accumulation, 16-byte rows of 2049-4096 elements, parameter gradients; elsewhere the stacked
    kernel or the general ones, reg=0), against the float64 reference, against the general kernels
    (QGOFT_CUDA_XOR=general) and the stacked kernel it replaced (QGOFT_CUDA_VARIANT=base) to rounding, and bitwise
    reproducible over two runs. (Bitwise equality with the stacked kernel is proved in the host emulation, whose
    arithmetic has no contraction choices; on the GPU the two are compiled separately.)"""
    env(QGOFT_CUDA_VERBOSE=1)
    lay = f"parallel*{reps}"
    pairs, offsets = make_layout(lay, d, gen)
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F64 if dtype == F64 else F32)
    x = make_tensor((rows,), d, "contiguous", gen, dtype)
    g = make_tensor((rows,), d, "contiguous", gen, dtype)
    grads = {}
    for name, variant, xor in (("reg", "reg", "fused"), ("reg again", "reg", "fused"), ("stacked", "base", "fused"),
                               ("general", "reg", "general")):
        env(QGOFT_CUDA_VARIANT=variant, QGOFT_CUDA_XOR=xor)
        poison()
        capfd.readouterr()
        grads[name] = k_backward(method, g, x, params, pairs, offsets, scale, mask)
        torch.cuda.synchronize()
        seen = [p for p in plans(capfd) if " backward " in p]
        assert len(seen) == 1, (name, seen)
        if name == "reg":
            fused = not (dtype == F64 and d == 4096)
            assert (f"path=stack reps={reps} " in seen[0]) == fused, seen
            assert (" reg=1 " in seen[0]) == bool(stack_reg), seen
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads["reg"], grads["reg again"])), \
        "not bitwise reproducible"
    want = truth(method, x, g, params, pairs, offsets, scale)
    names = ("grad_x", "grad_params", "grad_scale")
    pd = F64 if dtype == F64 else F32
    for k, (name, wanted, ref_grad, tol_dtype) in enumerate(zip(names, mask, want[1:], (dtype, pd, pd))):
        if not wanted or ref_grad is None:
            continue
        tag = f"{method} {lay} d={d} rows={rows} {dtype}: {name}"
        check_close(grads["reg"][k], ref_grad, tol_dtype, f"{tag} (reg)")
        for other in ("stacked", "general"):
            check_close(grads["reg"][k], grads[other][k], tol_dtype, f"{tag}: reg against {other}")


@pytest.mark.parametrize("var,kind,message", [
    ("QGOFT_CUDA_XOR", "parallel*2", "QGOFT_CUDA_XOR must be general, stack or fused"),
    ("QGOFT_CUDA_FORWARD", "parallel", "QGOFT_CUDA_FORWARD must be plain or prefetch"),
    ("QGOFT_CUDA_REDUCE", "parallel", "QGOFT_CUDA_REDUCE must be split or serial"),  # read by the backward
    ("QGOFT_CUDA_BACKWARD", "parallel", "QGOFT_CUDA_BACKWARD must be auto, single or pair"),  # read by the backward
])
def test_switch_rejects_unknown_values(gen, env, var, kind, message):
    """A switch the planner reads names its values: those of the forward fail at the forward call, those read by
    the backward's planner only at the backward call."""
    env(**{var: "fast"})
    pairs, offsets = make_layout(kind, 64, gen)
    params, _ = make_params("goft", pairs.shape[0], 64, gen)
    x = torch.randn(4, 64, device=DEV)
    with pytest.raises((RuntimeError, ValueError), match=message):
        k_forward("goft", x, params, pairs, offsets, None)
        k_backward("goft", x, x, params, pairs, offsets, None)


@pytest.mark.parametrize("kind,d,rows,method,dtype", [
    ("parallel", 384, 2048, "qgoft", BF16),            # all-MiniLM-L6-v2's shapes (an H100: 264 slots, 64 lanes)
    ("parallel", 1536, 2048, "goft", BF16),
    ("parallel", 1001, 2000, "qgoft_scaled", F32),     # d % 4 != 0: the last scale item loads entry by entry
    ("parallel", 4096, 3000, "goft_scaled", BF16),
    ("parallel", 11008, 300, "qgoft_scaled", BF16),    # segmented: fewer slots (3 segment columns)
    ("parallel", 1024, 3000, "goft_scaled", F64),      # float64 accumulation
    ("custom", 200, 5000, "qgoft_scaled", F32),        # general kernels
])
def test_split_reduction(gen, env, capfd, kind, d, rows, method, dtype):
    """QGOFT_CUDA_REDUCE=split (the default; docs/CUDA.md, "Deterministic reduction"): each item's slots spread
    over several lanes and a fixed tree. Parameter and scale gradients against the float64 reference, bitwise
    equal over repeated runs (fresh poisoned memory each), and the serial reduction (one thread per item, every
    slot in order) on the same inputs against the reference too; the plans show the lanes."""
    env(QGOFT_CUDA_VERBOSE=1)
    pairs, offsets = make_layout(kind, d, gen)
    params, scale = make_params(method, pairs.shape[0], d, gen, dtype=F64 if dtype == F64 else F32)
    x = make_tensor((rows,), d, "contiguous", gen, dtype)
    g = make_tensor((rows,), d, "contiguous", gen, dtype)
    want = truth(method, x, g, params, pairs, offsets, scale)
    names = ("grad_x", "grad_params", "grad_scale")
    for reduce in ("split", "serial"):
        env(QGOFT_CUDA_REDUCE=reduce)
        runs = []
        for _ in range(3 if reduce == "split" else 1):
            poison()
            capfd.readouterr()
            runs.append(k_backward(method, g, x, params, pairs, offsets, scale))
            torch.cuda.synchronize()
            seen = [p for p in plans(capfd) if " backward " in p]
            lanes = re.search(r" slots=(\d+) reduce_lanes=(\d+) ", seen[0]) if len(seen) == 1 else None
            assert lanes, seen
            slots, lanes = int(lanes.group(1)), int(lanes.group(2))
            assert lanes == 1 if reduce == "serial" else (lanes > 1) == (slots > 8), (reduce, seen)
        for name, got, ref_grad, tol_dtype in zip(names, runs[0], want[1:], (dtype, F32, F32)):
            if ref_grad is not None:
                check_close(got, ref_grad, F64 if dtype == F64 else tol_dtype,
                            f"{method} {kind} d={d} rows={rows} {dtype} reduce={reduce}: {name}")
        for other in runs[1:]:
            for name, a, b in zip(names, runs[0], other):
                assert torch.equal(a, b), f"{name}: the split reduction differs between runs"


def test_path_selection(gen, env, capfd):
    """The defaults (QGOFT_CUDA_VARIANT=reg, QGOFT_CUDA_XOR=stack): which kernels each layout gets."""
    env(QGOFT_CUDA_VERBOSE=1)
    for kind, d, want_fwd, want_bwd in [
        ("parallel", 4096, "path=parallel T=512 R=1 nseg=1", "path=parallel T=512 R=1 nseg=1"),
        ("parallel", 100, "path=parallel T=16 R=16 nseg=1", "path=parallel T=16 R=16 nseg=1"),
        ("parallel", 20000, "path=parallel T=512 R=1 nseg=5 vec=1 table=4096", "path=parallel T=512 R=1 nseg=5"),
        ("butterfly", 4096, "path=general(smem)", "path=general"),  # rows in smem iff the opt-in limit >= 224 KiB
        ("butterfly", 8192, "path=general(smem)", "path=general(global)"),
        ("sequential", 4096, "path=general(smem)", "path=general(smem) acc_in_smem=1"),
        ("parallel*2", 4096, "path=stack reps=2 T=512", "path=stack reps=2 T=512"),  # QGOFT_CUDA_XOR unset: stack
    ]:
        pairs, offsets = make_layout(kind, d, gen)
        params, _ = make_params("goft", pairs.shape[0], d, gen)
        x = torch.randn(16, d, device=DEV, dtype=BF16)
        capfd.readouterr()
        k_forward("goft", x, params, pairs, offsets, None)
        k_backward("goft", x, x, params, pairs, offsets, None)
        seen = plans(capfd)
        fwd = [p for p in seen if " forward " in p]
        bwd = [p for p in seen if " backward " in p]
        assert len(fwd) == 1 and want_fwd in fwd[0], (kind, d, seen)
        assert len(bwd) == 1 and want_bwd in bwd[0], (kind, d, seen)


# ------------------------------------------------------------------------------------------------
# 4. Determinism, masks, the adjoint.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("method", ["goft_scaled", "qgoft_scaled"])
@pytest.mark.parametrize("kind,d,rows,path", [
    ("parallel", 300, 20_000, "auto"),     # several row slots per block, persistent grid
    ("parallel", 4096, 3_000, "auto"),     # 512 threads per row
    ("parallel", 10_000, 700, "auto"),     # segmented
    ("custom", 200, 5_000, "auto"),        # general, shared memory
    ("parallel", 500, 2_000, "global"),    # general, global memory
])
def test_bitwise_deterministic(gen, env, dtype, method, kind, d, rows, path):
    env(QGOFT_CUDA_PATH=path)
    pairs, offsets = make_layout(kind, d, gen)
    params, scale = make_params(method, pairs.shape[0], d, gen)
    x = make_tensor((rows,), d, "contiguous", gen, dtype)
    g = make_tensor((rows,), d, "contiguous", gen, dtype)
    results = []
    for _ in range(3):
        poison()
        out = k_forward(method, x, params, pairs, offsets, scale)
        results.append((out,) + tuple(k_backward(method, g, x, params, pairs, offsets, scale)))
    for name, a, b, c in zip(["out", "grad_x", "grad_params", "grad_scale"], *results):
        assert torch.equal(a, b) and torch.equal(a, c), f"{name}: runs differ"


@pytest.mark.parametrize("method", OP_VARIANTS)
@pytest.mark.parametrize("kind,d", [("parallel", 5000), ("custom", 100)])
def test_output_mask_subsets_segmented_and_general(gen, method, kind, d):
    """The segmented parallel kernels and the general ones, per output_mask (tests/test_ops.py has the
    register-path case, parallel d = 100, on every device)."""
    pairs, offsets = make_layout(kind, d, gen)
    params, scale = make_params(method, pairs.shape[0], d, gen)
    x = make_tensor((300,), d, "contiguous", gen, BF16)
    g = make_tensor((300,), d, "contiguous", gen, BF16)
    full = k_backward(method, g, x, params, pairs, offsets, scale)
    for mask in itertools.product([False, True], repeat=3):
        outs = k_backward(method, g, x, params, pairs, offsets, scale, mask)
        for k, (want, got) in enumerate(zip(full, outs)):
            if mask[k] and want.numel() > 0:
                if k == 0:  # grad_x may come from the kernel variant without parameter gradients
                    check_close(got, want.double(), BF16, f"mask {mask}: grad_x", factor=1)
                else:
                    assert torch.equal(got, want), f"mask {mask}: output {k} differs from the full backward"
            else:
                assert got.shape == (0,), f"mask {mask}: output {k} should be empty, got {tuple(got.shape)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,d", [("parallel", 6000)])
def test_adjoint_does_not_read_x_segmented(gen, dtype, kind, d):
    """The segmented adjoint kernel (tests/test_ops.py has the small layouts on every device)."""
    pairs, offsets = make_layout(kind, d, gen)
    params, scale = make_params("qgoft_scaled", pairs.shape[0], d, gen, dtype=F64 if dtype == F64 else F32)
    g = make_tensor((45,), d, "contiguous", gen, dtype)
    x_nan = torch.full((45, d), float("nan"), dtype=dtype, device=DEV)
    gx, gp, gs = k_backward("qgoft_scaled", g, x_nan, params, pairs, offsets, scale, [True, False, False])
    assert torch.isfinite(gx).all() and gp.shape == (0,) and gs.shape == (0,)
    want = ref.quasi_givens_chain_adjoint_reference(g.double(), params.double(), pairs, offsets, scale.double())
    check_close(gx, want, dtype, "adjoint")
    adj = qops.quasi_givens_chain_adjoint(g, params, pairs, offsets, scale)
    assert torch.equal(adj, gx)


# ------------------------------------------------------------------------------------------------
# 5. Edge cases, checks and errors.
# ------------------------------------------------------------------------------------------------


def test_params_in_other_dtypes_and_layouts(gen):
    """bfloat16 / non-contiguous / offset parameters are converted (as on the CPU)."""
    d = 16
    pairs, offsets = make_layout("butterfly", d, gen)
    params, scale = make_params("qgoft_scaled", pairs.shape[0], d, gen)
    x = make_tensor((5,), d, "contiguous", gen, F32)
    want = ref_chain("qgoft", x.double(), params.double(), pairs, offsets, scale.double())
    params_nc = params.transpose(1, 2).contiguous().transpose(1, 2)
    params_offset = torch.cat([torch.zeros(1, 2, 2, device=DEV), params])[1:]  # 16-byte misaligned
    scale_nc = torch.stack([scale, scale], 1)[:, 1]
    for p, s in [(params_nc, scale), (params_offset, scale_nc), (params.to(BF16).float(), scale)]:
        got = k_forward("qgoft", x, p, pairs, offsets, s)
        check_close(got, ref_chain("qgoft", x.double(), p.double(), pairs, offsets, s.double()), F32, "out")
    check_close(k_forward("qgoft", x, params_nc, pairs.t().contiguous().t(),
                          torch.stack([offsets, offsets], 1)[:, 0], scale), want, F32, "non-contiguous layout")
    angles = 1.5 * torch.randn(pairs.shape[0], generator=gen).to(DEV)
    got = k_forward("goft", x, angles.to(BF16), pairs, offsets, None)
    check_close(got, ref_chain("goft", x.double(), angles.to(BF16).double(), pairs, offsets), F32, "bf16 angles")


def test_device_mismatch_errors(gen):
    d = 8
    pairs, offsets = make_layout("parallel", d, gen)
    x = torch.randn(3, d, device=DEV)
    angles = torch.zeros(d - 1, device=DEV)
    cases = [
        ("angles", lambda: op().givens_chain(x, angles.cpu(), pairs, offsets, None)),
        ("pairs", lambda: op().givens_chain(x, angles, pairs.cpu(), offsets, None)),
        ("layer_offsets", lambda: op().givens_chain(x, angles, pairs, offsets.cpu(), None)),
        ("scale", lambda: op().givens_chain(x, angles, pairs, offsets, torch.ones(d))),
        ("blocks", lambda: op().quasi_givens_chain(x, torch.zeros(d - 1, 2, 2), pairs, offsets, None)),
        ("grad_out", lambda: op().givens_chain_backward(x.cpu(), x, angles, pairs, offsets, None,
                                                        [True, True, False])),
        ("angles", lambda: op().givens_chain(x.cpu(), angles, pairs.cpu(), offsets.cpu(), None)),
    ]
    for name, call in cases:
        with pytest.raises(RuntimeError, match=rf"{name} must be on the same device as x"):
            call()


def test_layout_cache_sees_in_place_changes(gen):
    """Validated layouts are cached per tensor and version: an in-place change is re-validated."""
    d = 16
    pairs, offsets = make_layout("parallel", d, gen)
    angles = torch.randn(d - 1, device=DEV)
    x = torch.randn(4, d, device=DEV)
    y1 = op().givens_chain(x, angles, pairs, offsets, None)
    with torch.no_grad():
        pairs[[0, 1]] = pairs[[1, 0]]  # still valid (order inside layer 1 changes): other result
    y2 = op().givens_chain(x, angles, pairs, offsets, None)
    check_close(y2, ref.givens_chain_reference(x.double(), angles.double(), pairs, offsets), F32, "after swap")
    assert not torch.equal(y1, y2)
    with torch.no_grad():
        pairs[1] = pairs[0]  # now invalid
    with pytest.raises(RuntimeError, match="overlaps another pair"):
        op().givens_chain(x, angles, pairs, offsets, None)


def test_inference_mode_layout_tensors(gen):
    d = 64
    with torch.inference_mode():
        pairs, offsets = make_layout("parallel", d, gen)
        params, scale = make_params("goft_scaled", pairs.shape[0], d, gen)
        x = make_tensor((7,), d, "contiguous", gen, F32)
        out = k_forward("goft_scaled", x, params, pairs, offsets, scale)
    check_close(out, ref_chain("goft_scaled", x.double(), params.double(), pairs, offsets, scale.double()),
                F32, "inference mode")


def test_side_stream(gen):
    d = 3000
    pairs, offsets = make_layout("parallel", d, gen)
    params, scale = make_params("qgoft_scaled", pairs.shape[0], d, gen)
    k_forward("qgoft_scaled", torch.zeros(1, d, device=DEV), params, pairs, offsets, scale)  # warm the cache
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.randn(4000, d, device=DEV)
        out = k_forward("qgoft_scaled", x, params, pairs, offsets, scale)
        gx, gp, gs = k_backward("qgoft_scaled", out, x, params, pairs, offsets, scale)
    s.synchronize()
    want = truth("qgoft_scaled", x, out, params, pairs, offsets, scale)
    check_close(out, want[0], F32, "out on a side stream")
    check_close(gp, want[2], F32, "grad_params on a side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(gen):
    d = 500
    with torch.cuda.device(0):
        pairs, offsets = make_layout("parallel", d, gen, device="cuda:1")
        params, scale = make_params("qgoft_scaled", pairs.shape[0], d, gen, device="cuda:1")
        x = make_tensor((33,), d, "contiguous", gen, F32, device="cuda:1")
        out = k_forward("qgoft_scaled", x, params, pairs, offsets, scale)
        assert out.device == x.device
        check_close(out, ref_chain("qgoft_scaled", x.double(), params.double(), pairs, offsets, scale.double()),
                    F32, "cuda:1")
        with pytest.raises(RuntimeError, match="must be on the same device as x"):
            k_forward("qgoft_scaled", x, params.to("cuda:0"), pairs, offsets, scale)


# ------------------------------------------------------------------------------------------------
# 6. qgoft.nn.Linear on CUDA, end to end.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,layout", [("goft", "parallel"), ("goft_scaled", "parallel"), ("qgoft", "parallel"),
                                           ("goft", "butterfly"), ("qgoft", "sequential")])
@pytest.mark.parametrize("base_dtype", [F32, BF16], ids=str)
def test_linear_end_to_end(gen, method, layout, base_dtype):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    d, n = 256, 192
    base = torch.nn.Linear(d, n, dtype=base_dtype)
    lin_cpu = qgoft.nn.Linear.from_linear(base, method=method, layout=layout)
    with torch.no_grad():
        for p in lin_cpu.adapter_parameters():
            p.add_(0.3 * torch.randn_like(p))
    lin = copy.deepcopy(lin_cpu).to(DEV)
    assert all(p.device.type == "cuda" and p.dtype == F32 for p in lin.adapter_parameters())
    x_cpu = torch.randn(4, 33, d, dtype=base_dtype)
    x = x_cpu.to(DEV).requires_grad_()
    x_cpu.requires_grad_()
    assert qops.uses_compiled_kernel(x)
    y, y_cpu = lin(x), lin_cpu(x_cpu)
    low = base_dtype != F32
    tol = dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.cpu().float(), y_cpu.float(), **tol)
    y.float().square().sum().backward()
    y_cpu.float().square().sum().backward()
    torch.testing.assert_close(x.grad.cpu().float(), x_cpu.grad.float(), **tol)
    for p, q in zip(lin.adapter_parameters(), lin_cpu.adapter_parameters()):
        assert p.grad is not None and p.grad.dtype == F32
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=5e-2 if low else 1e-3,
                                   atol=5e-2 * q.grad.abs().max().item() if low else 1e-3)
    # merge / unmerge
    with torch.no_grad():
        original = lin.weight.detach().clone()
        before = lin(x)
        merged_w = lin.merged_weight()
        torch.testing.assert_close(merged_w.cpu(), lin_cpu.merged_weight(), rtol=1e-4, atol=1e-4)
        lin.merge()
        after = lin(x)
        torch.testing.assert_close(after.float(), before.float(), **(dict(rtol=5e-2, atol=5e-2) if low else tol))
        lin.unmerge()
        assert torch.equal(lin.weight, original)
        assert torch.equal(lin(x), before)


# ------------------------------------------------------------------------------------------------
# 7. CUDA graphs (last: a failing capture can disturb later tests).
# ------------------------------------------------------------------------------------------------

def test_cuda_graph_capture_after_warmup(gen):
    d = 4096
    pairs, offsets = make_layout("parallel", d, gen)
    params, scale = make_params("goft_scaled", pairs.shape[0], d, gen)
    x_static = torch.randn(64, d, device=DEV, dtype=BF16)
    g_static = torch.randn(64, d, device=DEV, dtype=BF16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up validates and caches the layout
        for _ in range(2):
            k_forward("goft_scaled", x_static, params, pairs, offsets, scale)
            k_backward("goft_scaled", g_static, x_static, params, pairs, offsets, scale)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = k_forward("goft_scaled", x_static, params, pairs, offsets, scale)
        grads_static = k_backward("goft_scaled", g_static, x_static, params, pairs, offsets, scale)
    for _ in range(2):
        x_static.copy_(torch.randn(64, d, device=DEV, dtype=BF16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_static, k_forward("goft_scaled", x_static, params, pairs, offsets, scale))
        eager = k_backward("goft_scaled", g_static, x_static, params, pairs, offsets, scale)
        for a, b in zip(grads_static, eager):
            assert torch.equal(a, b)


def test_first_use_during_capture_is_a_clear_error(gen):
    d = 64
    pairs, offsets = make_layout("parallel", d, gen)
    params, _ = make_params("goft", pairs.shape[0], d, gen)
    x = torch.randn(8, d, device=DEV)
    fresh_pairs = pairs.clone()  # never validated
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capture"):
        with torch.cuda.graph(graph):
            k_forward("goft", x, params, fresh_pairs, offsets, None)
    torch.cuda.synchronize()
    out = k_forward("goft", x, params, fresh_pairs, offsets, None)  # the context is still usable
    check_close(out, ref_chain("goft", x.double(), params.double(), pairs, offsets), F32, "after capture")
