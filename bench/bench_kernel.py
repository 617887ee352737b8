"""Kernel-level contenders of ``bench/run.py``: the fused chain ops against ``x.clone()`` of the same tensor
(docs/MATH.md Sec. 10: the chain is memory-bound; its floor is one streaming pass over x).

Bytes counted per call (``e`` = element size, ``B x d`` the tensor): clone and forward read x and write
the output, ``2 B d e``; backward reads the output gradient and x and writes dx, ``3 B d e`` (parameter
gradients are O(d)).

``x.clone()`` (the baseline of the targets) allocates its output like the chain ops do; above the allocator's
mmap threshold every call then maps fresh pages, and where the page faults dominate, both the clone and
the chain measure them. ``copy_`` into a preallocated tensor is the pure streaming floor, for reference.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch


from bench_common import ChainProblem, Target

CLONE = "x.clone()"
COPY = "copy_ into a preallocated y"
GF = "GOFT forward"
GB = "GOFT backward"
QF = "qGOFT forward"
QB = "qGOFT backward"
OPS = (CLONE, COPY, GF, GB, QF, QB)
BYTES_PER_ELEMENT_PASS = {CLONE: 2, COPY: 2, GF: 2, GB: 3, QF: 2, QB: 3}


def contenders(rows: int, d: int, target: Target, threads: Tuple[int, ...]) -> Dict[str, Callable[[], object]]:
    """``"<op> @<t>t"`` -> callable, for every op and thread count (threads apply on CPU only)."""
    torch.manual_seed(0)
    dev, dt = target.device, target.dtype
    x = torch.randn(rows, d, device=dev, dtype=dt)
    g = torch.randn(rows, d, device=dev, dtype=dt)
    y = torch.empty_like(x)
    calls = ChainProblem.parallel(d, target).kernel_calls(x, g)
    base = {
        CLONE: lambda: x.clone(),
        COPY: lambda: y.copy_(x),
        GF: calls["goft forward"],
        GB: calls["goft backward"],
        QF: calls["qgoft forward"],
        QB: calls["qgoft backward"],
    }
    if target.is_cuda:
        return {f"{k} @gpu": v for k, v in base.items()}
    out: Dict[str, Callable[[], object]] = {}
    for t in threads:
        for k, fn in base.items():
            def run(fn=fn, t=t) -> object:
                if torch.get_num_threads() != t:
                    torch.set_num_threads(t)
                return fn()
            out[f"{k} @{t}t"] = run
    return out


def split_key(key: str) -> Tuple[str, str]:
    op, _, th = key.rpartition(" @")
    return op, th
