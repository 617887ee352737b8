"""GPU benchmarks: the fused CUDA chain against a device-to-device copy of the same tensor, and
qgoft.nn.Linear against a frozen nn.Linear. Contenders run side by side in one process, in interleaved
rounds, timed with CUDA events after warm-up; medians are reported.

    python bench/bench_gpu.py [--rounds 25] [--out DIR] [--quick]

Targets: chain forward on 8192 x 4096 (bf16 and fp32) >= 60 % of the copy bandwidth of the same
tensor (i.e. time <= copy / 0.6), backward <= 3x the copy time, qgoft.nn.Linear 4096 x 4096 bf16
forward + backward with 8192 rows <= 1.10x a frozen nn.Linear. Writes bench_gpu.md and bench_gpu.json
into --out (default $OUT when set).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from typing import Callable

import torch

import qgoft
from qgoft import layouts


def timed(contenders: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, float]:
    """Median milliseconds per call of each contender: interleaved rounds, CUDA events around `inner`
    back-to-back calls."""
    for fn in contenders.values():  # warm-up (also validates and caches the layouts)
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        events = []
        for name, fn in contenders.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        for name, start, end in events:
            samples[name].append(start.elapsed_time(end) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def chain_rows(rows: int, d: int, dtype: torch.dtype, rounds: int) -> list[dict]:
    dev = "cuda"
    lay = layouts.parallel(d)
    pairs, offs = lay.pairs_tensor(dev), lay.layer_offsets_tensor(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, d, device=dev, dtype=dtype, generator=gen)
    g = torch.randn(rows, d, device=dev, dtype=dtype, generator=gen)
    buf = torch.empty_like(x)
    angles = 0.1 * torch.randn(lay.num_pairs, device=dev, generator=gen)
    blocks = torch.eye(2, device=dev).repeat(lay.num_pairs, 1, 1) + 0.1 * torch.randn(
        lay.num_pairs, 2, 2, device=dev, generator=gen)
    scale = 1 + 0.1 * torch.randn(d, device=dev, generator=gen)
    ops = torch.ops.qgoft
    contenders = {
        "copy (buf.copy_(x))": lambda: buf.copy_(x),
        "goft forward": lambda: ops.givens_chain(x, angles, pairs, offs, None),
        "qgoft forward": lambda: ops.quasi_givens_chain(x, blocks, pairs, offs, None),
        "goft backward (dx, dθ)": lambda: ops.givens_chain_backward(g, x, angles, pairs, offs, None,
                                                                    [True, True, False]),
        "goft_scaled backward (dx, dθ, ds)": lambda: ops.givens_chain_backward(
            g, x, angles, pairs, offs, scale, [True, True, True]),
        "qgoft backward (dx, dblocks)": lambda: ops.quasi_givens_chain_backward(
            g, x, blocks, pairs, offs, None, [True, True, False]),
        "adjoint (dx only)": lambda: ops.givens_chain_backward(g, x, angles, pairs, offs, None,
                                                               [True, False, False]),
    }
    med = timed(contenders, rounds, inner=5)
    copy = med["copy (buf.copy_(x))"]
    nbytes = x.numel() * x.element_size()
    out = []
    for name, ms in med.items():
        moved = 3 * nbytes if "backward" in name else 2 * nbytes  # backward reads x and g, writes dx
        if name.startswith("adjoint"):
            moved = 2 * nbytes
        out.append({"case": f"{rows}x{d} {str(dtype).replace('torch.', '')}", "contender": name, "ms": ms,
                    "vs_copy": ms / copy, "GBps": moved / ms / 1e6,
                    "copy_bw_fraction": (moved / ms) / (2 * nbytes / copy)})
    return out


def general_path_rows(rows: int, d: int, dtype: torch.dtype, rounds: int) -> list[dict]:
    """The same parallel layout through the general kernels (forced), and other layouts: for reference."""
    dev = "cuda"
    out = []
    x = torch.randn(rows, d, device=dev, dtype=dtype)
    g = torch.randn(rows, d, device=dev, dtype=dtype)
    buf = torch.empty_like(x)
    for kind in ("parallel", "butterfly", "parallel*2"):
        lay = {"parallel": layouts.parallel, "butterfly": layouts.butterfly,
               "parallel*2": lambda n: layouts.stack(layouts.parallel(n), 2)}[kind](d)
        pairs, offs = lay.pairs_tensor(dev), lay.layer_offsets_tensor(dev)
        angles = 0.1 * torch.randn(lay.num_pairs, device=dev)
        ops = torch.ops.qgoft

        def fwd():
            return ops.givens_chain(x, angles, pairs, offs, None)

        def bwd():
            return ops.givens_chain_backward(g, x, angles, pairs, offs, None, [True, True, False])

        paths = ["auto", "general"] if kind == "parallel" else ["auto"]
        for path in paths:
            os.environ["QGOFT_CUDA_PATH"] = path
            try:
                med = timed({"copy": lambda: buf.copy_(x), "forward": fwd, "backward": bwd}, max(5, rounds // 3), 3)
            finally:
                os.environ.pop("QGOFT_CUDA_PATH", None)
            for name in ("forward", "backward"):
                out.append({"case": f"{rows}x{d} {str(dtype).replace('torch.', '')} {kind} path={path}",
                            "contender": f"goft {name}", "ms": med[name], "vs_copy": med[name] / med["copy"]})
    return out


def linear_rows(rows: int, d: int, n: int, rounds: int) -> list[dict]:
    dev = "cuda"
    torch.manual_seed(0)
    base = torch.nn.Linear(d, n, device=dev, dtype=torch.bfloat16)
    base.requires_grad_(False)
    x = torch.randn(rows, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(rows, n, device=dev, dtype=torch.bfloat16)
    modules: dict[str, torch.nn.Module] = {"frozen nn.Linear": base}
    for method in ("goft", "goft_scaled", "qgoft"):
        m = qgoft.nn.Linear(d, n, device=dev, dtype=torch.bfloat16, method=method)
        with torch.no_grad():
            m.weight.copy_(base.weight)
            m.bias.copy_(base.bias)
            for p in m.adapter_parameters():
                p.add_(0.01 * torch.randn_like(p))
        modules[f"qgoft.nn.Linear {method}"] = m

    def step(m):
        def run():
            x.grad = None
            for p in m.parameters():
                p.grad = None
            m(x).backward(gy)
        return run

    med = timed({k: step(m) for k, m in modules.items()}, rounds, inner=3)
    ref = med["frozen nn.Linear"]
    flops = 2 * 2 * rows * d * n  # forward + input-gradient matmuls
    return [{"case": f"Linear {d}x{n} bf16, {rows} rows, fwd+bwd", "contender": k, "ms": v, "vs_frozen": v / ref,
             "TFLOPs": flops / v / 1e9} for k, v in med.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no extra layouts")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    if not qgoft.extension_loaded() or not qgoft.build_info().get("cuda_compiled"):
        print(f"bench_gpu: qgoft's CUDA kernels are not loaded: {qgoft.build_info()}", file=sys.stderr)
        return 2
    rounds = 7 if args.quick else args.rounds
    prop = torch.cuda.get_device_properties(0)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": prop.name, "sm_count": prop.multi_processor_count,
        "memory_GiB": round(prop.total_memory / 2 ** 30, 1),
        "torch": torch.__version__, "cuda": torch.version.cuda, "qgoft": qgoft.__version__,
    }
    rows: list[dict] = []
    for dtype in (torch.bfloat16, torch.float32):
        rows += chain_rows(8192, 4096, dtype, rounds)
    rows += chain_rows(8192, 11008, torch.bfloat16, max(5, rounds // 2))  # segmented (LLaMA MLP width)
    if not args.quick:
        rows += general_path_rows(8192, 4096, torch.bfloat16, rounds)
    lin = linear_rows(8192, 4096, 4096, rounds)

    def get(case_prefix, contender):
        for r in rows + lin:
            if r["case"].startswith(case_prefix) and r["contender"] == contender:
                return r
        return None

    checks = []
    for dt in ("bfloat16", "float32"):
        for name in ("goft forward", "qgoft forward"):
            r = get(f"8192x4096 {dt}", name)
            checks.append((f"{name} {dt}: bandwidth >= 60% of copy", r["copy_bw_fraction"] >= 0.60,
                           f"{100 * r['copy_bw_fraction']:.0f}% ({r['ms']:.3f} ms)"))
        for name in ("goft backward (dx, dθ)", "qgoft backward (dx, dblocks)"):
            r = get(f"8192x4096 {dt}", name)
            checks.append((f"{name} {dt}: <= 3x copy time", r["vs_copy"] <= 3.0,
                           f"{r['vs_copy']:.2f}x ({r['ms']:.3f} ms)"))
    # Floor of the unfused design: the chain must stream x twice in the forward (read, write) and three
    # times in the backward (read x and g, write dx): 2.5 copies of x on top of the two matmuls.
    copy_bf16 = get("8192x4096 bfloat16", "copy (buf.copy_(x))")["ms"]
    frozen = get("Linear", "frozen nn.Linear")["ms"]
    floor = 1 + 2.5 * copy_bf16 / frozen
    checks.append(("(info) bandwidth floor of chain + frozen Linear, unfused", floor <= 1.10,
                   f"{floor:.3f}x = 1 + 2.5 x copy {copy_bf16:.3f} ms / frozen {frozen:.3f} ms"))
    for method in ("goft", "goft_scaled", "qgoft"):
        r = get("Linear", f"qgoft.nn.Linear {method}")
        checks.append((f"qgoft.nn.Linear {method} fwd+bwd <= 1.10x frozen", r["vs_frozen"] <= 1.10,
                       f"{r['vs_frozen']:.3f}x ({r['ms']:.3f} ms)"))

    lines = [f"# qgoft CUDA benchmark ({header['date']})", "",
             ", ".join(f"{k}: {v}" for k, v in header.items()), "",
             "Medians over interleaved rounds, CUDA events, after warm-up.", "",
             "| case | contender | ms | x copy | GB/s | % of copy bandwidth |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gbps = f"{r['GBps']:.0f}" if "GBps" in r else ""
        frac = f"{100 * r['copy_bw_fraction']:.0f}%" if "copy_bw_fraction" in r else ""
        lines.append(f"| {r['case']} | {r['contender']} | {r['ms']:.3f} | {r['vs_copy']:.2f} | {gbps} | {frac} |")
    lines += ["", "| case | contender | ms | x frozen nn.Linear | TFLOP/s (2 matmuls) |", "| --- | --- | ---: | ---: | ---: |"]
    for r in lin:
        lines.append(f"| {r['case']} | {r['contender']} | {r['ms']:.3f} | {r['vs_frozen']:.3f} | {r['TFLOPs']:.0f} |")
    lines += ["", "| target | met | measured |", "| --- | --- | --- |"]
    for what, ok, val in checks:
        lines.append(f"| {what} | {'yes' if ok else 'NO'} | {val} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
            json.dump({"header": header, "chain": rows, "linear": lin,
                       "targets": [{"target": w, "met": ok, "measured": v} for w, ok, v in checks]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
