"""Every CUDA kernel variant (QGOFT_CUDA_VARIANT) against the base kernels and the float64 reference on the
GPU (run by tools/gpu_check.sh before the variants are timed): forward, and backward with every output
mask, goft with a scale and qgoft without, float32 and bfloat16, widths with rows sharing a block, one
segment, several segments and odd d, aligned and unaligned rows, fresh random inputs each case. Then the
fused XOR path (QGOFT_CUDA_XOR=fused, each variant) on stack(parallel(d), k) and on butterfly(d) (its forward and
backward kernels, every mask) against the general kernels (QGOFT_CUDA_XOR=general) and the reference.

    python tools/gpu_variant_check.py [--variants table]      # prints "variant check OK: N cases"

A variant runs the same arithmetic in the same order as base (only where the blocks are read from
differs), so it must agree with base to a few units of rounding; with the reference to the dtype's
tolerance. `V+prefetch` (QGOFT_CUDA_FORWARD=prefetch under V: the prefetching forward of the single layout)
is checked forward, on more rows (blocks of the persistent grid own several row groups), against base,
the reference and, bitwise, V's plain forward, and its full backward (segmented rows: the top pass runs the
prefetching forward) bitwise against V's with the plain forward. `V+pair` (QGOFT_CUDA_BACKWARD=pair under V: the
paired reg backward, where it applies: 16-bit rows of one or more 512-thread segments with parameter gradients) is
checked backward, on as many rows as the prefetching forward, against base and, bitwise, V's backward with every
mask; `V+pair+nol2` (QGOFT_CUDA_PAIR_PREFETCH=off too: its instantiation without the L2 prefetch) the same, on the
only rows it runs (bfloat16, d = 4096). `V+recompute` (QGOFT_CUDA_TOPS=recompute under V: the backward's top pass whatever tops it is given) is checked
backward with every mask: V's backward given the tops of V's `*_with_tops` forward (whose output must be V's
forward's, bitwise) must give bitwise the results of the backward that recomputes them. Exit status 1 on the first
disagreement, naming the case.
"""
import argparse
import os
import sys

import torch

import qgoft  # noqa: F401  (loads the ops)
from qgoft import layouts
from qgoft import reference as ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from bench_gpu import backward_only, forward_only, l2_only, tops_only, with_variant  # noqa: E402  (the one home of the variant names' knobs)

DEV = "cuda"
MASKS = ((True, True, True), (True, False, False), (False, True, False), (False, False, True))
SHAPES = ((100, 37), (1000, 5), (4096, 64), (9000, 3), (11008, 16))  # (d, rows)
STACKS = ((100, 2, 37), (1000, 2, 5), (4096, 2, 64), (4096, 2, 700), (300, 3, 9))  # (d, repetitions, rows)
BUTTERFLIES = ((64, 1000), (512, 53), (4096, 1003))  # (d, rows): sub-blocks, a short last round, 512 threads
PREFETCH_ROWS = {100: 20000, 1000: 3000, 4096: 1000, 9000: 300, 11008: 300}  # several row groups per block


def call(variant, fn, xor="general"):
    """fn run now under `variant` (V+prefetch: V with QGOFT_CUDA_FORWARD=prefetch; V+pair: V with
    QGOFT_CUDA_BACKWARD=pair) and QGOFT_CUDA_XOR=xor."""
    return with_variant(variant, fn, xor)()


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def case(variant, d, rows, dtype, quasi, unaligned, gen, reps=0, butterfly=False):
    """variant vs base on parallel(d); reps > 0: the fused XOR path (variant) vs the general kernels on
    stack(parallel(d), reps); butterfly: the same on butterfly(d)."""
    lay = layouts.butterfly(d) if butterfly else layouts.parallel(d) if reps == 0 else \
        layouts.stack(layouts.parallel(d), reps)
    fused = reps > 0 or butterfly
    mine = (lambda fn: call(variant, fn, xor="fused")) if fused else (lambda fn: call(variant, fn))
    pairs, offs = lay.pairs_tensor(DEV), lay.layer_offsets_tensor(DEV)
    if quasi:
        params = torch.eye(2, device=DEV) + 0.2 * torch.randn(lay.num_pairs, 2, 2, device=DEV, generator=gen)
        scale, fwd, bwd = None, torch.ops.qgoft.quasi_givens_chain, torch.ops.qgoft.quasi_givens_chain_backward
        want_fn = ref.quasi_givens_chain_reference
    else:
        params = torch.randn(lay.num_pairs, device=DEV, generator=gen)
        scale = 1 + 0.2 * torch.randn(d, device=DEV, generator=gen)
        fwd, bwd, want_fn = torch.ops.qgoft.givens_chain, torch.ops.qgoft.givens_chain_backward, ref.givens_chain_reference
    width = d + 3 if unaligned else d
    x = torch.randn(rows, width, device=DEV, dtype=dtype, generator=gen)[:, 1:d + 1] if unaligned else \
        torch.randn(rows, d, device=DEV, dtype=dtype, generator=gen)
    g = torch.randn(rows, d, device=DEV, dtype=dtype, generator=gen)
    same_tol = 1e-5 if dtype == torch.float32 else 2e-2  # a different FMA contraction moves a bf16 ulp
    if fused and dtype == torch.float32:
        same_tol = 1e-4  # the general kernels sum the parameter gradients in another order
    ref_tol = 1e-4 if dtype == torch.float32 else 3e-2
    y_base = call("base", lambda: fwd(x, params, pairs, offs, scale))
    y_var = mine(lambda: fwd(x, params, pairs, offs, scale))
    want = want_fn(x.double(), params.double(), pairs, offs, None if scale is None else scale.double())
    errs = {"y vs base": (rel(y_var, y_base), same_tol), "y vs reference": (rel(y_var, want), ref_tol)}
    if forward_only(variant):  # the forward kernel and the backward's top pass: bitwise V's plain results
        plain = variant.partition("+")[0]
        y_plain = call(plain, lambda: fwd(x, params, pairs, offs, scale))
        errs["y vs plain forward (bitwise)"] = (0.0 if torch.equal(y_var, y_plain) else float("inf"), 0.0)
        b_var = mine(lambda: bwd(g, x, params, pairs, offs, scale, list(MASKS[0])))
        b_plain = call(plain, lambda: bwd(g, x, params, pairs, offs, scale, list(MASKS[0])))
        same = all(torch.equal(a, b) for a, b in zip(b_var, b_plain))
        errs["full backward vs plain top pass (bitwise)"] = (0.0 if same else float("inf"), 0.0)
        torch.cuda.synchronize()
        return {k: v for k, v in errs.items() if not v[0] <= v[1]}
    if tops_only(variant):  # V's backward on V's forward's segment tops: bitwise the backward with its top pass
        plain = variant.rpartition("+")[0]
        with_tops = torch.ops.qgoft.quasi_givens_chain_with_tops if quasi else torch.ops.qgoft.givens_chain_with_tops
        y_tops, tops = call(plain, lambda: with_tops(x, params, pairs, offs, scale))
        errs["with_tops y vs forward (bitwise)"] = (0.0 if torch.equal(y_tops, y_var) else float("inf"), 0.0)
        for m in MASKS:
            b_saved = call(plain, lambda: bwd(g, x, params, pairs, offs, scale, list(m), tops))
            b_top_pass = mine(lambda: bwd(g, x, params, pairs, offs, scale, list(m), tops))
            same = all(torch.equal(a, b) for a, b in zip(b_saved, b_top_pass))
            errs[f"backward mask {m} on saved tops vs top pass (bitwise)"] = (0.0 if same else float("inf"), 0.0)
        torch.cuda.synchronize()
        return {k: v for k, v in errs.items() if not v[0] <= v[1]}
    for m in MASKS:
        b_base = call("base", lambda: bwd(g, x, params, pairs, offs, scale, list(m)))
        b_var = mine(lambda: bwd(g, x, params, pairs, offs, scale, list(m)))
        for k, (tb, tv) in enumerate(zip(b_base, b_var)):
            if tb is not None and tv is not None and tb.numel():
                errs[f"backward mask {m} output {k} vs base"] = (rel(tv, tb), same_tol)
        if backward_only(variant):  # the paired reg backward: bitwise V's (one row per thread) results
            plain = variant.split("+")[0]
            b_plain = call(plain, lambda: bwd(g, x, params, pairs, offs, scale, list(m)))
            same = all((a is None) == (b is None) and (a is None or torch.equal(a, b)) for a, b in zip(b_var, b_plain))
            errs[f"backward mask {m} vs {plain} (bitwise)"] = (0.0 if same else float("inf"), 0.0)
    torch.cuda.synchronize()
    return {k: v for k, v in errs.items() if not v[0] <= v[1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="table,reg,table+prefetch",
                    help="variants against base; the XOR path runs base and these")
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(torch.seed() % 2 ** 31)
    n = 0
    for variant in args.variants.split(","):
        for d, rows in SHAPES:
            if forward_only(variant) or backward_only(variant):
                rows = PREFETCH_ROWS[d]
            for dtype in (torch.float32, torch.bfloat16):
                if l2_only(variant) and (dtype != torch.bfloat16 or d != 4096):
                    continue  # elsewhere V+pair's kernel, which its own lines check
                for quasi in (False, True):
                    for unaligned in ((False, True) if d in (1000, 4096) else (False,)):
                        bad = case(variant, d, rows, dtype, quasi, unaligned, gen)
                        n += 1
                        if bad:
                            print(f"FAIL variant {variant} d={d} rows={rows} {dtype} {'qgoft' if quasi else 'goft'} "
                                  f"unaligned={unaligned}: " + "; ".join(f"{k} {e:.2e} > {t:.0e}" for k, (e, t) in bad.items()))
                            return 1
    # stacks: under reg the reg stacked backward where it applies (stack(parallel(4096), 2) below), base's kernels
    # elsewhere; the prefetching forward, the paired backward and the saved tops are the single layout's only
    for variant in ["base"] + [v for v in args.variants.split(",")
                               if not forward_only(v) and not backward_only(v) and not tops_only(v)]:
        for d, reps, rows in STACKS:
            for dtype in (torch.float32, torch.bfloat16):
                for quasi in (False, True):
                    bad = case(variant, d, rows, dtype, quasi, d == 300, gen, reps=reps)
                    n += 1
                    if bad:
                        print(f"FAIL fused XOR path, variant {variant}, stack(parallel({d}), {reps}) rows={rows} "
                              f"{dtype} {'qgoft' if quasi else 'goft'}: "
                              + "; ".join(f"{k} {e:.2e} > {t:.0e}" for k, (e, t) in bad.items()))
                        return 1
    for d, rows in BUTTERFLIES:  # the butterfly forward and backward (no variant: its kernels are the same under every one)
        for dtype in (torch.float32, torch.bfloat16):
            for quasi in (False, True):
                bad = case("base", d, rows, dtype, quasi, d == 512, gen, butterfly=True)
                n += 1
                if bad:
                    print(f"FAIL fused XOR path, butterfly({d}) rows={rows} {dtype} {'qgoft' if quasi else 'goft'}: "
                          + "; ".join(f"{k} {e:.2e} > {t:.0e}" for k, (e, t) in bad.items()))
                    return 1
    print(f"variant check OK: {n} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
