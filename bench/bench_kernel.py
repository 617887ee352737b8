"""Kernel-level contenders of ``bench/run.py``: the fused chain ops against ``x.clone()`` of the same tensor
(DESIGN.md Sec. 7: the chain is memory-bound; its floor is one streaming pass over x).

Bytes counted per call (``e`` = element size, ``B x d`` the tensor): clone and forward read x and write
the output, ``2 B d e``; backward reads the output gradient and x and writes dx, ``3 B d e`` (parameter
gradients are O(d)).

``x.clone()`` (the issue's baseline) allocates its output like the chain ops do; above the allocator's
mmap threshold every call then maps fresh pages, and where the page faults dominate, both the clone and
the chain measure them. ``copy_`` into a preallocated tensor is the pure streaming floor, for reference.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from qgoft import layouts, reference

from bench_common import Target

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
    lay = layouts.parallel(d)
    pairs, offs = lay.pairs_tensor().to(dev), lay.layer_offsets_tensor().to(dev)
    x = torch.randn(rows, d, device=dev, dtype=dt)
    g = torch.randn(rows, d, device=dev, dtype=dt)
    y = torch.empty_like(x)
    angles = (torch.randn(lay.num_pairs) * 0.1).to(dev)
    blocks = reference.blocks_from_angles(angles).contiguous()
    mask = [True, True, False]
    q = torch.ops.qgoft
    base = {
        CLONE: lambda: x.clone(),
        COPY: lambda: y.copy_(x),
        GF: lambda: q.givens_chain(x, angles, pairs, offs, None),
        GB: lambda: q.givens_chain_backward(g, x, angles, pairs, offs, None, mask),
        QF: lambda: q.quasi_givens_chain(x, blocks, pairs, offs, None),
        QB: lambda: q.quasi_givens_chain_backward(g, x, blocks, pairs, offs, None, mask),
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
