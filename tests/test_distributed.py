"""Multi-process training with torch.distributed on CPU (gloo): DDP and FSDP2 (``fully_shard``).

Each test launches 2 processes with ``torchrun --standalone`` (a free port; OMP and torch threads 1 per
rank; hard timeouts, the whole process group is killed on expiry) running this file as a script. The ranks
train a small MLP adapted by qgoft (``get_qgoft_model``, every Linear, plus a trainable head in
``modules_to_save``) for a few steps, each on its half of the same global batch, and rank 0 writes the
trained parameters. The test then checks that

* the parameters are identical on every rank (DDP: bitwise; FSDP2: the gathered full tensors), and
* they equal a single-process run on the whole global batch within 1e-6 (the loss is a mean over the
  rows, so the average of the two ranks' gradients is the global gradient up to rounding).

Rank 0 also saves the adapter with ``save_pretrained`` and the test reloads it onto a fresh base model; under
FSDP2 every rank also calls ``save_pretrained`` on the sharded model itself (gathered, written by rank 0).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import qgoft

WORLD_SIZE = 2
STEPS = 5
GLOBAL_BATCH = 16
IN, HIDDEN, OUT = 12, 24, 3
TOL = 1e-6
TIMEOUT_S = 300  # whole torchrun run; a healthy one takes ~10-20 s on 2 shared cores

OPTIMIZERS = ("sgd", "adamw")


# ------------------------------------------------------------------------------------------------
# Shared by the ranks and the single-process reference.
# ------------------------------------------------------------------------------------------------

def build_model(method: str) -> qgoft.QGoftModel:
    torch.manual_seed(1234)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, OUT))
    config = qgoft.QGoftConfig(method=method, target_modules=["0", "2"], modules_to_save=["4"],
                               orthogonality_weight=0.05)
    wrapped = qgoft.get_qgoft_model(model, config)
    # Away from the identity initialisation, so every adapter parameter gets a generic gradient.
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for name, p in wrapped.named_parameters():
            if "givens" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return wrapped


def global_batches():
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g))
            for _ in range(STEPS)]


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def train(model, optimizer_name: str, rank: int = 0, world_size: int = 1, penalty_module=None):
    """STEPS steps on this rank's contiguous share of every global batch; returns the per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer_name, params)
    penalty_module = penalty_module if penalty_module is not None else model
    per_rank = GLOBAL_BATCH // world_size
    losses = []
    for x, y in global_batches():
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        # Under FSDP2 the blocks are sharded DTensors here; QGoftModel.orthogonality_penalty() returns a
        # plain tensor anyway (the full penalty, all-reduced).
        loss = torch.nn.functional.mse_loss(model(x), y) + penalty_module.orthogonality_penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def trainable_state(model) -> dict:
    """name -> full (unsharded) float64 copy of every trainable parameter."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = t.detach().to(torch.float64).clone()
    return out


# ------------------------------------------------------------------------------------------------
# The worker (run by torchrun: python -m torch.distributed.run ... test_distributed.py MODE OUT_DIR). One
# launch per mode trains every configuration of CONFIGS[mode] in turn (launching costs ~10 s per run).
# ------------------------------------------------------------------------------------------------

CONFIGS = {
    "ddp": [(m, o) for m in ("goft_scaled", "qgoft") for o in OPTIMIZERS],
    "fsdp2": [("qgoft", o) for o in OPTIMIZERS],
}


def _config_dir(out_dir, method: str, optimizer_name: str) -> Path:
    return Path(out_dir) / f"{method}-{optimizer_name}"


def _train_one(mode: str, method: str, optimizer_name: str, out_dir: Path, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    model = build_model(method)
    report = {"rank": rank, "mode": mode, "qgoft": qgoft.__file__,
              "extension_loaded": qgoft.extension_loaded()}
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model)  # broadcasts rank 0's parameters and buffers (the int32 layout buffers included)
        losses = train(ddp, optimizer_name, rank, world_size, penalty_module=model)
        state = trainable_state(model)
        if rank == 0:  # the adapter is saved from rank 0 only (the module inside DDP)
            model.save_pretrained(str(out_dir / "adapter"))
    elif mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        mesh = init_device_mesh("cpu", (world_size,))
        for module in model.base_model:
            if isinstance(module, qgoft.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        report["sharded"] = sorted(name for name, p in model.named_parameters() if isinstance(p, DTensor))
        losses = train(model, optimizer_name, rank, world_size)
        state = trainable_state(model)
        # save_pretrained needs plain tensors: gather the full state dict (a collective: every rank calls
        # it; with cpu_offload only rank 0 receives it), load it into an unsharded copy on rank 0, save.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            plain = build_model(method)
            plain.load_state_dict(full)
            plain.save_pretrained(str(out_dir / "adapter"))
        # save_pretrained on the sharded model itself, called on every rank: it gathers the adapter, rank 0
        # writes it, and no rank returns before it is complete on disk.
        model.save_pretrained(str(out_dir / "adapter_sharded"))
        report["saved_when_returned"] = (out_dir / "adapter_sharded" / "adapter_model.safetensors").is_file()
        # QGoftTrainer's checkpoint save, as transformers calls it on every rank (should_save on rank 0
        # only): the non-main ranks take part in the gather instead of leaving rank 0 hanging in it.
        from types import SimpleNamespace
        from qgoft.integrations.transformers import QGoftTrainer
        trainer = SimpleNamespace(args=SimpleNamespace(should_save=rank == 0, output_dir=str(out_dir / "trainer"),
                                                       process_index=rank),
                                  _qgoft_model=model, processing_class=None)
        QGoftTrainer._save(trainer)
    else:
        raise ValueError(mode)
    report["losses"] = losses
    # Every rank's parameters against rank 0's, bitwise.
    gathered = [None] * world_size
    dist.all_gather_object(gathered, state)
    saved_when_returned = [None] * world_size
    dist.all_gather_object(saved_when_returned, report.get("saved_when_returned"))
    report["saved_when_returned"] = saved_when_returned
    report["max_diff_to_rank0"] = max(
        (other[k] - gathered[0][k]).abs().max().item() for other in gathered for k in state)
    if rank == 0:
        torch.save(state, out_dir / "params.pt")
        (out_dir / "report.json").write_text(json.dumps(report))
    dist.barrier()


def worker_main(mode: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == WORLD_SIZE
    for method, optimizer_name in CONFIGS[mode]:
        config_dir = _config_dir(out_dir, method, optimizer_name)
        if rank == 0:
            config_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        _train_one(mode, method, optimizer_name, config_dir, rank, world_size)
    dist.destroy_process_group()
    # DDP keeps torch's gloo worker threads alive after destroy_process_group (torch 2.13); one of them may
    # free a finished all_gather's Python-owned tensors during interpreter teardown, which aborts the rank
    # (SIGABRT, "terminate called without an active exception") after its work is written: about one run
    # in 20 on 2 busy cores. The results are on disk, so the rank leaves without teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# The tests.
# ------------------------------------------------------------------------------------------------

def _run_torchrun(out_dir: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    # The workers import the same qgoft as this test (e.g. a staged build), torch from this interpreter.
    package_parent = str(Path(qgoft.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_parent, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={WORLD_SIZE}", "--max-restarts=0", "--monitor-interval=0.5",
           str(Path(__file__).resolve()), mode, str(out_dir)]
    proc = subprocess.Popen(cmd, env=env, cwd=str(out_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun ({mode}) did not finish in {TIMEOUT_S} s; output:\n{output[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, None)


_RUNS: dict = {}


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    """mode -> output directory of its torchrun launch (launched once per module, on first use)."""
    def get(mode: str) -> Path:
        if mode not in _RUNS:
            out_dir = tmp_path_factory.mktemp(f"torchrun-{mode}")
            result = _run_torchrun(out_dir, mode)
            _RUNS[mode] = (out_dir, result)
        out_dir, result = _RUNS[mode]
        assert result.returncode == 0, f"torchrun {mode} failed ({result.returncode}):\n{result.stdout[-8000:]}"
        return out_dir
    yield get
    _RUNS.clear()


def _single_process(method: str, optimizer_name: str):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(method)
        losses = train(model, optimizer_name)
    finally:
        torch.set_num_threads(previous)
    return model, trainable_state(model), losses


def _compare(config_dir: Path, method: str, optimizer_name: str):
    report = json.loads((config_dir / "report.json").read_text())
    assert report["extension_loaded"], "the workers ran the pure-PyTorch fallback"
    assert report["max_diff_to_rank0"] == 0.0, report
    got = torch.load(config_dir / "params.pt")
    model, want, losses = _single_process(method, optimizer_name)
    assert sorted(got) == sorted(want)
    assert any("givens" in k for k in got) and any(k.endswith("4.weight") for k in got), sorted(got)
    initial = trainable_state(build_model(method))
    for k in want:
        assert not torch.equal(want[k], initial[k]), f"{k} did not train"
        diff = (got[k] - want[k]).abs().max().item()
        assert diff <= TOL, f"{k}: distributed vs single-process max abs diff {diff:.3g} > {TOL}"
    return report, model, losses


def _check_saved_adapter(config_dir: Path, trained, name: str = "adapter") -> None:
    """The adapter saved by rank 0 reloads onto a fresh base model and reproduces the trained model."""
    torch.manual_seed(1234)  # the base weights of build_model
    base = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.GELU(), torch.nn.Linear(HIDDEN, OUT))
    loaded = qgoft.QGoftModel.from_pretrained(base, str(config_dir / name))
    x = torch.randn(5, IN)
    with torch.no_grad():
        assert torch.allclose(loaded(x), trained(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,optimizer_name", CONFIGS["ddp"])
def test_ddp_gloo_two_processes_match_single_process(torchrun_results, method, optimizer_name):
    config_dir = _config_dir(torchrun_results("ddp"), method, optimizer_name)
    _, model, _ = _compare(config_dir, method, optimizer_name)
    _check_saved_adapter(config_dir, model)


@pytest.mark.parametrize("method,optimizer_name", CONFIGS["fsdp2"])
def test_fsdp2_gloo_two_processes_match_single_process(torchrun_results, method, optimizer_name):
    config_dir = _config_dir(torchrun_results("fsdp2"), method, optimizer_name)
    report, model, _ = _compare(config_dir, method, optimizer_name)
    # the adapter parameters really were sharded DTensors (and the kernels ran on their unsharded views)
    assert any("givens_blocks" in name for name in report["sharded"]), report["sharded"]
    _check_saved_adapter(config_dir, model)
    # save_pretrained on the FSDP2-sharded model (every rank calls it, rank 0 writes): the same adapter as
    # the one saved from the gathered full state dict, complete when it returned on every rank.
    assert report["saved_when_returned"] == [True] * WORLD_SIZE, report["saved_when_returned"]
    _check_saved_adapter(config_dir, model, "adapter_sharded")
    _check_saved_adapter(config_dir, model, "trainer")
    a = qgoft.serialization.read_adapter(str(config_dir / "adapter")).tensors
    b = qgoft.serialization.read_adapter(str(config_dir / "adapter_sharded")).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":
    worker_main(*sys.argv[1:3])
