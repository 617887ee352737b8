"""Concurrent calls from several Python threads give the single-threaded results, bitwise.

The ops release the GIL inside the kernels (as every ATen op does), so Python threads really run them at
the same time, each opening its own intra-op OpenMP team. The CPU kernels keep no mutable global state
(except the ISA selection, which these tests do not change) and reduce parameter gradients in a fixed
order, so every result must equal the one computed alone, bit for bit. Run by tools/check_sanitizers.sh
under AddressSanitizer + UndefinedBehaviorSanitizer as well.
"""
from __future__ import annotations

import copy
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import qgoft
from qgoft import layouts
from qgoft import ops as qops

pytestmark = pytest.mark.skipif(not qgoft.extension_loaded(),
                                reason="compiled extension not loaded (QGOFT_ALLOW_FALLBACK=1)")

NUM_WORKERS = 8
ROUNDS = 3


def _layout(kind: str, d: int) -> layouts.Layout:
    if kind == "custom":
        g = torch.Generator().manual_seed(d)
        layers = []
        for _ in range(3):
            perm = torch.randperm(d, generator=g).tolist()
            layers.append([tuple(sorted(perm[2 * k:2 * k + 2])) for k in range(max(1, d // 3))])
        return layouts.custom(d, layers)
    if kind == "parallel*2":
        return layouts.stack(layouts.parallel(d), 2)
    return {"parallel": layouts.parallel, "sequential": layouts.sequential,
            "butterfly": layouts.butterfly}[kind](d)


# (method, layout kind, d, leading shape, dtype): different widths, row counts (several tiles, ragged
# ends), layouts and dtypes, so concurrent calls run different code paths at the same time.
OP_JOBS = [
    ("goft", "parallel", 64, (203,), torch.float32),
    ("goft_scaled", "sequential", 13, (7, 11), torch.float32),
    ("qgoft", "butterfly", 32, (150,), torch.float32),
    ("qgoft_scaled", "custom", 40, (3, 37), torch.float32),
    ("goft", "parallel*2", 100, (65,), torch.bfloat16),
    ("qgoft", "parallel", 257, (33,), torch.float16),
    ("qgoft_scaled", "parallel", 24, (129,), torch.float64),
    ("goft_scaled", "butterfly", 16, (1,), torch.float32),
    ("qgoft", "sequential", 5, (0,), torch.float32),
    ("goft", "custom", 96, (2, 41), torch.bfloat16),
]


def _make_op_job(index: int):
    method, kind, d, shape, dtype = OP_JOBS[index]
    g = torch.Generator().manual_seed(100 + index)
    lay = _layout(kind, d)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    if method.startswith("qgoft"):
        params = torch.eye(2, dtype=pdtype) + 0.5 * torch.randn(lay.num_pairs, 2, 2, generator=g, dtype=pdtype)
    else:
        params = 1.5 * torch.randn(lay.num_pairs, generator=g, dtype=pdtype)
    scale = (1 + 0.3 * torch.randn(d, generator=g, dtype=pdtype)) if method.endswith("_scaled") else None
    x = torch.randn(*shape, d, generator=g).to(dtype)
    grad_out = torch.randn(*shape, d, generator=g).to(dtype)
    return method, x, params, lay.pairs_tensor(), lay.layer_offsets_tensor(), scale, grad_out


def _run_op_job(job):
    """Forward, backward through autograd (x, params and scale), and the adjoint (merge) path."""
    method, x, params, pairs, offsets, scale, grad_out = job
    fn = qops.quasi_givens_chain if method.startswith("qgoft") else qops.givens_chain
    adjoint = qops.quasi_givens_chain_adjoint if method.startswith("qgoft") else qops.givens_chain_adjoint
    x = x.detach().requires_grad_(True)
    params = params.detach().requires_grad_(True)
    inputs = [x, params]
    if scale is not None:
        scale = scale.detach().requires_grad_(True)
        inputs.append(scale)
    y = fn(x, params, pairs, offsets, scale)
    grads = torch.autograd.grad(y, inputs, grad_out)
    adj = adjoint(grad_out, params.detach(), pairs, offsets, None if scale is None else scale.detach())
    return [y.detach(), *grads, adj]


def _make_linear_job(index: int):
    """A shared qgoft.nn.Linear per method (read concurrently) and a per-job input."""
    method = ("goft", "goft_scaled", "qgoft")[index % 3]
    g = torch.Generator().manual_seed(500 + index)
    x = torch.randn(4 + index, 9, 48, generator=g)
    return method, x


def _shared_linears():
    torch.manual_seed(0)
    mods = {}
    for method in ("goft", "goft_scaled", "qgoft"):
        base = torch.nn.Linear(48, 32)
        layer = qgoft.nn.Linear.from_linear(base, method=method, layout="parallel")
        with torch.no_grad():  # away from the identity initialization
            for p in layer.adapter_parameters():
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
        mods[method] = layer
    return mods


def _run_linear_job(mods, job):
    method, x = job
    layer = mods[method]
    x = x.detach().requires_grad_(True)
    y = layer(x)
    loss = y.square().mean() + 0.01 * layer.orthogonality_penalty()
    # autograd.grad (no .grad accumulation): the module and its parameters are shared between threads.
    grads = torch.autograd.grad(loss, [x, *layer.adapter_parameters()])
    return [y.detach(), *grads]


def _assert_bitwise(got, want, what):
    assert len(got) == len(want), what
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: output {k} dtype/shape"
        assert torch.equal(a, b), f"{what}: output {k} differs from the single-threaded result " \
                                  f"(max abs diff {(a.double() - b.double()).abs().max().item()})"


def _run_concurrently(tasks, workers=NUM_WORKERS):
    """Run every task (a zero-argument callable) ROUNDS times in shuffled order on ``workers`` threads that
    start together; returns [(task index, result)]."""
    order = [i for _ in range(ROUNDS) for i in range(len(tasks))]
    random.Random(0).shuffle(order)
    barrier = threading.Barrier(workers)
    lock = threading.Lock()
    queue = list(order)
    results = []

    def worker():
        barrier.wait()
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            out = tasks[i]()
            with lock:
                results.append((i, out))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        for f in futures:
            f.result(timeout=600)
    assert len(results) == len(order)
    return results


@pytest.mark.parametrize("intra_op_threads", [1, 2])
def test_ops_concurrent_threads_match_single_threaded(num_threads, intra_op_threads):
    num_threads(intra_op_threads)
    jobs = [_make_op_job(i) for i in range(len(OP_JOBS))]
    expected = [_run_op_job(job) for job in jobs]
    tasks = [lambda job=job: _run_op_job(job) for job in jobs]
    for i, out in _run_concurrently(tasks):
        _assert_bitwise(out, expected[i], f"op job {OP_JOBS[i]}")


def test_linear_concurrent_threads_match_single_threaded():
    mods = _shared_linears()
    jobs = [_make_linear_job(i) for i in range(9)]
    expected = [_run_linear_job(mods, job) for job in jobs]
    tasks = [lambda job=job: _run_linear_job(mods, job) for job in jobs]
    for i, out in _run_concurrently(tasks):
        _assert_bitwise(out, expected[i], f"linear job {i} ({jobs[i][0]})")


def test_mixed_ops_and_linear_concurrently():
    """Ops and modules interleaved on the same threads, each thread with its own module and optimizer."""
    mods = _shared_linears()
    op_jobs = [_make_op_job(i) for i in range(len(OP_JOBS))]
    lin_jobs = [_make_linear_job(i) for i in range(6)]
    tasks = ([lambda job=job: _run_op_job(job) for job in op_jobs]
             + [lambda job=job: _run_linear_job(mods, job) for job in lin_jobs])
    expected = [t() for t in tasks]
    for i, out in _run_concurrently(tasks, workers=6):
        _assert_bitwise(out, expected[i], f"mixed task {i}")


def test_training_steps_in_threads_match_sequential():
    """Each thread trains its own small qgoft model for a few AdamW steps; same as one after the other."""
    def build(seed: int):  # in the main thread: module initialization draws from the global RNG
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 8))
        config = qgoft.QGoftConfig(method=("goft", "qgoft", "goft_scaled")[seed % 3],
                                   target_modules=["0", "2"], orthogonality_weight=0.01)
        return qgoft.get_qgoft_model(model, config)

    def train(initial):
        wrapped = copy.deepcopy(initial)
        opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(1000)
        for _ in range(4):
            x, target = torch.randn(32, 24, generator=g), torch.randn(32, 8, generator=g)
            loss = torch.nn.functional.mse_loss(wrapped(x), target) + wrapped.orthogonality_penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in wrapped.parameters() if p.requires_grad]

    models = [build(seed) for seed in range(6)]
    expected = [train(m) for m in models]
    trainable = [p for p in models[0].parameters() if p.requires_grad]
    assert not any(torch.equal(a, b) for a, b in zip(expected[0], trainable)), "training changed nothing"
    tasks = [lambda m=m: train(m) for m in models]
    for i, out in _run_concurrently(tasks, workers=6):
        _assert_bitwise(out, expected[i], f"training model {i}")
