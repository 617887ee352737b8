"""The closing table of tools/gpu_check.sh: GPU targets 1-7 (docs/CUDA.md, "GPU targets"), each met, missed
or not run, with its number, from the files the check wrote into its output folder:

    python tools/gpu_check_summary.py OUTDIR      # writes OUTDIR/targets.md and OUTDIR/targets.json

parts.tsv (the check's parts: name, status, seconds, detail), bench_gpu.json (targets 1-4, per kernel
variant: a target counts as met when some variant meets every case of it, and that variant is named; otherwise
the variant closest to it is named, by rank_missed),
run/*only-model*.json (bench/run.py's model part, MiniLM) and bench_gpu.json's LLaMA-shaped stack (target 5),
the sanitize part (target 6) and the tests part (target 7); below the table, the verdict of the baseline part
(baseline_compare.json: this tree's kernels against an earlier commit's) when it ran. Exit status 1 when the
folder holds no parts.tsv.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

NAMES = {
    1: "chain forward >= 80 % of copy bandwidth (parallel, 8192 rows, d 4096/11008, bf16/fp32, goft/qgoft)",
    2: "chain backward <= 2.0x copy time (goft, goft_scaled, qgoft)",
    3: "butterfly <= 2x and stack=2 <= 1.5x the parallel layout, forward and backward",
    4: "qgoft.nn.Linear 4096^2 bf16, 8192 rows, fwd+bwd <= 1.20x frozen, below PEFT LoRA r=8 and OFT",
    5: "model step (MiniLM; LLaMA-shaped stack, 4 blocks d=4096, bf16): qGOFT and GOFT <= PEFT LoRA r=8 in "
       "time and peak memory",
    6: "compute-sanitizer memcheck / racecheck / initcheck / synccheck: 0 errors on every path",
    7: "tests/test_cuda.py and determinism green on the GPU",
}


def read_parts(outdir: str) -> Dict[str, Tuple[str, str, str]]:
    parts = {}
    with open(os.path.join(outdir, "parts.tsv")) as f:
        for line in f:
            cells = line.rstrip("\n").split("\t")
            if len(cells) >= 4:
                parts[cells[0]] = (cells[1], cells[2], cells[3])
    return parts


def closeness(rows: List[dict]) -> float:
    """The geometric mean of the rows' `over` (measured / limit; <= 1 within the limit); 1 where none is given."""
    overs = [r["over"] for r in rows if r.get("over")]
    return math.exp(sum(math.log(o) for o in overs) / len(overs)) if overs else 1.0


def rank_missed(rows: List[dict]) -> Tuple[int, int, float]:
    """The order of a target's variants when none meets every case (higher first): the variant timed on the most
    cases (a variant that changes one kernel has only that kernel's rows, and must not win by having fewer cases
    to miss), then the most cases met, then the closest to the limits (closeness)."""
    return len(rows), sum(r["met"] is True for r in rows), -closeness(rows)


def from_bench(outdir: str) -> Dict[int, Tuple[Optional[bool], str]]:
    """Targets 1-4 from bench_gpu.json: met when one variant meets every case of the target."""
    path = os.path.join(outdir, "bench_gpu.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    out: Dict[int, Tuple[Optional[bool], str]] = {}
    by: Dict[int, Dict[str, List[dict]]] = {}
    for t in data.get("targets", []):
        by.setdefault(t["target"], {}).setdefault(t["variant"], []).append(t)
    dry = "dry run" in str(data.get("header", {}).get("device", ""))
    for target, variants in by.items():
        met = [v for v, rows in variants.items() if all(r["met"] is True for r in rows)]
        if met:
            best = max(met, key=lambda v: (len(variants[v]), -closeness(variants[v])))
            out[target] = (True, f"variant {best}: all {len(variants[best])} cases met")
        else:
            v = max(variants, key=lambda v: rank_missed(variants[v]))
            rows = variants[v]
            missed = sorted((r for r in rows if r["met"] is False), key=lambda r: -r.get("over", 0.0))
            worst = "; ".join(f"{r['what'].split(':')[0]} {r['measured']}" for r in missed[:3])
            out[target] = (False if missed else None,
                           f"best variant {v}: {len(rows) - len(missed)}/{len(rows)} cases met; e.g. {worst}")
        if dry:
            out[target] = (None, "dry run on a CPU: " + out[target][1])
    return out


def from_model(outdir: str) -> Tuple[Optional[bool], str]:
    files = sorted(glob.glob(os.path.join(outdir, "run", "*only-model*.json")))
    if not files:
        return None, "bench/run.py's model part wrote no result"
    import bench_model as bm

    with open(files[-1]) as f:
        data = json.load(f)
    cuda = [d for label, d in data.get("devices", {}).items() if label.startswith("cuda")]
    if not cuda:
        return None, "no cuda device in the model results"
    m = cuda[0].get("model", {})
    if "skipped" in m:
        return None, f"skipped: {m['skipped']}"
    t, mem = m.get("timings", {}), m.get("memory", {})
    if bm.M_LORA not in t:
        return None, "PEFT LoRA not timed"
    lora = t[bm.M_LORA]["median_s"]
    ok, text = True, []
    for meth in (bm.M_QGOFT, bm.M_GOFT):
        if meth not in t:
            ok = None if ok else ok
            text.append(f"{meth} not timed")
            continue
        s = t[meth]["median_s"]
        ok = ok and s <= lora
        floor = t[meth].get("ratio")
        text.append(f"{meth} {s * 1e3:.1f} ms vs LoRA {lora * 1e3:.1f} ms"
                    + (f", {floor:.2f}x floor" if floor is not None else ""))
        a, b = mem.get(meth, {}).get("peak"), mem.get(bm.M_LORA, {}).get("peak")
        if a is not None and b is not None:
            ok = ok and a <= b
            text.append(f"peak {a / 2 ** 20:.0f} vs {b / 2 ** 20:.0f} MiB")
    return ok, f"batch {m.get('batch')} x {m.get('seq')}: " + "; ".join(text)


def combine(halves: List[Tuple[str, Tuple[Optional[bool], str]]]) -> Tuple[Optional[bool], str]:
    """Met when every half is met; missed when one is missed; else not run."""
    oks = [ok for _, (ok, _) in halves]
    ok = False if False in oks else (True if all(o is True for o in oks) else None)
    return ok, " / ".join(f"{name}: {text}" for name, (_, text) in halves)


def from_part(parts: Dict[str, Tuple[str, str, str]], name: str) -> Tuple[Optional[bool], str]:
    if name not in parts:
        return None, f"part {name} not run"
    status, secs, detail = parts[name]
    if status == "SKIP":
        return None, detail
    return status == "PASS", f"{status} in {secs}s: {detail}"


def main() -> int:
    if len(sys.argv) != 2 or not os.path.exists(os.path.join(sys.argv[1], "parts.tsv")):
        print(__doc__, file=sys.stderr)
        return 1
    outdir = sys.argv[1]
    parts = read_parts(outdir)
    results: Dict[int, Tuple[Optional[bool], str]] = {k: (None, "bench/bench_gpu.py did not finish")
                                                      for k in (1, 2, 3, 4)}
    bench = from_bench(outdir)
    results.update(bench)
    results[5] = combine([("MiniLM (bench/run.py)", from_model(outdir)),
                          ("LLaMA-shaped stack (bench_gpu.py)", bench.get(5, (None, "not run")))])
    results[6] = from_part(parts, "sanitize")
    results[7] = from_part(parts, "tests")
    header = {}
    bench = os.path.join(outdir, "bench_gpu.json")
    if os.path.exists(bench):
        with open(bench) as f:
            header = json.load(f).get("header", {})
    verdict = {True: "met", False: "MISSED", None: "not run"}
    lines = ["| target | what | result | measured |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {NAMES[k]} | {verdict[ok]} | {text} |" for k, (ok, text) in sorted(results.items())]
    head = ", ".join(f"{k}: {header[k]}" for k in ("device", "torch", "cuda", "commit", "date") if k in header)
    text = f"# GPU targets\n\n{head or 'no timing header (bench_gpu.py did not run)'}\n\n" + "\n".join(lines) + "\n"
    baseline = from_part(parts, "baseline")[1]
    compared = os.path.join(outdir, "baseline_compare.json")
    if os.path.exists(compared):
        with open(compared) as f:
            data = json.load(f)
        baseline = f"{data['header'].get('earlier commit', '')}: {data['verdict']} (baseline_compare.md)"
    text += f"\nAgainst an earlier commit (baseline part): {baseline}\n"
    print(text)
    with open(os.path.join(outdir, "targets.md"), "w") as f:
        f.write(text)
    with open(os.path.join(outdir, "targets.json"), "w") as f:
        json.dump({"header": header, "targets": [{"target": k, "what": NAMES[k], "met": ok, "measured": t}
                                                 for k, (ok, t) in sorted(results.items())],
                   "baseline": baseline}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
