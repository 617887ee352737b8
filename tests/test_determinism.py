"""Determinism: outputs and gradients are bitwise identical run to run and for 1, 2 and 4 threads on the CPU
(for each CPU kernel variant), across processes, and run to run on CUDA (the ``backend`` / ``device`` fixtures
of tests/conftest.py; the thread counts change nothing there).

The parameter gradient is a reduction over all rows; the kernels reduce fixed chunks of rows (their size
depends only on the problem size and the tile height) and then sum the chunks in a fixed order, so the
thread count never changes the bits. ``torch.set_num_threads`` sets the OpenMP team the kernels'
``at::parallel_for`` uses: ``test_set_num_threads_changes_the_kernel_team`` checks that a 4-thread call
really runs on 4 OS threads, so the in-process comparisons do compare different thread counts.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qgoft
from qgoft import layouts
from qgoft.nn import Linear
from chain_helpers import OP_VARIANTS, is_quasi  # noqa: E402

pytestmark = pytest.mark.skipif(not qgoft.extension_loaded(), reason="compiled extension not loaded")

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
THREADS = (1, 2, 4)


def problem(method, dtype, rows=2000, d=130, kind="parallel", seed=0, device="cpu"):
    """(x, g, params, pairs, offsets, scale); 2000 rows are ~30 reduction chunks of 64 rows or more."""
    gen = torch.Generator().manual_seed(seed)
    lay = {"parallel": layouts.parallel, "butterfly": layouts.butterfly,
           "sequential": layouts.sequential}[kind](d)
    num_pairs = lay.num_pairs
    pdtype = F64 if dtype == F64 else F32
    if is_quasi(method):
        params = torch.eye(2, dtype=F64) + 0.5 * torch.randn(num_pairs, 2, 2, generator=gen, dtype=F64)
    else:
        params = 1.5 * torch.randn(num_pairs, generator=gen, dtype=F64)
    scale = 1.0 + 0.3 * torch.randn(d, generator=gen, dtype=F64) if method.endswith("_scaled") else None
    x = torch.randn(rows, d, generator=gen, dtype=F64)
    g = torch.randn(rows, d, generator=gen, dtype=F64)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), g.to(dtype=dtype, **to), params.to(dtype=pdtype, **to),
            lay.pairs_tensor(device).clone(), lay.layer_offsets_tensor(device).clone(),
            None if scale is None else scale.to(dtype=pdtype, **to))


def op_results(method, x, g, params, pairs, offsets, scale):
    """Forward output and the full backward (grad x, grad params, grad scale) of the compiled ops."""
    fwd = torch.ops.qgoft.quasi_givens_chain if is_quasi(method) else torch.ops.qgoft.givens_chain
    bwd = torch.ops.qgoft.quasi_givens_chain_backward if is_quasi(method) else torch.ops.qgoft.givens_chain_backward
    out = fwd(x, params, pairs, offsets, scale)
    return (out,) + tuple(bwd(g, x, params, pairs, offsets, scale, [True, True, True]))


def autograd_results(method, x, g, params, pairs, offsets, scale):
    """The same through qgoft.ops and autograd (what training runs)."""
    leaves = [x.clone().requires_grad_(), params.clone().requires_grad_()]
    if scale is not None:
        leaves.append(scale.clone().requires_grad_())
    fn = qgoft.ops.quasi_givens_chain if is_quasi(method) else qgoft.ops.givens_chain
    out = fn(leaves[0], leaves[1], pairs, offsets, leaves[2] if scale is not None else None)
    return (out.detach(),) + torch.autograd.grad(out, leaves, g)


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_bitwise(a, b, what):
    names = ["out", "grad_x", "grad_params", "grad_scale", "grad_scale"]
    assert len(a) == len(b)
    for name, u, v in zip(names, a, b):
        assert u.dtype == v.dtype and u.shape == v.shape, f"{what}: {name}"
        assert torch.equal(u.view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), f"{what}: {name} differs"


@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=str)
@pytest.mark.parametrize("method", OP_VARIANTS)
def test_bitwise_run_to_run_and_for_1_2_4_threads(backend, num_threads, method, dtype):
    # on CUDA a bigger problem: several row groups per backward block, several blocks
    args = problem(method, dtype, device=backend, **(dict(rows=5000, d=1000) if backend == "cuda" else {}))
    num_threads(2)
    first = op_results(method, *args)
    assert_bitwise(first, op_results(method, *args), "run to run (2 threads)")
    for n in THREADS:
        num_threads(n)
        assert_bitwise(first, op_results(method, *args), f"{n} threads vs 2")
        assert_bitwise(first, op_results(method, *args), f"{n} threads, second run")
    if backend == "cuda":
        a = autograd_results(method, *args)
        assert_bitwise(a, autograd_results(method, *args), "autograd run to run")


@pytest.mark.parametrize("method", OP_VARIANTS)
def test_autograd_gradients_bitwise_for_1_2_4_threads(device, num_threads, method):
    args = problem(method, F32, rows=3000, d=200, kind="butterfly", seed=1, device=device)
    results = {}
    for n in THREADS + (1,):
        num_threads(n)
        got = autograd_results(method, *args)
        if n in results:
            assert_bitwise(results[n], got, f"{n} threads, run to run")
        results[n] = got
    assert_bitwise(results[1], results[2], "1 vs 2 threads")
    assert_bitwise(results[1], results[4], "1 vs 4 threads")


@pytest.mark.parametrize("method", ["goft", "goft_scaled", "qgoft"])
def test_linear_training_steps_bitwise_run_to_run(device, num_threads, method):
    """Training steps of qgoft.nn.Linear (forward, loss, backward, Adam) are reproducible run to run.

    Across thread counts only qgoft's own part is promised (the tests above): torch's matmul and mean may
    split their reductions by thread count, which changes the gradient arriving at the adapter."""
    def run():
        torch.manual_seed(3)
        layer = Linear(96, 40, method=method).to(device)
        opt = torch.optim.Adam(layer.adapter_parameters(), lr=0.05)
        x = torch.randn(1500, 96).to(device)
        target = torch.randn(1500, 40).to(device)
        for _ in range(3):
            opt.zero_grad()
            loss = (layer(x) - target).square().mean() + 0.01 * layer.orthogonality_penalty()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in layer.adapter_parameters()] + [loss.detach().reshape(1)]

    for n in (1, 2):
        num_threads(n)
        first = run()
        for a, b in zip(first, run()):
            assert torch.equal(a, b), f"{n} threads: two runs differ"


_CHILD = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)   # inputs are made on one thread, so only the kernel call below can grow the team
    sys.path.insert(0, sys.argv[1])
    import test_determinism as t
    def os_threads():
        return len(os.listdir("/proc/self/task"))
    report = {"digests": {}, "threads": {}}
    for method in ("goft_scaled", "qgoft_scaled"):
        args = t.problem(method, t.F32)
        for n in t.THREADS:
            torch.set_num_threads(n)
            before = os_threads()
            report["digests"].setdefault(method, {})[str(n)] = t.digest(t.op_results(method, *args))
            if method == "goft_scaled":  # 1, then 2, then 4 threads: the team can only grow
                report["threads"][str(n)] = [before, os_threads()]
    print(json.dumps(report))
""")


def test_set_num_threads_changes_the_kernel_team_and_bits_match_across_processes(num_threads):
    """In a fresh process: a 4-thread call runs on (at least) 4 OS threads, a 1-thread call adds none, and
    the gradients of 1, 2 and 4 threads there are bitwise those of this process."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.dirname(__file__)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # the OpenMP team: a 1-thread call adds no thread; after the 4-thread calls there are >= 4 (main included)
    threads = report["threads"]
    assert threads["1"][1] == threads["1"][0], report
    assert threads["4"][1] >= 4 and threads["4"][1] > threads["2"][1] >= threads["1"][1], report
    num_threads(2)
    for method in ("goft_scaled", "qgoft_scaled"):
        here = digest(op_results(method, *problem(method, F32)))
        for n in THREADS:
            assert report["digests"][method][str(n)] == here, f"{method}: {n} threads in a fresh process differ"
