"""GPU timings of qgoft's CUDA chain kernels, every kernel variant side by side, of qgoft.nn.Linear against a
frozen nn.Linear, PEFT LoRA r=8 and PEFT OFT, and of a LLaMA-shaped stack's training step against LoRA
(targets 1-4 and the second half of 5 of docs/CUDA.md, "GPU targets").
Contenders of a table run in one process, in interleaved rounds, timed with CUDA events after warm-up;
medians are reported. The kernel variant of each chain call is chosen with QGOFT_CUDA_VARIANT (read by the
planner per call), so the variants share every round; a variant `V+prefetch` is V with QGOFT_CUDA_FORWARD=prefetch
(the prefetching forward: forward rows, and the backward rows of its top pass at d > 4096), `V+serial` is V with
QGOFT_CUDA_REDUCE=serial (the serial reduction of the partial rows: backward rows with parameter gradients, also in
a table at all-MiniLM-L6-v2's shapes, 2048 rows x d = 384 and 1536 bf16, beside the split one), `V+pair` V with
QGOFT_CUDA_BACKWARD=pair (the paired reg backward: the bf16 backward rows with parameter gradients), `V+pair+nol2`
V+pair with QGOFT_CUDA_PAIR_PREFETCH=off (its kernel without the L2 prefetch: the bf16 goft and qgoft backward rows
with parameter gradients at d = 4096), `V+recompute` V
with QGOFT_CUDA_TOPS=recompute (the backward rows with parameter gradients at d > 4096, which are given the
forward's segment tops, recompute them in a top pass instead: docs/CUDA.md, "Saved segment tops"); the layout table
(target 3) times stack=2 and the butterfly on the general and the fused XOR kernels (QGOFT_CUDA_XOR=general|fused)
side by side.

    python bench/bench_gpu.py [--rounds 15] [--out DIR] [--quick] [--variants base,table,table+prefetch]
    python bench/bench_gpu.py --only kernels --variants reg,reg+pair   # the paired reg backward beside reg
    python bench/bench_gpu.py --only kernels --variants reg+prefetch+pair,reg+prefetch+pair+nol2   # its L2 prefetch A/B
    python bench/bench_gpu.py --only kernels --variants reg+prefetch,reg+prefetch+recompute   # saved tops or not
    python bench/bench_gpu.py --dry-run     # no GPU: tiny shapes on the CPU, CPU timers (checks the script)
    python bench/bench_gpu.py --only kernels --xor general   # the chain and layout tables only
    QGOFT_DISABLE_EXTENSION=1 python bench/bench_gpu.py --only kernels --ops-library OTHER/libqgoft_ops.so
        # the same tables for the ops library of another build (an earlier commit's: one process per build,
        # tools/gpu_baseline_compare.py alternates them); this tree's package supplies only the layouts

Writes bench_gpu.md and bench_gpu.json (header, tables, targets with met / missed and the number) into
--out (default $OUT when set).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

import qgoft
from qgoft import layouts

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_common as bc  # noqa: E402
import bench_layer as bl  # noqa: E402

VARIANTS = ("base", "table", "reg", "table+prefetch", "reg+prefetch", "reg+serial", "reg+pair", "reg+pair+nol2")
CHAIN_OPS = ("givens_chain", "givens_chain_backward", "quasi_givens_chain", "quasi_givens_chain_backward")
# Variants whose forward kernels are another variant's (reg changes the backward only): their forward rows and
# the layout table (target 3) are timed under that variant only.
SAME_FORWARD = {"reg": "table", "reg+prefetch": "table+prefetch", "reg+pair": "reg", "reg+single": "reg"}
# The switches a variant name's `+S` suffixes set (`V+S1+S2`: variant V with S1 and S2), and their values without:
# `+prefetch` the prefetching forward, `+serial` the serial reduction, `+pair` the paired reg backward, `+recompute` the
# top pass whatever segment tops the backward is given, `+nol2` the paired kernel without its L2 prefetch of the pair
# after the next (docs/CUDA.md, "Debug knobs").
SUFFIX_KNOBS = {"prefetch": ("QGOFT_CUDA_FORWARD", "prefetch"), "serial": ("QGOFT_CUDA_REDUCE", "serial"),
                "pair": ("QGOFT_CUDA_BACKWARD", "pair"), "single": ("QGOFT_CUDA_BACKWARD", "single"),
                "recompute": ("QGOFT_CUDA_TOPS", "recompute"), "nol2": ("QGOFT_CUDA_PAIR_PREFETCH", "off")}
KNOB_DEFAULTS = {"QGOFT_CUDA_FORWARD": "plain", "QGOFT_CUDA_REDUCE": "split", "QGOFT_CUDA_BACKWARD": "auto",
                 "QGOFT_CUDA_TOPS": "saved", "QGOFT_CUDA_PAIR_PREFETCH": "on"}
# Every kernel switch of the CUDA planner (docs/CUDA.md, "Debug knobs"): the ones a variant name sets and the path,
# segment and XOR-path overrides; a tool that runs kernels under chosen switches clears these first.
KERNEL_SWITCHES = ("QGOFT_CUDA_PATH", "QGOFT_CUDA_SEGMENT", "QGOFT_CUDA_VARIANT", "QGOFT_CUDA_XOR", *KNOB_DEFAULTS)
# Variants that change only the single parallel layout's forward kernel (`V+prefetch`: QGOFT_CUDA_FORWARD=prefetch
# under V): of the chain table only their forward rows are timed (their backward kernels are V's), and the backward
# rows with parameter gradients of rows wider than one 4096-element backward segment, whose recomputing top pass
# runs the prefetching forward (docs/CUDA.md, "The prefetching forward"); the layout table (stacks and the
# butterfly, which it does not change) leaves them out; the Linear and LLaMA tables, whose steps run a forward,
# time them like any variant.
def forward_only(variant: str) -> bool:
    return variant.endswith("+prefetch")


# Variants that change only the reduction of the backward's partial rows (`V+serial`: QGOFT_CUDA_REDUCE=serial under
# V, one thread per item over every slot; without it the split reduction, docs/CUDA.md "Deterministic reduction"):
# of the chain tables only their backward rows with parameter gradients are timed; the layout and LLaMA tables
# leave them out.
def reduce_only(variant: str) -> bool:
    return variant.endswith("+serial")


# Variants that change only the backward with parameter gradients of the single parallel layout (`V+pair` /
# `V+single`: QGOFT_CUDA_BACKWARD=pair / single under V, 16-bit rows; without either, auto: the paired kernel
# without the scale's gradient): of the chain table only those backward rows in bfloat16 are timed
# (their forward, adjoint and float32 kernels are V's); the layout table leaves them out (stacks run other
# kernels); the Linear and LLaMA tables, whose steps run that backward, time them like any variant.
def backward_only(variant: str) -> bool:
    return "+pair" in variant or "+single" in variant


# Variants that change only where the backward of segmented rows with parameter gradients takes its segment tops
# (`V+recompute`: QGOFT_CUDA_TOPS=recompute under V, the top pass; without it the tops the backward is given, the
# forward's): of the chain table only those backward rows (d > 4096) are timed; the layout, reduction and Linear
# tables (rows of one segment) leave them out; the LLaMA table, whose MLP input has 11008 features, times them.
def tops_only(variant: str) -> bool:
    return variant.endswith("+recompute")


# Variants that change only the L2 prefetch of the paired kernel's instantiation for rows of one segment without the
# scale's gradient (`V+pair+nol2`: QGOFT_CUDA_PAIR_PREFETCH=off under V+pair, `pair_prefetch=0` in the plan; docs/CUDA.md,
# "The paired `reg` backward without the scale's gradient"): of the chain table only the 16-bit backward rows of goft
# and qgoft (parameter gradients, no scale) at d <= 4096 are timed, where that instantiation runs (elsewhere V+pair's
# kernel); every other table leaves them out (backward_only: the layout and reduction tables; here: Linear, LLaMA).
def l2_only(variant: str) -> bool:
    return "+nol2" in variant


L2_ROWS = ("goft backward (dx, dθ)", "qgoft backward (dx, dblocks)")


def knob_env(variant: str) -> Dict[str, str]:
    """The environment variant `V+S...` runs under: QGOFT_CUDA_VARIANT=V and the suffixes' switches (KNOB_DEFAULTS
    for the others)."""
    name, *suffixes = variant.split("+")
    env = {"QGOFT_CUDA_VARIANT": name, **KNOB_DEFAULTS}
    for s in suffixes:
        if s not in SUFFIX_KNOBS:
            raise ValueError(f"variant {variant!r}: unknown suffix +{s} (known: {', '.join(SUFFIX_KNOBS)})")
        var, value = SUFFIX_KNOBS[s]
        env[var] = value
    return env


def top_pass_row(name: str, d: int) -> bool:
    """Whether the chain row `name` at width d is a backward with a top pass (segmented, parameter gradients)."""
    return d > 4096 and ("dθ" in name or "dblocks" in name)
COPY = "copy (buf.copy_(x))"
FWD_TARGET = 0.80   # target 1: >= 80 % of the copy bandwidth of the same tensor
BWD_TARGET = 2.0    # target 2: <= 2.0x the copy time of x
STACK_TARGET = 1.5  # target 3: stack=2 (parallel) <= 1.5x the single parallel layout
BUTTERFLY_TARGET = 2.0
LINEAR_TARGET = 1.20  # target 4: qgoft.nn.Linear fwd+bwd <= 1.20x frozen, below LoRA r=8 and OFT


class Clock:
    """Per-call milliseconds of interleaved contenders: CUDA events on a GPU, perf_counter on the CPU.

    On a GPU every contender's calls are timed between two events with the GPU kept busy while the CPU
    enqueues them: a `torch.cuda._sleep` of at least twice the contender's measured enqueue time runs before
    its start event, so the events time the kernels and not the launch latency of a queue that the previous
    synchronisation emptied (without it the first contender of every round, e.g. the copy, was inflated by
    that latency). The order of the contenders rotates from round to round."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._cycles_per_ms = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def cycles_per_ms(self) -> float:
        """GPU clock cycles per millisecond of `torch.cuda._sleep`, measured once with events."""
        if not self._cycles_per_ms:
            cycles = 2_000_000
            torch.cuda._sleep(cycles)  # warm
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            self._cycles_per_ms = cycles / max(start.elapsed_time(end), 1e-3)
        return self._cycles_per_ms

    def timed(self, contenders: Dict[str, Callable[[], object]], rounds: int, inner: int) -> Dict[str, float]:
        """Median ms per call of each contender over `rounds` interleaved rounds of `inner` calls."""
        for fn in contenders.values():  # warm-up (also validates and caches the layouts)
            for _ in range(3):
                fn()
        self.sync()
        head_start = {}  # GPU cycles to sleep before a contender's start event
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            enqueue_ms = (time.perf_counter() - t0) * 1e3
            self.sync()
            if self.cuda:
                head_start[name] = int(min(max(2 * enqueue_ms, 0.05), 50.0) * self.cycles_per_ms())
        names = list(contenders)
        samples: Dict[str, List[float]] = {k: [] for k in contenders}
        for r in range(rounds):
            marks = []
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn = contenders[name]
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda._sleep(head_start[name])
                    start.record()
                    for _ in range(inner):
                        fn()
                    end.record()
                    marks.append((name, start, end))
                else:
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    samples[name].append((time.perf_counter() - t0) * 1e3 / inner)
            self.sync()
            for name, start, end in marks:
                samples[name].append(start.elapsed_time(end) / inner)
        return {k: statistics.median(v) for k, v in samples.items()}


def with_variant(variant: str, fn: Callable[[], object], xor: str = "general") -> Callable[[], object]:
    """fn run with the switches of `variant` (knob_env: QGOFT_CUDA_VARIANT=V, `+prefetch`: QGOFT_CUDA_FORWARD=prefetch,
    else plain; `+serial`: QGOFT_CUDA_REDUCE=serial, else split; `+pair`: QGOFT_CUDA_BACKWARD=pair, else single) and
    QGOFT_CUDA_XOR=xor (the planner reads them on every call)."""
    env = {**knob_env(variant), "QGOFT_CUDA_XOR": xor}
    def run() -> object:
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k in env:
                os.environ.pop(k, None)
    return run


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


GRAD_ROWS = ("goft backward (dx, dθ)", "goft_scaled backward (dx, dθ, ds)", "qgoft backward (dx, dblocks)")


def chain_rows(rows: int, d: int, dtype: torch.dtype, rounds: int, variants: List[str], dev: str,
               clock: Clock, only: Optional[Sequence[str]] = None) -> List[dict]:
    """Targets 1-2: the parallel-layout chain ops against a copy of x, per variant (only: these rows alone)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    lay = layouts.parallel(d)
    pairs, offs = lay.pairs_tensor(dev), lay.layer_offsets_tensor(dev)
    x = torch.randn(rows, d, device=dev, dtype=dtype, generator=gen)
    g = torch.randn(rows, d, device=dev, dtype=dtype, generator=gen)
    buf = torch.empty_like(x)
    angles = 0.1 * torch.randn(lay.num_pairs, device=dev, generator=gen)
    blocks = torch.eye(2, device=dev).repeat(lay.num_pairs, 1, 1) + 0.1 * torch.randn(
        lay.num_pairs, 2, 2, device=dev, generator=gen)
    scale = 1 + 0.1 * torch.randn(d, device=dev, generator=gen)
    ops = torch.ops.qgoft
    # the backward with parameter gradients is given the segment tops of the forward of its x (under the default
    # switches: (rows, segments) at d > 4096, as autograd saves them; (rows, 0), i.e. none, for rows of one segment);
    # an earlier build's ops library (--ops-library) has no tops: its backward is called without them
    has_tops = hasattr(ops, "givens_chain_with_tops")
    goft_tops = (ops.givens_chain_with_tops(x, angles, pairs, offs, None)[1],) if has_tops else ()
    qgoft_tops = (ops.quasi_givens_chain_with_tops(x, blocks, pairs, offs, None)[1],) if has_tops else ()
    calls = {
        "goft forward": lambda: ops.givens_chain(x, angles, pairs, offs, None),
        "qgoft forward": lambda: ops.quasi_givens_chain(x, blocks, pairs, offs, None),
        "goft backward (dx, dθ)": lambda: ops.givens_chain_backward(g, x, angles, pairs, offs, None,
                                                                    [True, True, False], *goft_tops),
        "goft_scaled backward (dx, dθ, ds)": lambda: ops.givens_chain_backward(
            g, x, angles, pairs, offs, scale, [True, True, True], *goft_tops),
        "qgoft backward (dx, dblocks)": lambda: ops.quasi_givens_chain_backward(
            g, x, blocks, pairs, offs, None, [True, True, False], *qgoft_tops),
        "adjoint (dx only)": lambda: ops.givens_chain_backward(g, x, angles, pairs, offs, None,
                                                               [True, False, False]),
    }
    contenders: Dict[str, Callable[[], object]] = {COPY: lambda: buf.copy_(x)}
    for v in variants:
        for name, fn in calls.items():
            if only is not None and name not in only:
                continue
            if "forward" in name and SAME_FORWARD.get(v) in variants:
                continue
            if "forward" not in name and forward_only(v) and not top_pass_row(name, d):
                continue
            if tops_only(v) and not top_pass_row(name, d):
                continue
            if reduce_only(v) and name not in GRAD_ROWS:
                continue
            if backward_only(v) and ("forward" in name or "dx only" in name or x.element_size() != 2):
                continue  # the paired reg backward: 16-bit rows with parameter gradients only (elsewhere V's kernel)
            if l2_only(v) and (name not in L2_ROWS or d > 4096):
                continue  # without the L2 prefetch: rows of one segment without the scale's gradient only
            contenders[f"{name} [{v}]"] = with_variant(v, fn)
    med = clock.timed(contenders, rounds, inner=5)
    copy = med[COPY]
    nbytes = x.numel() * x.element_size()
    out = []
    for key, ms in med.items():
        name, _, variant = key.partition(" [")
        backward = "backward" in name
        moved = 3 * nbytes if backward else 2 * nbytes  # backward reads x and g, writes dx
        out.append({"case": f"{rows}x{d} {dtype_name(dtype)}", "contender": name, "variant": variant.rstrip("]"),
                    "ms": ms, "vs_copy": ms / copy, "GBps": moved / ms / 1e6,
                    "copy_bw_fraction": (moved / ms) / (2 * nbytes / copy)})
    return out


def reduce_variants(variants: Sequence[str]) -> List[str]:
    """The variants of the reduction table: each one that changes the backward (not V+prefetch; not V+pair, whose
    kernel rows of MiniLM's widths do not take), beside it V+serial (the serial reduction under V)."""
    out: List[str] = []
    for v in variants:
        base = v.partition("+")[0] if reduce_only(v) else v
        if forward_only(base) or backward_only(base) or tops_only(base):
            continue
        for w in (base, f"{base}+serial"):
            if w not in out:
                out.append(w)
    return out


def reduction_rows(rows: int, widths: Sequence[int], dtype: torch.dtype, rounds: int, variants: List[str],
                   dev: str, clock: Clock) -> List[dict]:
    """The backward rows with parameter gradients at all-MiniLM-L6-v2's shapes (2048 rows, d = 384 and 1536),
    where the reduction of the partial rows is the largest cost: the split reduction (V) and the serial one
    (V+serial) side by side (docs/CUDA.md, "The reduction of the partial rows")."""
    out: List[dict] = []
    for d in widths:
        out += chain_rows(rows, d, dtype, rounds, reduce_variants(variants), dev, clock, only=GRAD_ROWS)
    return out


def layout_rows(rows: int, d: int, dtype: torch.dtype, rounds: int, variants: List[str], dev: str,
                clock: Clock, xor_paths: Sequence[str] = ("general", "fused"), butterfly: bool = True) -> List[dict]:
    """Target 3: butterfly and stack=2 (parallel) against the single parallel layout (goft, dx + dθ); the
    stack and the butterfly each on every one of `xor_paths` (QGOFT_CUDA_XOR=general|fused: the general kernels, the
    fused XOR path: the stack's kernels, the butterfly's forward and backward kernels) side by side (docs/CUDA.md, "XOR layouts"); a layout's general row is the baseline of its fused one where
    both are timed. Under reg the fused
    stack's backward is the reg stacked backward, under base the stacked kernel it replaced (docs/CUDA.md, "The
    `reg` stacked backward"): variants base,reg put them side by side, each against its own single layout. A
    `V+prefetch` variant times the forward rows only, the stack's on the prefetching forward (docs/CUDA.md, "The stack's
    prefetching forward") against the prefetching single forward. butterfly=False: the parallel layout and the stack
    only."""
    x = torch.randn(rows, d, device=dev, dtype=dtype)
    g = torch.randn(rows, d, device=dev, dtype=dtype)
    ops = torch.ops.qgoft
    contenders: Dict[str, Callable[[], object]] = {}
    stack2 = layouts.stack(layouts.parallel(d), 2)
    kinds = [("parallel", layouts.parallel(d), "general")]
    if butterfly:
        kinds += [(f"butterfly/{xor}", layouts.butterfly(d), xor) for xor in xor_paths]
    kinds += [(f"parallel*2/{xor}", stack2, xor) for xor in xor_paths]
    for kind, lay, xor in kinds:
        pairs, offs = lay.pairs_tensor(dev), lay.layer_offsets_tensor(dev)
        angles = 0.1 * torch.randn(lay.num_pairs, device=dev)
        fwd = (lambda p=pairs, o=offs, a=angles: ops.givens_chain(x, a, p, o, None))
        bwd = (lambda p=pairs, o=offs, a=angles: ops.givens_chain_backward(g, x, a, p, o, None, [True, True, False]))
        for v in variants:
            if SAME_FORWARD.get(v) not in variants:  # else its forward kernels are timed under that variant
                contenders[f"{kind} forward [{v}]"] = with_variant(v, fwd, xor)
            if not forward_only(v):  # V+prefetch: its backward kernels are V's
                contenders[f"{kind} backward [{v}]"] = with_variant(v, bwd, xor)
    med = clock.timed(contenders, max(3, rounds // 3), 2)
    out = []
    for key, ms in med.items():
        name, _, variant = key.partition(" [")
        kind, direction = name.split(" ")
        variant = variant.rstrip("]")
        single = med[f"parallel {direction} [{variant}]"]
        # a layout on the general kernels is the baseline of its fused path, not a contender for target 3
        out.append({"case": f"{rows}x{d} {dtype_name(dtype)} {kind}", "contender": f"goft {direction}",
                    "variant": variant, "ms": ms, "vs_parallel": ms / single,
                    "baseline": kind.endswith("/general") and "fused" in xor_paths})
    return out


def linear_rows(rows: int, d: int, rounds: int, variants: List[str], dev: str, dtype: torch.dtype,
                clock: Clock) -> List[dict]:
    """Target 4: forward + backward of one adapted Linear (frozen base, input requires grad) per
    contender; qgoft's layers once per kernel variant."""
    target = bc.Target(dev, dtype)
    skip = {bl.REFERENCE: "not timed here", bl.BOFT: "not timed here", bl.ROAD: "not timed here"}
    base, contenders, skipped = bl.build_contenders(d, d, target, extra_layouts=False, log=print, skip=skip)
    x = torch.randn(rows, d, device=dev, dtype=dtype, requires_grad=True)
    gy = torch.randn(rows, d, device=dev, dtype=dtype)
    fns: Dict[str, Callable[[], object]] = {}
    for c in contenders:
        step = bl.train_step(c.module, x, gy)
        if c.name.startswith("qgoft"):
            for v in variants:
                if not tops_only(v) and not l2_only(v):  # rows of one segment: no tops; nol2: the chain table only
                    fns[f"{c.name} [{v}]"] = with_variant(v, step)
        else:
            fns[c.name] = step
    med = clock.timed(fns, rounds, inner=3)
    ref = med[bl.FROZEN]
    flops = 2 * 2 * rows * d * d  # forward + input-gradient matmuls
    out = [{"case": f"Linear {d}x{d} {dtype_name(dtype)}, {rows} rows, fwd+bwd", "contender": k.partition(" [")[0],
            "variant": k.partition(" [")[2].rstrip("]"), "ms": v, "vs_frozen": v / ref, "TFLOPs": flops / v / 1e9}
           for k, v in med.items()]
    for name, why in skipped.items():
        if name in (bl.LORA, bl.OFT):
            out.append({"case": out[0]["case"], "contender": name, "variant": "", "skipped": why})
    return out


LLAMA_LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]
FLOOR = "frozen floor (input grad)"


class LlamaBlock(torch.nn.Module):
    """A LLaMA-shaped decoder block without pretrained weights: RMSNorm, causal attention (q, k, v, o),
    RMSNorm, SwiGLU MLP (gate, up, down); no biases."""

    def __init__(self, d: int, mlp: int, heads: int) -> None:
        super().__init__()
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.heads = heads
        self.n1, self.n2 = torch.nn.RMSNorm(d), torch.nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = lin(d, d), lin(d, d), lin(d, d), lin(d, d)
        self.gate, self.up, self.down = lin(d, mlp), lin(d, mlp), lin(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def llama_rows(blocks: int, d: int, mlp: int, heads: int, batch: int, seq: int, steps: int, dev: str,
               dtype: torch.dtype, variants: List[str]) -> List[dict]:
    """Target 5 (second half): one AdamW training step of a LLaMA-shaped stack with every Linear adapted
    (qgoft GOFT and qGOFT per kernel variant, PEFT LoRA r=8) against the frozen floor (the same stack,
    frozen, backward to its input). One method at a time: median step time (CUDA events) and peak memory
    (max_memory_allocated over the timed steps, the model, optimizer state and activations included)."""
    import qgoft as q

    def build(method: str) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[LlamaBlock(d, mlp, heads) for _ in range(blocks)]).to(dev, dtype)
        model.requires_grad_(False)
        if method in ("goft", "qgoft"):
            model = q.get_qgoft_model(model, q.QGoftConfig(method=method, target_modules=LLAMA_LINEARS))
        elif method == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LLAMA_LINEARS),
                                    model)
        return model

    contenders = [(FLOOR, "floor", "")] + [(f"qgoft {m.upper() if m == 'goft' else 'qGOFT'}", m, v)
                                           for m in ("goft", "qgoft") for v in variants
                                           if not reduce_only(v) and not l2_only(v)]
    if bl.peft_missing() is None:
        contenders.append((bl.LORA, "lora", ""))
    out = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, method, variant in contenders:
        torch.cuda.empty_cache() if dev.startswith("cuda") else None
        model = build(method)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        x = torch.randn(batch, seq, d, device=dev, dtype=dtype, generator=gen, requires_grad=method == "floor")

        def step() -> None:
            y = model(x)
            y.float().square().mean().backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            x.grad = None

        run = with_variant(variant, step) if variant else step
        for _ in range(2):
            run()
        times = []
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            if dev.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else None
        out.append({"case": f"LLaMA-shaped {blocks} blocks d={d} mlp={mlp} {dtype_name(dtype)}, {batch}x{seq} tokens",
                    "contender": name, "variant": variant, "ms": statistics.median(times), "peak_bytes": peak,
                    "trainable": sum(p.numel() for p in params)})
        del model, opt, x, params
    floor = next(r["ms"] for r in out if r["contender"] == FLOOR)
    for r in out:
        r["vs_floor"] = r["ms"] / floor
    return out


def verdict(ok: Optional[bool]) -> str:
    return "not run" if ok is None else ("met" if ok else "MISSED")


def evaluate(chain: List[dict], lays: List[dict], lin: List[dict], llama: List[dict],
             variants: List[str]) -> List[dict]:
    """Targets 1-4 and the LLaMA half of 5 per variant: {"target", "variant", "met": True/False/None,
    "measured", "over"}; `over` (targets 1-4) is how far the case is from its limit, measured / limit for the
    at-most targets and limit / measured for target 1's at-least one: <= 1 within it."""
    def find(rows, case, contender, variant):
        for r in rows:
            if r["case"] == case and r["contender"] == contender and r.get("variant") == variant:
                return r
        return None

    out = []
    cases = sorted({r["case"] for r in chain})
    for v in variants:
        for case in cases:
            for name in ("goft forward", "qgoft forward"):
                r = find(chain, case, name, v)
                if r:
                    out.append({"target": 1, "what": f"{name} {case}: >= {FWD_TARGET:.0%} of copy bandwidth",
                                "variant": v, "met": r["copy_bw_fraction"] >= FWD_TARGET,
                                "measured": f"{r['copy_bw_fraction']:.0%} ({r['ms']:.3f} ms)",
                                "over": FWD_TARGET / r["copy_bw_fraction"]})
            for name in ("goft backward (dx, dθ)", "goft_scaled backward (dx, dθ, ds)", "qgoft backward (dx, dblocks)"):
                r = find(chain, case, name, v)
                if r:
                    out.append({"target": 2, "what": f"{name} {case}: <= {BWD_TARGET}x copy time",
                                "variant": v, "met": r["vs_copy"] <= BWD_TARGET,
                                "measured": f"{r['vs_copy']:.2f}x ({r['ms']:.3f} ms)", "over": r["vs_copy"] / BWD_TARGET})
        for r in lays:
            if r.get("variant") != v or r["case"].endswith(" parallel") or r.get("baseline"):
                continue
            limit = BUTTERFLY_TARGET if "butterfly" in r["case"] else STACK_TARGET
            out.append({"target": 3, "what": f"{r['case']} {r['contender']}: <= {limit}x the parallel layout",
                        "variant": v, "met": r["vs_parallel"] <= limit,
                        "measured": f"{r['vs_parallel']:.2f}x ({r['ms']:.3f} ms)", "over": r["vs_parallel"] / limit})
        peers = {r["contender"]: r for r in lin if "ms" in r and not r["variant"]}
        for r in lin:
            if r.get("variant") != v or "ms" not in r:
                continue
            ok = r["vs_frozen"] <= LINEAR_TARGET
            text = f"{r['vs_frozen']:.3f}x frozen ({r['ms']:.3f} ms)"
            for peer in (bl.LORA, bl.OFT):
                if peer in peers:
                    ok = ok and r["ms"] < peers[peer]["ms"]
                    text += f"; {bl.SHORT[peer]} {peers[peer]['vs_frozen']:.3f}x"
                else:
                    ok = None if ok else ok
                    text += f"; {bl.SHORT[peer]} not timed"
            out.append({"target": 4, "what": f"{r['contender']} {r['case']}: <= {LINEAR_TARGET}x frozen, below LoRA and OFT",
                        "variant": v, "met": ok, "measured": text, "over": r["vs_frozen"] / LINEAR_TARGET})
        lora = next((r for r in llama if r["contender"] == bl.LORA), None)
        for r in llama:
            if r.get("variant") != v:
                continue
            text = f"{r['ms']:.1f} ms, {r['vs_floor']:.2f}x floor"
            ok: Optional[bool] = None
            if lora is not None:
                ok = r["ms"] <= lora["ms"]
                text += f"; LoRA {lora['ms']:.1f} ms"
                if r["peak_bytes"] is not None and lora["peak_bytes"] is not None:
                    ok = ok and r["peak_bytes"] <= lora["peak_bytes"]
                    text += f"; peak {r['peak_bytes'] / 2 ** 30:.2f} vs {lora['peak_bytes'] / 2 ** 30:.2f} GiB"
            out.append({"target": 5, "what": f"{r['contender']} {r['case']}: step time and peak memory <= PEFT LoRA r=8",
                        "variant": v, "met": ok, "measured": text})
    return out


def render(header: dict, chain: List[dict], lays: List[dict], lin: List[dict], llama: List[dict],
           targets: List[dict], reduction: Sequence[dict] = ()) -> str:
    lines = [f"# qgoft CUDA kernels ({header['date']})", "",
             ", ".join(f"{k}: {v}" for k, v in header.items()), "",
             "Medians over interleaved rounds (CUDA events) after warm-up; `variant` is QGOFT_CUDA_VARIANT "
             "(`+prefetch`: with QGOFT_CUDA_FORWARD=prefetch; `+serial`: with QGOFT_CUDA_REDUCE=serial; `+pair`: with "
             "QGOFT_CUDA_BACKWARD=pair; `+nol2`: with QGOFT_CUDA_PAIR_PREFETCH=off).", "",
             "| case | contender | variant | ms | x copy | GB/s | % of copy bandwidth |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in chain:
        lines.append(f"| {r['case']} | {r['contender']} | {r['variant']} | {r['ms']:.3f} | {r['vs_copy']:.2f} | "
                     f"{r['GBps']:.0f} | {r['copy_bw_fraction']:.0%} |")
    if reduction:
        lines += ["", "The reduction of the partial rows at all-MiniLM-L6-v2's shapes (`V+serial`: QGOFT_CUDA_REDUCE=serial, "
                  "one thread per item; `V`: the split reduction):", "",
                  "| case | contender | variant | ms | x copy |", "| --- | --- | --- | ---: | ---: |"]
        lines += [f"| {r['case']} | {r['contender']} | {r['variant']} | {r['ms']:.4f} | {r['vs_copy']:.2f} |"
                  for r in reduction]
    if lays:
        lines += ["", "| case | contender | variant | ms | x parallel layout |", "| --- | --- | --- | ---: | ---: |"]
        lines += [f"| {r['case']} | {r['contender']} | {r['variant']} | {r['ms']:.3f} | {r['vs_parallel']:.2f} |"
                  for r in lays]
    if lin:
        lines += ["", "| case | contender | variant | ms | x frozen nn.Linear | TFLOP/s (2 matmuls) |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        for r in lin:
            if "skipped" in r:
                lines.append(f"| {r['case']} | {r['contender']} | | skipped: {r['skipped']} | | |")
            else:
                lines.append(f"| {r['case']} | {r['contender']} | {r['variant']} | {r['ms']:.3f} | "
                             f"{r['vs_frozen']:.3f} | {r['TFLOPs']:.0f} |")
    if llama:
        lines += ["", "| case | contender | variant | ms per step | x frozen floor | peak GiB | trainable |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in llama:
            peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 30:.2f}"
            lines.append(f"| {r['case']} | {r['contender']} | {r['variant']} | {r['ms']:.1f} | {r['vs_floor']:.2f} | "
                         f"{peak} | {r['trainable']} |")
    lines += ["", "| target | what | variant | result | measured |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['what']} | {t['variant']} | {verdict(t['met'])} | {t['measured']} |"
              for t in targets]
    return "\n".join(lines)


def git_commit() -> str:
    """This tree's commit (bench_common.git_revision: `HASH (+ local changes)` where the tracked files differ from
    it, e.g. the GPU machine's copy of a working tree whose git metadata is older than its files)."""
    return bc.git_revision(os.path.dirname(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, d = 4096 only, no layout table")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated QGOFT_CUDA_VARIANT values (V+prefetch: V's prefetching forward)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: tiny shapes on the CPU (checks the script)")
    ap.add_argument("--only", choices=("all", "kernels"), default="all",
                    help="kernels: the chain and layout tables only (no nn.Linear, no LLaMA-shaped stack)")
    ap.add_argument("--xor", default="general,fused", help="QGOFT_CUDA_XOR paths of the stack and the butterfly in the layout table")
    ap.add_argument("--layout-variants", default="",
                    help="the variants of the layout table (default: those of --variants that change more than the "
                    "single layout's forward, reduction or paired backward), e.g. base,reg: the stack's fused backward "
                    "on the stacked kernel and on the reg stacked backward")
    ap.add_argument("--ops-library", help="time the chain ops of this ops library (another build's) instead of "
                    "the package's; needs QGOFT_DISABLE_EXTENSION=1 (two builds cannot share one process)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    dev = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    key = "CPU" if args.dry_run else "CUDA"
    if args.ops_library:
        if qgoft.extension_loaded():
            print("bench_gpu: --ops-library needs QGOFT_DISABLE_EXTENSION=1 (this package's library is loaded)",
                  file=sys.stderr)
            return 2
        torch.ops.load_library(args.ops_library)
        # the same Python registrations (fake kernels, autograd) as when the package loads its own library: the
        # dispatcher then takes the same path in both builds' processes (the autograd kernel costs ~15 us a call)
        qgoft.ops._register_compiled_ops()
        info = {"ops_library": os.path.abspath(args.ops_library)}
        loaded = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"qgoft::{n}", key) for n in CHAIN_OPS)
    else:
        info = qgoft.build_info()
        loaded = qgoft.extension_loaded() and (args.dry_run or bool(info.get("cuda_compiled")))
    if not loaded:
        print(f"bench_gpu: qgoft's {key} kernels are not loaded: {info}", file=sys.stderr)
        return 2
    rounds = 3 if args.dry_run else (7 if args.quick else args.rounds)
    clock = Clock(dev)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": git_commit(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "qgoft": qgoft.__version__, "ops_library": info.get("ops_library", "")}
    if args.dry_run:
        header["device"] = "CPU (dry run: the numbers mean nothing)"
        rows, widths, lin_rows, lin_d = 64, (256, 344), 16, 256
        red_rows, red_widths = 64, (48, 96)
    else:
        prop = torch.cuda.get_device_properties(0)
        header.update(device=prop.name, sm_count=prop.multi_processor_count,
                      memory_GiB=round(prop.total_memory / 2 ** 30, 1))
        rows, widths, lin_rows, lin_d = 8192, ((4096,) if args.quick else (4096, 11008)), 8192, 4096
        red_rows, red_widths = 2048, (384, 1536)  # all-MiniLM-L6-v2: batch 32 x 64 tokens, hidden 384, MLP 1536
    chain: List[dict] = []
    for d in widths:
        for dtype in (torch.bfloat16, torch.float32):
            chain += chain_rows(rows, d, dtype, rounds if d == widths[0] else max(5, rounds // 2), variants, dev, clock)
            print(f"bench_gpu: chain {rows}x{d} {dtype_name(dtype)} done", flush=True)
    reduction = reduction_rows(red_rows, red_widths, torch.bfloat16, rounds, variants, dev, clock)
    print("bench_gpu: reduction table done", flush=True)
    xor_paths = [p for p in args.xor.split(",") if p]
    # the variants of the layout table
    whole = [v for v in args.layout_variants.split(",") if v] or \
        [v for v in variants if not forward_only(v) and not reduce_only(v) and not backward_only(v) and not tops_only(v)]
    lays = [] if args.quick or not whole else layout_rows(rows, widths[0], torch.bfloat16, rounds, whole, dev, clock, xor_paths)
    # the fused stack and butterfly in float32 too (docs/CUDA.md, "The `reg` stacked backward", "The butterfly forward
    # on the register path"; the butterfly's fused backward is its general one)
    if lays and "fused" in xor_paths:
        lays += layout_rows(rows, widths[0], torch.float32, rounds, whole, dev, clock, ["fused"])
    lin: List[dict] = []
    llama: List[dict] = []
    if args.only == "all":
        lin = linear_rows(lin_rows, lin_d, rounds, variants, dev, torch.bfloat16, clock)
        print("bench_gpu: Linear done", flush=True)
        if args.dry_run:
            llama = llama_rows(2, 64, 172, 4, 2, 16, 2, dev, torch.float32, variants)
        elif not args.quick:
            llama = llama_rows(4, 4096, 11008, 32, 8, 1024, 7, dev, torch.bfloat16, variants)
    targets = evaluate(chain, lays, lin, llama, variants)
    text = render(header, chain, lays, lin, llama, targets, reduction)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
            json.dump({"header": header, "chain": chain, "reduction": reduction, "layouts": lays, "linear": lin,
                       "llama": llama, "targets": targets}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
