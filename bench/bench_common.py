"""Shared helpers of ``bench/run.py``: devices, interleaved timing, machine description.

Timing protocol (docs/MATH.md Sec. 10): contenders of one group run side by side in one process, in rounds;
inside a round each contender runs once (``inner`` calls), the order rotating from round to round so that
no contender always follows the same neighbour. Per-call times are medians over the rounds; ratios to the
group's baseline are the median of the per-round ratios (baseline and contender measured seconds apart,
which cancels most of the drift of a shared machine's load).
"""
from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch


# ------------------------------------------------------------------------------------------------------
# Devices.
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Where a benchmark runs: device and activation dtype (fp32 on CPU, bf16 on CUDA)."""

    device: str
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def label(self) -> str:
        return f"{self.device} {str(self.dtype).replace('torch.', '')}"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


@dataclass
class ChainProblem:
    """The parallel layout of width d on a target with small random angles (and their blocks)."""

    pairs: torch.Tensor
    offsets: torch.Tensor
    angles: torch.Tensor
    blocks: torch.Tensor

    @classmethod
    def parallel(cls, d: int, target: Target) -> "ChainProblem":
        from qgoft import layouts, reference

        lay = layouts.parallel(d)
        angles = (torch.randn(lay.num_pairs) * 0.1).to(target.device)
        return cls(lay.pairs_tensor().to(target.device), lay.layer_offsets_tensor().to(target.device),
                   angles, reference.blocks_from_angles(angles).contiguous())

    def kernel_calls(self, x: torch.Tensor, g: torch.Tensor) -> Dict[str, Callable[[], object]]:
        """The four chain kernels on x (rows, d), backward with grad g (dx and the parameter grads):
        keys "goft forward", "goft backward", "qgoft forward", "qgoft backward"."""
        ops, p, o, mask = torch.ops.qgoft, self.pairs, self.offsets, [True, True, False]
        return {
            "goft forward": lambda: ops.givens_chain(x, self.angles, p, o, None),
            "goft backward": lambda: ops.givens_chain_backward(g, x, self.angles, p, o, None, mask),
            "qgoft forward": lambda: ops.quasi_givens_chain(x, self.blocks, p, o, None),
            "qgoft backward": lambda: ops.quasi_givens_chain_backward(g, x, self.blocks, p, o, None, mask),
        }


def targets(which: str) -> List[Target]:
    """``which``: ``auto`` (CPU, plus CUDA when present), ``cpu`` or ``cuda``."""
    out = []
    if which in ("auto", "cpu"):
        out.append(Target("cpu", torch.float32))
    if which in ("auto", "cuda") and torch.cuda.is_available():
        out.append(Target("cuda", torch.bfloat16))
    if which == "cuda" and not out:
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    return out


# ------------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Per-call seconds of one contender: every round's sample, the median, and the median ratio to the
    group's baseline over the same rounds (``None`` for the baseline itself or when not interleaved)."""

    name: str
    samples: List[float]
    inner: int = 1
    ratio: Optional[float] = None
    interleaved: bool = True
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Half the interquartile range relative to the median (a noise indicator), 0 with < 4 samples."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / 2 / self.median


def _call(fn: Callable[[], object], inner: int, target: Target) -> float:
    target.sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    target.sync()
    return (time.perf_counter() - t0) / inner


def interleaved(contenders: Dict[str, Callable[[], object]], target: Target, *, baseline: str,
                budget_s: float, min_rounds: int, max_rounds: int, min_sample_s: float = 0.0,
                slow_factor: float = math.inf, slow_min_s: float = math.inf, slow_calls: int = 2,
                log: Callable[[str], None] = lambda s: None) -> Dict[str, Timing]:
    """Time ``contenders`` (name -> zero-argument callable) in interleaved rounds.

    Two warm-up calls each; ``inner`` repetitions per sample so that one sample lasts >= ``min_sample_s``;
    as many rounds as fit ``budget_s`` (clamped to ``[min_rounds, max_rounds]``). A contender whose
    warm-up exceeds both ``slow_factor`` x the baseline's and ``slow_min_s`` seconds is left out of the
    rounds and timed up to ``slow_calls`` more times after them, as many as fit ``budget_s``, its last
    warm-up call counting as a sample (flagged ``interleaved=False``), so one very slow peer cannot dictate
    the run time; its ratio is then its median over the baseline's median.
    """
    names = list(contenders)
    assert baseline in contenders, baseline
    warm: Dict[str, float] = {}
    for name in names:
        first = _call(contenders[name], 1, target)
        # A second warm-up call for cheap contenders (allocator, caches, lazy init); skip it when slow.
        warm[name] = _call(contenders[name], 1, target) if first < 1.0 else first
    slow = [n for n in names if n != baseline and warm[n] > max(slow_factor * warm[baseline], slow_min_s)]
    fast = [n for n in names if n not in slow]
    inner = {n: max(1, min(10000, math.ceil(min_sample_s / max(warm[n], 1e-7)))) for n in fast}
    round_s = sum(warm[n] * inner[n] for n in fast)
    rounds = int(max(min_rounds, min(max_rounds, budget_s // max(round_s, 1e-9))))
    samples: Dict[str, List[float]] = {n: [] for n in fast}
    for r in range(rounds):
        k = r % len(fast)
        for name in fast[k:] + fast[:k]:
            samples[name].append(_call(contenders[name], inner[name], target))
    out: Dict[str, Timing] = {}
    base = samples[baseline]
    for name in fast:
        t = Timing(name, samples[name], inner[name])
        if name != baseline:
            t.ratio = statistics.median(s / b for s, b in zip(samples[name], base))
        t.meta["rounds"] = rounds
        out[name] = t
    for name in slow:
        # Very slow calls: the (second, else first) warm-up call is a sample too, and no more calls are made
        # than fit in the budget.
        extra = int(min(slow_calls, budget_s // warm[name]))
        log(f"    {name}: {warm[name]:.2f} s per call, timed {extra + 1}x outside the rounds")
        s = [warm[name]] + [_call(contenders[name], 1, target) for _ in range(extra)]
        t = Timing(name, s, 1, interleaved=False)
        t.ratio = t.median / out[baseline].median
        t.meta["rounds"] = len(s)
        out[name] = t
    return {n: out[n] for n in names}


# ------------------------------------------------------------------------------------------------------
# Machine description.
# ------------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cache() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cache size"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def loadavg() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("nan")


def git_revision(root: str) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (+ local changes)" if dirty else "") if rev else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\b(processor|cpu|with radeon graphics|\d+-core)\b", "", text)
    text = re.sub(r"@.*", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_info(threads: int, root: str) -> Dict[str, object]:
    import qgoft

    info = qgoft.build_info()
    cores = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil is optional
        physical = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    name = f"{slug(cpu_model())}-{cores}cpu" + (f"-{slug(gpu)}" if gpu else "")
    return {
        "slug": name,
        "cpu": cpu_model(),
        "cpu_cache": cpu_cache(),
        "logical_cpus": cores,
        "physical_cores": physical,
        "mem_gib": round(mem_total_gib(), 1),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": threads,
        "qgoft": info.get("qgoft_version"),
        "qgoft_isa": info.get("cpu_isa_selected"),
        "qgoft_isas_supported": info.get("cpu_isas_supported"),
        "qgoft_extension": info.get("extension_loaded"),
        "qgoft_cuda": info.get("cuda_compiled"),
        "qgoft_tile_rows": info.get("cpu_tile_rows"),
        "git": git_revision(root),
        "loadavg_start": loadavg(),
    }


def describe_machine(m: Dict[str, object]) -> str:
    phys = f", {m['physical_cores']} physical" if m.get("physical_cores") else ""
    text = (f"{m['cpu']} ({m['logical_cpus']} logical CPUs{phys}, cache {m['cpu_cache']}), "
            f"{m['mem_gib']} GiB; torch {m['torch']}, Python {m['python']}, {m['threads']} threads; "
            f"qgoft {m['qgoft']} (git {m['git']}), kernel ISA `{m['qgoft_isa']}` "
            f"(supported: {', '.join(m['qgoft_isas_supported'] or [])})")
    if m.get("gpu"):
        text += f"; GPU {m['gpu']} (CUDA {m['cuda']}, qgoft CUDA kernels: {m['qgoft_cuda']})"
    return text


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: Optional[str] = None) -> str:
    """A markdown table; ``align`` is one character per column, ``l`` or ``r`` (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)
