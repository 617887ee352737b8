"""This tree's chain kernels side by side with an earlier commit's build, on the same GPU (the `baseline` part of
tools/gpu_check.sh; procedure in bench/README.md, "Against an earlier commit").

Both builds register the op namespace ``qgoft::``, so one process can hold only one of them: each build is
timed in processes of its own, alternating over ``--pairs`` rounds in the order A B, B A, A B, ... (each
build first in half of the rounds, so a drift of the machine during the run cancels). Each process runs
bench/bench_gpu.py's kernel tables (``--only kernels --xor general``: copy and the six chain calls of the
parallel layout at 8192 rows, d 4096 / 11008, bf16 / fp32; the parallel, butterfly and stack=2 layouts on
the general kernels), the earlier build through ``--ops-library`` with this package's library disabled. Per
case: the median over each build's processes of the per-process medians, the ratio this tree / earlier, and
the range of the per-round ratios (process of this tree / process of the earlier build in the same round).
A case is "slower" or "faster" only when the median ratio is off by more than ``--tolerance`` and every
round agrees; the copy rows are the control (their ratio shows how equal the two kinds of process were).

    python tools/gpu_baseline_compare.py --baseline-lib LIB [--baseline-label TEXT] [--current-label TEXT]
        [--pairs 4] [--rounds 7] [--variants base] [--out DIR] [--dry-run]

Writes baseline_compare.md and baseline_compare.json into --out (default $OUT); the per-process tables go to
--work. The last line printed is the verdict. Exit status 1 when a process failed, 0 otherwise (a slower case
is a finding, not a failure of the check).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench_gpu.py")
CURRENT, BASELINE = "current", "baseline"
sys.path.insert(0, os.path.dirname(BENCH))
from bench_gpu import KERNEL_SWITCHES, git_commit  # noqa: E402  (the planner's switches; the tree's label)
Key = Tuple[str, str, str, str]  # table, case, contender, variant of this tree ("" for the copy)


def run_process(build: str, index: int, args: argparse.Namespace, work: str) -> Tuple[Optional[dict], float]:
    """One bench_gpu.py process of `build`: its JSON (None when it failed) and its wall seconds."""
    out = os.path.join(work, f"{build}-{index}")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, BENCH, "--only", "kernels", "--xor", "general", "--rounds", str(args.rounds), "--out", out]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    for var in KERNEL_SWITCHES:  # bench_gpu sets them per variant; none may leak in from the caller
        env.pop(var, None)
    if build == BASELINE:
        cmd += ["--variants", "base", "--ops-library", args.baseline_lib]
        env["QGOFT_DISABLE_EXTENSION"] = "1"
    else:
        cmd += ["--variants", args.variants]
        env.pop("QGOFT_DISABLE_EXTENSION", None)
    if args.dry_run:
        cmd.append("--dry-run")
    t0 = time.time()
    with open(os.path.join(out, "log.txt"), "w") as log:
        try:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.process_timeout,
                                cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    secs = time.time() - t0
    result = os.path.join(out, "bench_gpu.json")
    if rc != 0 or not os.path.exists(result):
        with open(os.path.join(out, "log.txt")) as f:
            tail = "".join(f.readlines()[-15:])
        print(f"gpu_baseline_compare: {build} process {index} failed (rc={rc}, {secs:.0f}s):\n{tail}", flush=True)
        return None, secs
    with open(result) as f:
        return json.load(f), secs


def rows_of(data: dict, build: str) -> Dict[Key, float]:
    """ms per key of one process; the earlier build's rows are keyed without a variant (it has one)."""
    out = {}
    for table in ("chain", "layouts"):
        for r in data[table]:
            variant = "" if build == BASELINE else r.get("variant", "")
            out[(table, r["case"], r["contender"], variant)] = r["ms"]
    return out


def compare(runs: Dict[str, List[Dict[Key, float]]], tolerance: float) -> List[dict]:
    """One row per case of this tree with its earlier-build counterpart (same table, case and contender)."""
    out = []
    for key in runs[CURRENT][0]:
        table, case, contender, variant = key
        base_key = (table, case, contender, "")
        if base_key not in runs[BASELINE][0]:
            continue
        cur = [r[key] for r in runs[CURRENT]]
        base = [r[base_key] for r in runs[BASELINE]]
        per_round = [c / b for c, b in zip(cur, base)]
        ratio = statistics.median(cur) / statistics.median(base)
        if ratio > 1 + tolerance and min(per_round) > 1:
            verdict = "slower"
        elif ratio < 1 - tolerance and max(per_round) < 1:
            verdict = "faster"
        else:
            verdict = "same"
        out.append({"table": table, "case": case, "contender": contender, "variant": variant,
                    "current_ms": statistics.median(cur), "baseline_ms": statistics.median(base),
                    "ratio": ratio, "round_ratios": per_round, "current_all_ms": cur, "baseline_all_ms": base,
                    "verdict": verdict, "control": contender.startswith("copy")})
    return out


def verdict_line(rows: List[dict], tolerance: float) -> str:
    timed = [r for r in rows if not r["control"]]
    slower = [r for r in timed if r["verdict"] == "slower"]
    faster = [r for r in timed if r["verdict"] == "faster"]
    copy = [r["ratio"] for r in rows if r["control"]]
    text = (f"{len(timed)} cases: {len(slower)} slower, {len(faster)} faster (by more than {tolerance:.0%} in "
            f"every round), {len(timed) - len(slower) - len(faster)} within noise")
    if copy:
        text += f"; copy control ratio {min(copy):.3f}-{max(copy):.3f}"
    if slower:
        worst = max(slower, key=lambda r: r["ratio"])
        text += f"; worst {worst['case']} {worst['contender']} [{worst['variant']}] {worst['ratio']:.3f}x"
    return ("REGRESSION: " if slower else "no regression: ") + text


def render(header: dict, rows: List[dict], line: str) -> str:
    lines = ["# Chain kernels: this tree against an earlier commit, same GPU", "",
             ", ".join(f"{k}: {v}" for k, v in header.items()), "",
             "Separate processes per build, alternating; ms = median over a build's processes of bench_gpu.py's "
             "per-process medians (CUDA events); ratio = this tree / earlier commit; rounds = range of the "
             "per-round ratios; variant = this tree's QGOFT_CUDA_VARIANT (the earlier build has one kernel set).",
             "", f"**{line}**", "",
             "| table | case | contender | variant | this tree ms | earlier ms | ratio | rounds | verdict |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        rr = r["round_ratios"]
        lines.append(f"| {r['table']} | {r['case']} | {r['contender']} | {r['variant']} | {r['current_ms']:.4f} | "
                     f"{r['baseline_ms']:.4f} | {r['ratio']:.3f} | {min(rr):.3f}-{max(rr):.3f} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-lib", required=True, help="the earlier commit's libqgoft_ops.so")
    ap.add_argument("--baseline-label", default="earlier commit")
    ap.add_argument("--current-label", default=None, help="default: this tree's commit (bench_gpu.git_commit)")
    ap.add_argument("--pairs", type=int, default=4, help="rounds of one process per build")
    ap.add_argument("--rounds", type=int, default=7, help="bench_gpu.py --rounds inside each process")
    ap.add_argument("--variants", default="base", help="this tree's QGOFT_CUDA_VARIANT values to compare")
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--process-timeout", type=float, default=90, help="seconds per process")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: bench_gpu.py --dry-run (tiny CPU shapes)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "gpu-check", "baseline-runs"))
    args = ap.parse_args()
    if not args.out:
        ap.error("--out (or $OUT) is needed")
    if not os.path.isfile(args.baseline_lib):
        print(f"gpu_baseline_compare: no earlier build at {args.baseline_lib}", file=sys.stderr)
        return 1
    args.baseline_lib = os.path.abspath(args.baseline_lib)
    runs: Dict[str, List[Dict[Key, float]]] = {CURRENT: [], BASELINE: []}
    headers: Dict[str, dict] = {}
    seconds: Dict[str, List[float]] = {CURRENT: [], BASELINE: []}
    t0 = time.time()
    for i in range(args.pairs):
        for build in ((CURRENT, BASELINE) if i % 2 == 0 else (BASELINE, CURRENT)):
            data, secs = run_process(build, i, args, args.work)
            seconds[build].append(round(secs, 1))
            if data is None:
                return 1
            headers.setdefault(build, data["header"])
            runs[build].append(rows_of(data, build))
            print(f"gpu_baseline_compare: round {i + 1}/{args.pairs} {build} {secs:.1f}s", flush=True)
    rows = compare(runs, args.tolerance)
    if not rows:
        print("gpu_baseline_compare: the two builds' tables share no case", file=sys.stderr)
        return 1
    cur = headers[CURRENT]
    header = {"date": cur["date"], "device": cur.get("device"), "torch": cur["torch"], "cuda": cur["cuda"],
              "this tree": args.current_label or git_commit(), "earlier commit": args.baseline_label,
              "processes": f"{args.pairs} per build, A B / B A alternating",
              "process seconds": f"this tree {seconds[CURRENT]}, earlier {seconds[BASELINE]}",
              "total seconds": round(time.time() - t0, 1)}
    line = verdict_line(rows, args.tolerance)
    text = render(header, rows, line)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "baseline_compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "baseline_compare.json"), "w") as f:
        json.dump({"header": header, "verdict": line, "rows": rows,
                   "process_headers": headers}, f, indent=1)
    print(f"gpu_baseline_compare: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
