"""Long-run soak: train a small qgoft-adapted model for thousands of steps and check that memory stays flat and
every parameter finite. CPU: resident set size (RSS); CUDA: ``torch.cuda.memory_allocated``.

    python tools/soak.py                          # CPU, 5,000 steps (~12 s of CPU time, one thread)
    python tools/soak.py --device cuda            # the same on the GPU (tools/gpu_check.sh runs it)

The model is an MLP whose three hidden Linear layers are adapted (``--method``, default ``qgoft`` with the
orthogonality penalty) plus a trainable head (``modules_to_save``), trained with AdamW on fresh random
batches; every ``save_every`` steps the adapter is saved (the same directory, replaced atomically), so saving
is soaked too, and the last save must reload to the trained values.
Memory is sampled every ``sample_every`` steps after ``warmup`` steps; the check fails when it grows by more
than ``max_growth_bytes`` over the remaining steps, or when a loss or a parameter is not finite. Used by
tests/test_soak.py (CPU, marked slow) and by tools/gpu_check.sh (CUDA). Exit status 0 when it passed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qgoft  # noqa: E402

CPU_MAX_GROWTH = 16 * 1024 * 1024
"""RSS growth allowed after warm-up on CPU (allocator and interpreter noise; a leak of 4 KB per step over
4,500 steps is 18 MB)."""
CUDA_MAX_GROWTH = 1024 * 1024
"""Allocated CUDA memory growth allowed after warm-up: live tensor bytes are exact, this absorbs one-time lazy
allocations (a leak of 256 bytes per step over 4,500 steps exceeds it)."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return _rss_bytes()


def build_model(device: torch.device, width: int = 64, method: str = "qgoft") -> qgoft.QGoftModel:
    torch.manual_seed(0)
    base = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width), torch.nn.GELU(),
        torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 4))
    config = qgoft.QGoftConfig(method=method, target_modules=["0", "2", "4"], modules_to_save=["6"],
                               orthogonality_weight=0.01)
    return qgoft.get_qgoft_model(base.to(device), config)


def soak(device: str = "cpu", steps: int = 5000, warmup: int = 500, sample_every: int = 100,
         save_every: int = 500, batch: int = 32, width: int = 64, method: str = "qgoft",
         max_growth_bytes: int = -1, leak_bytes_per_step: int = 0) -> Dict[str, Any]:
    """Run the soak; returns a report dict with ``passed``, ``growth_bytes``, ``samples`` and ``problems``.
    ``leak_bytes_per_step`` > 0 keeps that many bytes per step alive on purpose (to show the check fails)."""
    dev = torch.device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: threads only add scheduling noise (and oversubscription)
    try:
        return _soak(dev, steps, warmup, sample_every, save_every, batch, width, method, max_growth_bytes,
                     leak_bytes_per_step)
    finally:
        torch.set_num_threads(threads)


def _soak(dev: torch.device, steps: int, warmup: int, sample_every: int, save_every: int, batch: int, width: int,
          method: str, max_growth_bytes: int, leak_bytes_per_step: int) -> Dict[str, Any]:
    if max_growth_bytes < 0:
        max_growth_bytes = CUDA_MAX_GROWTH if dev.type == "cuda" else CPU_MAX_GROWTH
    model = build_model(dev, width, method)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    generator = torch.Generator(device=dev).manual_seed(1)
    target_map = torch.randn(width, 4, device=dev, generator=generator)
    problems: List[str] = []
    samples: List[List[int]] = []
    losses: List[float] = []
    baseline = None
    leaked: List[torch.Tensor] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(1, steps + 1):
            x = torch.randn(batch, width, device=dev, generator=generator)
            y = torch.tanh(x @ target_map)
            loss = torch.nn.functional.mse_loss(model(x), y) + model.orthogonality_penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if leak_bytes_per_step:
                leaked.append(torch.ones(leak_bytes_per_step, dtype=torch.uint8, device=dev))
            if save_every and step % save_every == 0:
                model.save_pretrained(os.path.join(tmp, "adapter"))
            if step % sample_every == 0:
                value = loss.item()
                losses.append(value)
                if not math.isfinite(value):
                    problems.append(f"step {step}: loss {value}")
                    break
                memory = _memory(dev)
                samples.append([step, memory])
                if step == warmup:
                    baseline = memory
        saved = save_every and steps >= save_every
        reloaded = qgoft.QGoftModel.from_pretrained(build_model(dev, width, method).unload(),
                                                    os.path.join(tmp, "adapter")) if saved else None
    seconds = time.perf_counter() - start
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            problems.append(f"parameter {name} is not finite")
    growth = (max(m for s, m in samples if s >= warmup) - baseline) if baseline is not None else None
    if growth is None:
        problems.append(f"fewer than {warmup} steps ran")
    elif growth > max_growth_bytes:
        problems.append(f"memory grew by {growth} bytes after warm-up (limit {max_growth_bytes})")
    if reloaded is not None and not problems and steps % save_every == 0:
        got = reloaded.get_adapter_state_dict()
        want = model.get_adapter_state_dict()
        if not all(torch.equal(got[k], want[k]) for k in want):
            problems.append("the last saved adapter does not reload to the trained values")
    return {
        "device": str(dev), "steps": steps, "warmup": warmup, "seconds": round(seconds, 1),
        "memory": "cuda_allocated" if dev.type == "cuda" else "rss",
        "baseline_bytes": baseline, "growth_bytes": growth, "max_growth_bytes": max_growth_bytes,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "samples": samples, "problems": problems, "passed": not problems,
    }


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--method", default="qgoft", choices=qgoft.nn.METHODS)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--save-every", type=int, default=500, help="save the adapter every N steps (0: never)")
    parser.add_argument("--leak-bytes-per-step", type=int, default=0,
                        help="keep this many bytes per step alive on purpose: the check must then fail")
    args = parser.parse_args(argv)
    report = soak(args.device, steps=args.steps, warmup=args.warmup, method=args.method,
                  save_every=args.save_every, leak_bytes_per_step=args.leak_bytes_per_step)
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    print(("PASS" if report["passed"] else "FAIL") + f" soak on {report['device']}: {report['steps']} steps in "
          f"{report['seconds']} s, {report['memory']} growth after warm-up {report['growth_bytes']} bytes "
          f"(limit {report['max_growth_bytes']}); loss {report['first_loss']:.4g} -> {report['last_loss']:.4g}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
