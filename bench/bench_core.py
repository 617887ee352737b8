"""Core benchmarks of issue 2: the fused chain vs a streaming copy, and qgoft.nn.Linear vs a frozen
nn.Linear. Contenders run side by side in one process, in interleaved rounds; medians are reported.

    python bench/bench_core.py            # full table (a few minutes on 2 cores)
    python bench/bench_core.py --quick    # fewer rounds
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch

import qgoft
from qgoft import layouts, reference


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each contender, measured in interleaved rounds."""
    for fn in contenders.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_chain(rows: int, d: int, rounds: int) -> list[tuple[str, float, float]]:
    lay = layouts.parallel(d)
    pairs, offs = lay.pairs_tensor(), lay.layer_offsets_tensor()
    x = torch.randn(rows, d)
    g = torch.randn(rows, d)
    angles = torch.randn(lay.num_pairs) * 0.1
    blocks = reference.blocks_from_angles(angles).contiguous()
    mask = [True, True, False]
    contenders = {
        "x.clone()": lambda: x.clone(),
        "goft forward": lambda: torch.ops.qgoft.givens_chain(x, angles, pairs, offs, None),
        "goft backward (dx, dθ)": lambda: torch.ops.qgoft.givens_chain_backward(g, x, angles, pairs, offs, None, mask),
        "qgoft forward": lambda: torch.ops.qgoft.quasi_givens_chain(x, blocks, pairs, offs, None),
        "qgoft backward (dx, dblocks)": lambda: torch.ops.qgoft.quasi_givens_chain_backward(g, x, blocks, pairs, offs, None, mask),
    }
    med = interleaved(contenders, rounds, 3)
    base = med["x.clone()"]
    return [(k, v, v / base) for k, v in med.items()]


def bench_linear(rows: int, d: int, n: int, rounds: int, with_reference: bool) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    base = torch.nn.Linear(d, n)
    base.requires_grad_(False)
    x = torch.randn(rows, d, requires_grad=True)
    modules: dict[str, torch.nn.Module] = {"frozen nn.Linear": base}
    for method in ("goft", "qgoft"):
        m = qgoft.nn.Linear.from_linear(base, method=method)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        modules[f"qgoft.nn.Linear {method}"] = m
    if with_reference:
        lay = layouts.parallel(d)
        pairs, offs = lay.pairs_tensor(), lay.layer_offsets_tensor()
        angles = torch.zeros(lay.num_pairs, requires_grad=True)

        class UnfusedGoft(torch.nn.Module):
            def forward(self, inp):
                return base(reference.givens_chain_reference(inp, angles, pairs, offs))

        modules["unfused PyTorch GOFT (reference)"] = UnfusedGoft()

    def step(m: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            y = m(x)
            y.sum().backward()
            x.grad = None
            for p in m.parameters():
                p.grad = None
        return run

    med = interleaved({k: step(m) for k, m in modules.items()}, rounds, 1)
    b = med["frozen nn.Linear"]
    return [(k, v, v / b) for k, v in med.items()]


def bench_breakdown(rows: int, d: int, rounds: int) -> list[tuple[str, float, float]]:
    """What the adapter adds to a frozen layer, op by op, next to one matmul of the layer's shape."""
    lay = layouts.parallel(d)
    pairs, offs = lay.pairs_tensor(), lay.layer_offsets_tensor()
    x, g, w = torch.randn(rows, d), torch.randn(rows, d), torch.randn(d, d)
    angles = torch.randn(lay.num_pairs) * 0.1
    mask = [True, True, False]
    med = interleaved({
        "matmul x @ W.T (one of the frozen layer's two)": lambda: x @ w.T,
        "goft chain forward": lambda: torch.ops.qgoft.givens_chain(x, angles, pairs, offs, None),
        "goft chain backward (dx, dθ)": lambda: torch.ops.qgoft.givens_chain_backward(g, x, angles, pairs, offs, None, mask),
    }, rounds, 3)
    base = med["matmul x @ W.T (one of the frozen layer's two)"]
    return [(k, v, v / base) for k, v in med.items()]


def machine() -> str:
    info = qgoft.build_info()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"kernel ISA {info.get('cpu_isa_selected')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip the slow unfused reference")
    ap.add_argument("--only", choices=["chain", "linear", "breakdown"], help="run one table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not qgoft.extension_loaded():
        raise SystemExit("qgoft extension not loaded: " + str(qgoft.build_info()))
    rounds = 7 if args.quick else 21
    print(f"machine: {machine()}")
    if args.only in (None, "breakdown"):
        print(f"\n### Adapter cost breakdown, fp32, 1024 rows, d = 2048 (medians of {rounds} interleaved rounds)\n")
        print("| op | median ms | ratio to one matmul |\n| --- | ---: | ---: |")
        for name, t, r in bench_breakdown(1024, 2048, rounds):
            print(f"| {name} | {t * 1e3:.2f} | {r:.3f}x |")
    if args.only in (None, "chain"):
        print(f"\n### Chain kernel, parallel layout, fp32, x of 4096 x 4096 (medians of {rounds} interleaved rounds)\n")
        print("| op | median ms | ratio to x.clone() |\n| --- | ---: | ---: |")
        for name, t, r in bench_chain(4096, 4096, rounds):
            print(f"| {name} | {t * 1e3:.2f} | {r:.2f}x |")
    if args.only in (None, "linear"):
        print("\n### Layer forward+backward, fp32, d = n = 2048, 1024 rows, base frozen, input requires grad\n")
        print("| module | median ms | ratio to frozen nn.Linear |\n| --- | ---: | ---: |")
        for name, t, r in bench_linear(1024, 2048, 2048, rounds, not args.no_reference):
            print(f"| {name} | {t * 1e3:.2f} | {r:.3f}x |")

if __name__ == "__main__":
    main()
