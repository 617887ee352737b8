"""Leak check of qgoft's ops by heap accounting (run by tools/check_sanitizers.sh under AddressSanitizer).

LeakSanitizer at exit only sees blocks nobody points to; a leaked tensor that some cache or a leaked
reference count keeps alive, or an allocation whose stack does not pass through qgoft's frames, can
escape it. This check asks the ASan allocator itself (``__sanitizer_get_current_allocated_bytes``, exact
bytes in use) instead: it runs every op (forward, backward, adjoint, all methods, dtypes and layouts, the
error paths that throw from C++, and qgoft.nn.Linear training steps) for warm-up rounds, then for
measured rounds, and fails if the heap grows by more than a few bytes per call on average, i.e. if any
call leaks. Without the ASan runtime in the process it exits with an error (it needs the exact counter).

Usage (under LD_PRELOAD=libasan.so, as tools/check_sanitizers.sh runs it): python sanitizer_leak_check.py
"""
from __future__ import annotations

import ctypes
import gc
import sys

import torch

import qgoft
from qgoft import layouts
from qgoft import ops as qops


def _allocated_bytes_counter():
    try:
        fn = ctypes.CDLL(None).__sanitizer_get_current_allocated_bytes
    except AttributeError:
        sys.exit("sanitizer_leak_check: the ASan runtime is not loaded (run it under LD_PRELOAD=libasan.so)")
    fn.restype = ctypes.c_size_t
    return fn


def _cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for kind, d in (("parallel", 37), ("sequential", 8), ("butterfly", 64), ("stack", 24)):
        lay = (layouts.stack(layouts.parallel(d), 2) if kind == "stack" else getattr(layouts, kind)(d))
        pairs, offsets = lay.pairs_tensor(), lay.layer_offsets_tensor()
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            pdtype = torch.float64 if dtype == torch.float64 else torch.float32
            angles = torch.randn(lay.num_pairs, generator=g, dtype=pdtype)
            blocks = torch.eye(2, dtype=pdtype) + 0.3 * torch.randn(lay.num_pairs, 2, 2, generator=g, dtype=pdtype)
            scale = 1 + 0.1 * torch.randn(d, generator=g, dtype=pdtype)
            x = torch.randn(45, d, generator=g).to(dtype)
            cases.append((x, angles, blocks, scale, pairs, offsets))
    return cases


# Resolved once: torch.ops.<namespace>.__getattr__ with a freshly built name string grows torch's Python
# caches for a while (seen with any namespace; not qgoft's memory).
_OPS = None


def _direct_round(cases, bad):
    """The C++ ops called directly (no Python autograd layer): forward, backward with every output mask,
    and the error paths (C++ exceptions thrown after some allocations must free them)."""
    calls = 0
    masks = ([True, True, True], [True, False, False], [False, True, False], [False, False, True])
    for x, angles, blocks, scale, pairs, offsets in cases:
        for fwd, bwd, params in ((_OPS[0], _OPS[1], angles), (_OPS[2], _OPS[3], blocks)):
            for s in (None, scale):
                y = fwd(x, params, pairs, offsets, s)
                for mask in masks:
                    bwd(y, x, params, pairs, offsets, s, mask)
                calls += 1 + len(masks)
    for args in bad:
        try:
            torch.ops.qgoft.givens_chain(*args)
        except RuntimeError:
            pass
        else:
            raise AssertionError("an invalid call did not raise")
        calls += 1
    return calls


def _autograd_round(cases, linears):
    """Through qgoft.ops (autograd), the adjoint (merge path) and qgoft.nn.Linear training steps."""
    calls = 0
    for x, angles, blocks, scale, pairs, offsets in cases:
        for fn, adj, params in ((qops.givens_chain, qops.givens_chain_adjoint, angles),
                                (qops.quasi_givens_chain, qops.quasi_givens_chain_adjoint, blocks)):
            xr = x.clone().requires_grad_(True)
            pr = params.clone().requires_grad_(True)
            sr = scale.clone().requires_grad_(True)
            y = fn(xr, pr, pairs, offsets, sr)
            y.backward(torch.ones_like(y))
            adj(x, params, pairs, offsets, scale)
            calls += 3
    for layer, x in linears:
        layer.zero_grad(set_to_none=True)
        loss = layer(x).square().mean() + layer.orthogonality_penalty()
        loss.backward()
        layer.merged_weight()
        calls += 3
    return calls


def _measure(counter, name, round_fn, warmup, rounds, limit_per_call=None, limit_total=None):
    for _ in range(warmup):
        round_fn()
    gc.collect()
    before = counter()
    calls = sum(round_fn() for _ in range(rounds))
    gc.collect()
    growth = counter() - before
    per_call = growth / calls
    limit = (f"{limit_per_call} per call" if limit_per_call is not None else f"{limit_total} in all")
    print(f"sanitizer_leak_check: {name}: {calls} calls in {rounds} rounds after {warmup} warm-up rounds: "
          f"heap {growth:+d} bytes ({per_call:+.3f} per call; limit {limit})")
    if limit_per_call is not None and per_call > limit_per_call:
        return False
    return limit_total is None or growth <= limit_total


def main() -> None:
    counter = _allocated_bytes_counter()
    assert qgoft.extension_loaded(), qgoft._extension.extension_error()
    torch.set_num_threads(2)
    global _OPS
    _OPS = (torch.ops.qgoft.givens_chain, torch.ops.qgoft.givens_chain_backward,
            torch.ops.qgoft.quasi_givens_chain, torch.ops.qgoft.quasi_givens_chain_backward)
    cases = _cases()
    torch.manual_seed(0)
    lay = layouts.parallel(8)
    pairs, offsets = lay.pairs_tensor(), lay.layer_offsets_tensor()
    bad_pairs = pairs.clone()
    bad_pairs[-1, 1] = 99  # index out of range
    bad = [
        (torch.randn(5, 8), torch.randn(7), bad_pairs, offsets, None),
        (torch.randn(5, 8), torch.randn(6), pairs, offsets, None),                      # wrong param count
        (torch.randn(5, 8), torch.randn(7), pairs, torch.tensor([0, 9, 7], dtype=torch.int32), None),
        (torch.randn(5, 8), torch.randn(7), pairs, offsets, torch.randn(3)),           # wrong scale size
    ]
    # keep only calls that really raise (the glue decides what is invalid; d = 9 is valid, say)
    checked = []
    for args in bad:
        try:
            torch.ops.qgoft.givens_chain(*args)
        except RuntimeError:
            checked.append(args)
    assert len(checked) >= 3, f"expected at least 3 invalid calls, got {len(checked)}"
    # Direct calls: the smallest leak (one 16-byte block per call) adds >= 16 bytes per call; the heap must
    # not change but for the measurement itself (tens of bytes in all).
    ok = _measure(counter, "direct C++ op calls", lambda: _direct_round(cases, checked), 2, 8, limit_per_call=0.5)
    # Through the Python autograd layer, torch.library's own Python-side state drifts by about 1 KiB per
    # round for a long while (the same with a pure-Python custom op without qgoft), so this part uses big
    # tensors instead: d = 1024, 256 rows; leaking any tensor of a call (activation, saved tensor, a
    # parameter gradient: >= 4 KiB) on ~300 calls would add > 1 MiB; the limit is 128 KiB in all.
    g = torch.Generator().manual_seed(1)
    big = []
    for lay in (layouts.parallel(1024), layouts.butterfly(1024)):
        for dtype in (torch.float32, torch.bfloat16):
            big.append((torch.randn(256, 1024, generator=g).to(dtype), 0.1 * torch.randn(lay.num_pairs, generator=g),
                        torch.eye(2) + 0.1 * torch.randn(lay.num_pairs, 2, 2, generator=g),
                        1 + 0.1 * torch.randn(1024, generator=g), lay.pairs_tensor(), lay.layer_offsets_tensor()))
    big_linears = [(qgoft.nn.Linear(1024, 64, method=m), torch.randn(256, 1024))
                   for m in ("goft", "goft_scaled", "qgoft")]
    ok &= _measure(counter, "autograd, adjoint and qgoft.nn.Linear", lambda: _autograd_round(big, big_linears),
                   3, 12, limit_total=128 * 1024)
    if not ok:
        sys.exit("sanitizer_leak_check: FAILED: the heap grows with the number of calls (a leak)")
    print("sanitizer_leak_check: the heap does not grow with the number of calls: no leaks")


if __name__ == "__main__":
    main()
