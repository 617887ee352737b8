"""Resource report of the CUDA chain kernels without a GPU: compiles each csrc/cuda/chain_<dtype>.cu for one
architecture with the build's CUDA flags, then prints per kernel the ptxas figures (registers, spill bytes,
stack frame, shared memory) and SASS instruction counts (all, 16-byte global loads / stores, local-memory
accesses, shuffles, barriers).

    python tools/cuda_resource_report.py [--arch sm_90] [--out report.json] [--compare old.json]
    python tools/cuda_resource_report.py --binary qgoft/libqgoft_cuda.so   # a built library: no compiling

Needs nvcc; SASS counts need cuobjdump (CUDA toolkit, or `pip install nvidia-cuda-cuobjdump`; found on
PATH, next to nvcc, or through $CUOBJDUMP). --compare prints the differences against an earlier report.
--binary reads an already built library or object instead (registers and stack from `cuobjdump -res-usage`;
spill bytes are only in ptxas's report).

    python tools/cuda_resource_report.py --sources csrc/cuda/chain_bf16.cu --row-loop parallel_backward_reg_kernel

--row-loop SUBSTRING (repeatable) also counts the static SASS instructions of the row loop of every kernel whose
name contains SUBSTRING, two ways (columns `loop` and `span`, each with its opcode histogram). The loop is the
kernel's persistent-grid loop over its rows (the first `for (...)` after the kernel's first line whose header
steps by gridDim.x), without the segmented rows' top-layer block (an `if (segmented ...) { ... }` in it: warp 0
only, segmented rows only). `loop`: the instructions that `nvdisasm -gi` line information attributes
(outermost inlining level: the kernel source line they were inlined into) to the loop's lines. `span`: the
instructions placed between the loop's head and its back edge, without the top-layer block (from the branch
around it to the branch's target): this one also counts what the compiler recomputes per row but attributes to lines before the loop (values
hoisted in the source and rematerialised in the loop to save registers), and leaves out what it attributes to
the loop's lines but places outside (e.g. the path of a block without rows). A warp issues every instruction
on its path once and its lanes take both sides of the lower / upper branches, so for rows that are not
segmented `span` is an upper bound, and close, of the instructions a warp issues per row (code that only some
warps run, e.g. warp 0's accumulation, counts fully; docs/CUDA.md, "The `reg` backward"). Needs nvdisasm (CUDA
toolkit, or `pip install nvidia-cuda-nvdisasm`; PATH, next to cuobjdump / nvcc, or $NVDISASM).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
# the flags CMakeLists.txt gives the CUDA sources (QGOFT_CUDA_FLAGS), plus the C++ standard and -O3
FLAGS = ["-std=c++20", "-O3", "-lineinfo", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def find_tool(name: str, env: str, near: str | None) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    cands = [shutil.which(name)]
    if near:
        cands.append(os.path.join(os.path.dirname(os.path.realpath(near)), name))
    cands.append(f"/usr/local/cuda/bin/{name}")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle_short(name: str) -> str:
    """parallel_backward_kernel<__nv_bfloat16, true, true> from the mangled name, via c++filt."""
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name
    out = re.sub(r"^void qgoft::cuda::detail::", "", out)
    out = re.sub(r"\(qgoft::cuda::\w+\)$", "", out)
    return out


# the row loop of a kernel with a persistent grid, and the branch inside it that --row-loop leaves out
ROW_LOOP = re.compile(r"^\s*(for \(.*gridDim\.x|for_each_row\()")
TOP_BRANCH = re.compile(r"^\s*if \(segmented\b")


def block_end(lines: list[str], first: int) -> int:
    """Index of the line that closes the brace block opened on lines[first] (// comments ignored)."""
    depth = 0
    opened = False
    for i in range(first, len(lines)):
        code = re.sub(r"//.*", "", lines[i])
        for ch in code:
            if ch == "{":
                depth += 1
                opened = True
            elif ch == "}":
                depth -= 1
        if opened and depth <= 0:
            return i
    raise ValueError(f"no closing brace for line {first + 1}")


def row_loop_lines(lines: list[str], kernel_line: int) -> tuple[int, int, set[int]]:
    """(first, last, excluded) 1-based source lines of the row loop of the kernel starting at kernel_line."""
    for i in range(kernel_line - 1, len(lines)):
        if ROW_LOOP.search(lines[i]):
            end = block_end(lines, i)
            excluded: set[int] = set()
            for j in range(i + 1, end):
                if TOP_BRANCH.search(lines[j]):
                    excluded.update(range(j + 1, block_end(lines, j) + 2))
            return i + 1, end + 1, excluded
    raise ValueError(f"no row loop (for ... gridDim.x) after line {kernel_line}")


class Ins(NamedTuple):
    """One SASS instruction of `nvdisasm -gi`: address, its line information as (file, line) frames from the
    innermost inlined function out to the kernel, opcode, and the label a branch goes to."""
    addr: int
    frames: tuple[tuple[str, int], ...]
    op: str
    target: str | None


def parse_line_info_sass(text: str) -> dict[str, tuple[list[Ins], dict[str, int]]]:
    """`nvdisasm -gi` output -> {mangled function: (instructions without NOPs, {label: address})}. The
    `//## File "f", line n [inlined at ...]` lines before an instruction give its frames (it keeps them for
    the instructions after it that have none of their own)."""
    funcs: dict[str, tuple[list[Ins], dict[str, int]]] = {}
    cur = None
    frames: list[tuple[str, int]] = []
    fresh = True  # the next `//## File` line starts a new list of frames
    pending: list[str] = []
    for line in text.splitlines():
        m = re.match(r"//-+ \.text\.(\S+) -+", line)
        if m:
            cur = funcs.setdefault(m.group(1), ([], {}))
            frames, fresh, pending = [], True, []
            continue
        if cur is None:
            continue
        m = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
        if m:
            if fresh:
                frames, fresh = [], False
            frames.append((m.group(1), int(m.group(2))))
            continue
        m = re.match(r"^(\.L\w+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if not m:
            continue
        fresh = True
        addr = int(m.group(1), 16)
        for label in pending:
            cur[1][label] = addr
        pending = []
        op = re.sub(r"^@!?U?P\w+\s+", "", m.group(2)).split()[0]
        target = re.search(r"`\((\.L\w+)\)", m.group(2))
        if op != "NOP":
            cur[0].append(Ins(addr, tuple(frames), op, target.group(1) if target else None))
    return funcs


def row_loop_count(instrs: list[Ins], labels: dict[str, int]) -> dict:
    """The row loop of one kernel (parse_line_info_sass; the kernel's source file and first line are the
    outermost frame of its first instruction). An instruction's loop line is its innermost frame in that file
    inside the loop's lines (the loop body's own line, also when it is a lambda inlined through a helper of
    another file), if any. Counted two ways:
    * loop: the instructions with a loop line, minus those whose loop line is in the top-layer block;
    * span: the instructions placed between the loop's head and its back edge (the last backward branch
      whose loop line is the loop's first line), minus the top-layer block (from the branch around it to
      that branch's target): also counts what the compiler placed in the loop but attributed to lines outside it
      (e.g. values computed before the loop and recomputed per row to save registers), and leaves out code
      attributed to the loop's lines but placed outside it (e.g. the path taken when a block has no row)."""
    src, kernel_line = instrs[0].frames[-1]
    with open(src) as f:
        lines = f.read().splitlines()
    first, last, excluded = row_loop_lines(lines, kernel_line)

    def loop_line(i: Ins) -> int | None:
        return next((n for file, n in i.frames if file == src and first <= n <= last), None)

    ops = Counter(i.op.split(".")[0] for i in instrs if loop_line(i) is not None and loop_line(i) not in excluded)
    res = {"loop": sum(ops.values()), "loop_ops": dict(ops),
           "loop_lines": f"{os.path.relpath(src, ROOT)}:{first}-{last}"
                         + (f" without {min(excluded)}-{max(excluded)}" if excluded else "")}
    back = [i for i in instrs if loop_line(i) == first and i.op.startswith("BRA") and i.target
            and labels.get(i.target, i.addr) < i.addr]
    if back:
        head, tail = labels[back[-1].target], back[-1].addr
        body = [i for i in instrs if head <= i.addr <= tail]
        # the top-layer block's code: from the branch around it (the first forward branch of its `if` line)
        # to that branch's target
        top_first = min(excluded) if excluded else None
        # (none without a top-layer block: loop_line is None for every instruction outside the loop's lines)
        guard = next((i for i in body if top_first is not None and loop_line(i) == top_first
                      and i.op.startswith("BRA") and i.target and labels.get(i.target, 0) > i.addr), None)
        skip = (guard.addr, labels[guard.target]) if guard else (0, 0)
        span = Counter(i.op.split(".")[0] for i in body if not skip[0] <= i.addr < skip[1])
        res.update(span=sum(span.values()), span_ops=dict(span))
    return res


def row_loop_counts(nvdisasm: str, cubin: str, substrings: list[str]) -> dict[str, dict]:
    """{mangled kernel: row_loop_count} for the kernels of cubin whose short name contains a substring."""
    text = subprocess.run([nvdisasm, "-gi", "-c", cubin], capture_output=True, text=True, check=True).stdout
    return {name: row_loop_count(instrs, labels) for name, (instrs, labels) in parse_line_info_sass(text).items()
            if instrs and any(s in demangle_short(name) for s in substrings)}


def compile_one(nvcc: str, cuobjdump: str | None, src: str, arch: str, tmp: str,
                nvdisasm: str | None = None, row_loop: list[str] | None = None) -> dict:
    cubin = os.path.join(tmp, os.path.basename(src) + ".cubin")
    proc = subprocess.run([nvcc, *FLAGS, f"-arch={arch}", "-cubin", "-Xptxas=-v", "-I", CUDA_DIR, src,
                           "-o", cubin], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"nvcc failed for {src}:\n{proc.stderr[-4000:]}")
    kernels: dict[str, dict] = {}
    name = None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            name = m.group(1)
            kernels[name] = {}
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[name].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[name]["regs"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            kernels[name]["smem"] = int(m2.group(1)) if m2 else 0
    if cuobjdump:
        sass_counts(cuobjdump, cubin, kernels)
    if nvdisasm and row_loop:
        for name, loop in row_loop_counts(nvdisasm, cubin, row_loop).items():
            kernels.setdefault(name, {}).update(loop)
    return {demangle_short(k): v for k, v in kernels.items()}


def from_binary(cuobjdump: str, path: str) -> dict:
    """Registers and stack of every kernel in a built library (cuobjdump -res-usage), plus SASS counts."""
    kernels: dict[str, dict] = {}
    out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    name = None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            kernels[name] = {"regs": int(m.group(1)), "stack": int(m.group(2)), "smem": int(m.group(3))}
            name = None
    sass_counts(cuobjdump, path, kernels)
    return {demangle_short(k): v for k, v in kernels.items() if "qgoft" in k}


def sass_counts(cuobjdump: str, path: str, kernels: dict) -> None:
    """Adds the SASS counts of every function of `path` to `kernels` (by mangled name)."""
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    cur = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = kernels.setdefault(m.group(1), {})
            cur.update(sass=0, ldg128=0, stg128=0, local=0, shfl=0, bar=0)
            continue
        if cur is None or not re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            continue
        ins = line.split("*/", 1)[1].strip()
        op = re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0] if ins.split() else ""
        if op in ("", "NOP"):
            continue
        cur["sass"] += 1
        if op.startswith("LDG") and ".128" in op:
            cur["ldg128"] += 1
        if op.startswith("STG") and ".128" in op:
            cur["stg128"] += 1
        if op.startswith(("LDL", "STL")):
            cur["local"] += 1
        if op.startswith("SHFL"):
            cur["shfl"] += 1
        if op.startswith("BAR"):
            cur["bar"] += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", help="write the report as JSON")
    ap.add_argument("--compare", help="an earlier JSON report: print the per-kernel differences")
    ap.add_argument("--sources", nargs="*", help="the .cu files (default: csrc/cuda/chain_*.cu)")
    ap.add_argument("--binary", help="report on this built library / object instead of compiling")
    ap.add_argument("--row-loop", action="append", metavar="SUBSTRING",
                    help="count the row loop of the kernels whose name contains SUBSTRING (repeatable)")
    args = ap.parse_args()
    report: dict[str, dict] = {}
    nvcc = find_tool("nvcc", "CUDACXX", None)
    if args.binary:
        if args.row_loop:
            sys.exit("--row-loop needs the line information of a compile: not with --binary")
        cuobjdump = find_tool("cuobjdump", "CUOBJDUMP", nvcc)
        if cuobjdump is None:
            sys.exit("cuobjdump not found (set CUOBJDUMP)")
        report = from_binary(cuobjdump, args.binary)
        if not report:  # e.g. the ops library, whose CUDA kernels live in libqgoft_cuda.so
            sys.exit(f"{args.binary}: no CUDA kernels found (the kernels are in qgoft/libqgoft_cuda.so)")
        return print_report(report, args)
    if nvcc is None:
        sys.exit("nvcc not found (set CUDACXX)")
    cuobjdump = find_tool("cuobjdump", "CUOBJDUMP", nvcc)
    if cuobjdump is None:
        print("cuobjdump not found: no SASS counts (pip install nvidia-cuda-cuobjdump)", file=sys.stderr)
    nvdisasm = None
    if args.row_loop:
        nvdisasm = find_tool("nvdisasm", "NVDISASM", cuobjdump or nvcc)
        if nvdisasm is None:
            sys.exit("nvdisasm not found for --row-loop (set NVDISASM; pip install nvidia-cuda-nvdisasm)")
    srcs = args.sources or sorted(glob.glob(os.path.join(CUDA_DIR, "chain_*.cu")))
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
        for part in ex.map(lambda s: compile_one(nvcc, cuobjdump, s, args.arch, tmp, nvdisasm, args.row_loop), srcs):
            report.update(part)
    return print_report(report, args)


def print_report(report: dict, args: argparse.Namespace) -> int:
    old = json.load(open(args.compare)) if args.compare else {}
    cols = ["regs", "spill_st", "spill_ld", "stack", "smem", "sass", "ldg128", "stg128", "local", "shfl", "bar"]
    if any("loop" in r for r in report.values()):
        cols += ["loop", "span"]
    print(f"{'kernel':<70} " + " ".join(f"{c:>8}" for c in cols))
    for name in sorted(report):
        r = report[name]
        cells = []
        for c in cols:
            v = r.get(c, "")
            if name in old and c in old[name] and old[name][c] != v:
                v = f"{old[name][c]}>{v}"
            cells.append(f"{v:>8}")
        print(f"{name[:70]:<70} " + " ".join(cells))
    for name in sorted(set(old) - set(report)):
        print(f"{name[:70]:<70} (gone)")
    for name in sorted(n for n in report if "loop" in report[n]):
        r, o = report[name], old.get(name, {})
        print(f"\nrow loop of {name} ({r['loop_lines']}):")
        for key, what in (("loop", "attributed to its lines"), ("span", "placed between its head and back edge")):
            if key not in r:
                continue
            was = o.get(key)
            print(f"  {key}: {r[key]} SASS instructions {what}"
                  + (f" (was {was})" if was is not None and was != r[key] else ""))
            ops, was_ops = r[f"{key}_ops"], o.get(f"{key}_ops", {})
            cells = []
            for op in sorted(set(ops) | set(was_ops), key=lambda x: (-ops.get(x, 0), x)):
                n, w = ops.get(op, 0), was_ops.get(op, 0)
                cells.append(f"{op} {n}" + (f" (was {w})" if was_ops and w != n else ""))
            print("    " + ", ".join(cells))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
