"""Small cases through every CUDA kernel path of qgoft, for compute-sanitizer (run by tools/gpu_check.sh):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tools/gpu_sanitize_case.py

Paths: parallel (rows sharing a block, one row of 512 threads, scalar loads of an unaligned input),
segmented parallel (forward top kernel, backward recomputation and top layers in warp 0), stacked parallel
(QGOFT_CUDA_XOR=fused: stack(parallel(d), k) on the stacked register kernels; the butterfly forward and backward:
512 threads, sub-blocks of 16 threads, scalar loads, every dtype, every mask; its stack's forward, the full backward
only), each in every kernel variant
(QGOFT_CUDA_VARIANT=base|table|reg; reg's 512-thread instantiation by "512 threads" and "segmented default";
these with the plain forward, QGOFT_CUDA_FORWARD=plain; a stack's forward with 16-byte rows under table and
reg runs the prefetching forward's stack instantiation, else base's kernel; a stack under reg runs base's
backward but for the reg stacked backward, "stacked reg": stack(parallel(d), 2) with 16-byte rows of 2049-4096 elements, more rows than an
H100's persistent grid, rows with chunks past d); the prefetching
forward (QGOFT_CUDA_FORWARD=prefetch, the default, under table, forward
and the full backward only: the knob changes no other backward kernel than the segmented rows' recomputing top
pass) on enough rows that blocks own several row groups; the split reduction of the partial rows
(QGOFT_CUDA_REDUCE=split, the default) with 2 to 64 lanes per item and d % 4 != 0; the paired reg backward
(QGOFT_CUDA_BACKWARD=pair under reg: 16-bit rows of 512-thread segments, one segment and three, every mask,
without the scale's gradient on its instantiations for that: the adjoint runs the reg kernel; under auto, the
default, the instantiation for any masks on rows of one segment; with QGOFT_CUDA_PAIR_PREFETCH=off, bfloat16 qgoft,
the one without the L2 prefetch) on rows that give blocks pairs of rows and a last
single row; the backward of segmented
rows given the forward's segment tops (QGOFT_CUDA_TOPS=saved, the default, with the tops of `*_with_tops`: no top
pass, warp 0 reads them; every mask, the paired reg backward too); general in shared
memory and in global memory; forward, full backward and the three single-output masks; goft with a scale and qgoft without; float32, bfloat16,
float16 (parallel paths) and float64. Prints "sanitize case OK: N cases" at the end (checked by
gpu_check.sh) after a loose correctness check of each forward against the float64 reference.
With --list it prints the cases without running them (no GPU needed); --float32-only keeps the float32
cases (every path and variant: for the slow tools, racecheck and synccheck), and one case of the paired reg backward,
which has 16-bit rows only.
"""
import os
import sys

import torch

import qgoft
from qgoft import layouts
from qgoft import reference as ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from bench_gpu import KERNEL_SWITCHES  # noqa: E402  (the one list of the planner's switches)

DEV = "cuda"
# every switch a case may set, cleared before and after each case
KNOBS = KERNEL_SWITCHES
VARIANTS = ("base", "table", "reg")
MASKS = ((True, True, True), (True, False, False), (False, True, False), (False, False, True))


def cases():
    """(name, layout, rows, dtype, quasi, with_scale, env, unaligned) of every path."""
    out = []
    parallel = [  # (name, layout, rows, env, unaligned)
        ("R>1 row slots", layouts.parallel(100), 37, {}, False),
        ("512 threads", layouts.parallel(4096), 3, {}, False),
        ("scalar loads", layouts.parallel(1000), 5, {}, True),
        ("segmented 256", layouts.parallel(1000), 3, {"QGOFT_CUDA_SEGMENT": "256"}, False),
        ("segmented default", layouts.parallel(9000), 2, {}, False),
    ]
    stacked = [  # the fused XOR path (QGOFT_CUDA_XOR=fused); fewer dtype / method combinations: the slow tools
        ("stacked R>1", layouts.stack(layouts.parallel(100), 2), 37, {"QGOFT_CUDA_XOR": "fused"}, False),
        ("stacked 512 threads", layouts.stack(layouts.parallel(4096), 2), 3, {"QGOFT_CUDA_XOR": "fused"}, False),
        ("stacked*3 scalar loads", layouts.stack(layouts.parallel(300), 3), 5, {"QGOFT_CUDA_XOR": "fused"}, True),
        # 16-byte rows of 96 elements (16 rows of 16 threads per block): the prefetching forward's stack
        # instantiation for any shape under table (the default QGOFT_CUDA_FORWARD=prefetch); 512 threads: its fixed-width one
        ("stacked prefetch R>1", layouts.stack(layouts.parallel(96), 2), 37, {"QGOFT_CUDA_XOR": "fused"}, False),
    ]
    stack_reg = [  # the reg stacked backward (reg, the default): 133 rows over an H100's 132 blocks; d = 4000: the
        # last 12 threads' chunks past the row
        ("stacked reg 512 threads", layouts.stack(layouts.parallel(4096), 2), 133, {"QGOFT_CUDA_XOR": "fused"}, False),
        ("stacked reg chunks past d", layouts.stack(layouts.parallel(4000), 2), 3, {"QGOFT_CUDA_XOR": "fused"}, False),
    ]
    prefetch = [  # QGOFT_CUDA_FORWARD=prefetch (table): rows past the persistent grid, the last group partial
        ("prefetch R>1 row slots", layouts.parallel(120), 20_000, {}, False),  # 16-byte rows (d % 8 == 0)
        ("prefetch 512 threads", layouts.parallel(4096), 1_000, {}, False),
        ("prefetch segmented 256", layouts.parallel(1000), 3_000, {"QGOFT_CUDA_SEGMENT": "256"}, False),
        ("prefetch segmented default", layouts.parallel(9000), 300, {}, False),
    ]
    reduction = [  # the split reduction (the default) with many slots; d % 4 != 0: the last scale item's entries
        ("split reduction 64 lanes", layouts.parallel(1001), 600, {}, False),  # one by one (padding never read)
        ("split reduction 2 lanes", layouts.parallel(1001), 24, {}, False),  # 12 slots: one shared-memory level
        ("split reduction general", layouts.sequential(41), 300, {"QGOFT_CUDA_PATH": "global"}, False),
    ]
    fused = {"QGOFT_CUDA_XOR": "fused"}
    butterfly = [  # the butterfly forward and backward (QGOFT_CUDA_XOR=fused; a stack's backward is the general kernels')
        ("butterfly 512 threads", layouts.butterfly(4096), 19, fused, False),  # 3 row groups of 8, the last partial;
        # backward: 5 groups of 4 (float64: 10 of 2), the last partial, over 132 blocks
        # backward: 151 groups of 4 rows (float64: 301 of 2) over the 132 blocks of an H100 / H200, so blocks 0-18 run a
        # second group on the same buffers and partial row; no more rows than that (racecheck tracks every
        # shared-memory access of the ~20 per element this kernel makes)
        ("butterfly 512 threads many groups", layouts.butterfly(4096), 601, fused, False),
        ("butterfly sub-blocks", layouts.butterfly(128), 100, fused, False),  # 8 sub-blocks of 16 threads, 2 groups
        ("butterfly scalar loads", layouts.butterfly(512), 5, fused, True),
        ("butterfly*2", layouts.stack(layouts.butterfly(4096), 2), 11, fused, False),  # back to window 0 in between
    ]
    pair = [  # QGOFT_CUDA_BACKWARD=pair (reg): more rows than the persistent grid's blocks, odd counts
        ("pair 512 threads", layouts.parallel(4096), 401, {}, False),  # pair=2 without the scale's gradient
        ("pair 512 threads auto", layouts.parallel(4096), 401, {"QGOFT_CUDA_BACKWARD": "auto"}, False),  # pair=1
        ("pair segmented default", layouts.parallel(9000), 133, {}, False),
    ]
    tops = [  # QGOFT_CUDA_TOPS=saved (reg): the backward reads the forward's segment tops (run() passes them)
        ("saved tops segmented default", layouts.parallel(9000), 300, {}, False),
        ("saved tops segmented 256", layouts.parallel(1000), 3_000, {"QGOFT_CUDA_SEGMENT": "256"}, False),
        ("saved tops scalar loads", layouts.parallel(4100), 40, {}, True),
    ]
    general = [
        ("general smem butterfly", layouts.butterfly(64), 9, {}, False),
        ("general smem sequential", layouts.sequential(40), 4, {}, False),
        ("general global forced", layouts.parallel(300), 3, {"QGOFT_CUDA_PATH": "global"}, False),
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for quasi, with_scale in ((False, True), (True, False)):
            for variant in VARIANTS:
                for name, lay, rows, env, unaligned in parallel:
                    out.append((f"{name} [{variant}]", lay, rows, dtype, quasi, with_scale,
                                {**env, "QGOFT_CUDA_VARIANT": variant, "QGOFT_CUDA_FORWARD": "plain",
                                 "QGOFT_CUDA_BACKWARD": "single"}, unaligned))  # the defaults' cases: prefetch, pair
            if dtype != torch.float16:
                for name, lay, rows, env, unaligned in general:
                    out.append((name, lay, rows, dtype, quasi, with_scale, env, unaligned))
    for dtype, quasi, with_scale in ((torch.float32, False, True), (torch.bfloat16, True, False)):
        for variant in ("base", "table"):  # under reg: base's kernels, or the reg stacked backward (stack_reg below)
            for name, lay, rows, env, unaligned in stacked:
                out.append((f"{name} [{variant}]", lay, rows, dtype, quasi, with_scale,
                            {**env, "QGOFT_CUDA_VARIANT": variant}, unaligned))
    for dtype, quasi, with_scale in ((torch.float32, False, True), (torch.bfloat16, True, False),
                                     (torch.float16, False, True)):
        for name, lay, rows, env, unaligned in stack_reg:
            out.append((f"{name} [reg]", lay, rows, dtype, quasi, with_scale,
                        {**env, "QGOFT_CUDA_VARIANT": "reg"}, unaligned))
        for name, lay, rows, env, unaligned in prefetch:
            out.append((f"{name} [table]", lay, rows, dtype, quasi, with_scale,
                        {**env, "QGOFT_CUDA_VARIANT": "table", "QGOFT_CUDA_FORWARD": "prefetch"}, unaligned))
    for dtype, quasi, with_scale in ((torch.bfloat16, False, True), (torch.float16, True, False)):
        for name, lay, rows, env, unaligned in pair:
            out.append((f"{name} [reg]", lay, rows, dtype, quasi, with_scale,
                        {"QGOFT_CUDA_VARIANT": "reg", "QGOFT_CUDA_BACKWARD": "pair", **env}, unaligned))
    # its instantiation without the L2 prefetch (QGOFT_CUDA_PAIR_PREFETCH=off; qgoft without the scale: pair=2 with
    # every mask that has parameter gradients)
    out.append(("pair 512 threads no L2 prefetch [reg]", layouts.parallel(4096), 401, torch.bfloat16, True, False,
                {"QGOFT_CUDA_VARIANT": "reg", "QGOFT_CUDA_BACKWARD": "pair", "QGOFT_CUDA_PAIR_PREFETCH": "off"}, False))
    for dtype, quasi, with_scale, extra in ((torch.float32, False, True, {}), (torch.bfloat16, True, False, {}),
                                            (torch.bfloat16, False, True, {"QGOFT_CUDA_BACKWARD": "pair"})):
        for name, lay, rows, env, unaligned in tops if not extra else tops[:1]:
            out.append((f"{name} [reg{'+pair' if extra else ''}]", lay, rows, dtype, quasi, with_scale,
                        {**env, **extra, "QGOFT_CUDA_VARIANT": "reg", "QGOFT_CUDA_TOPS": "saved"}, unaligned))
    out.append(("saved tops float64 [table]", layouts.parallel(5000), 7, torch.float64, True, True,
                {"QGOFT_CUDA_VARIANT": "table", "QGOFT_CUDA_TOPS": "saved"}, False))
    for dtype, quasi, with_scale in ((torch.float32, False, True), (torch.bfloat16, True, False),
                                     (torch.float16, True, True), (torch.float64, False, False)):
        for name, lay, rows, env, unaligned in butterfly:
            out.append((name, lay, rows, dtype, quasi, with_scale, env, unaligned))
    for variant in VARIANTS:
        out.append((f"float64 parallel [{variant}]", layouts.parallel(513), 5, torch.float64, True, True,
                    {"QGOFT_CUDA_VARIANT": variant, "QGOFT_CUDA_FORWARD": "plain"}, False))
    out.append(("float64 prefetch [table]", layouts.parallel(1024), 1_000, torch.float64, True, True,
                {"QGOFT_CUDA_VARIANT": "table", "QGOFT_CUDA_FORWARD": "prefetch"}, False))
    out.append(("general global (natural)", layouts.butterfly(8192), 2, torch.float32, False, True, {}, False))
    for dtype in (torch.float32, torch.float64):
        for name, lay, rows, env, unaligned in reduction:  # goft with a scale: angle and scale items
            out.append((f"{name} {dtype}", lay, rows, dtype, False, True, env, unaligned))
    return out


def run(lay, rows, dtype, quasi, with_scale, env, unaligned):
    for k in KNOBS:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        d = lay.d
        pairs, offs = lay.pairs_tensor(DEV), lay.layer_offsets_tensor(DEV)
        pd = torch.float64 if dtype == torch.float64 else torch.float32
        if quasi:
            params = torch.eye(2, dtype=pd, device=DEV) + 0.3 * torch.randn(lay.num_pairs, 2, 2, dtype=pd, device=DEV)
        else:
            params = torch.randn(lay.num_pairs, dtype=pd, device=DEV)
        scale = 1 + 0.2 * torch.randn(d, dtype=pd, device=DEV) if with_scale else None
        if unaligned:
            x = torch.randn(rows, d + 3, device=DEV, dtype=dtype)[:, 1:d + 1]
        else:
            x = torch.randn(rows, d, device=DEV, dtype=dtype)
        g = torch.randn(rows, d, device=DEV, dtype=dtype)
        fwd = torch.ops.qgoft.quasi_givens_chain if quasi else torch.ops.qgoft.givens_chain
        bwd = torch.ops.qgoft.quasi_givens_chain_backward if quasi else torch.ops.qgoft.givens_chain_backward
        tops = None
        if env.get("QGOFT_CUDA_TOPS") == "saved":  # the forward's segment tops, given to every backward
            with_tops = (torch.ops.qgoft.quasi_givens_chain_with_tops if quasi
                         else torch.ops.qgoft.givens_chain_with_tops)
            y, tops = with_tops(x, params, pairs, offs, scale)
            assert tops.shape[1] > 0, f"no segment tops kept: {tuple(tops.shape)}"
        else:
            y = fwd(x, params, pairs, offs, scale)
        # QGOFT_CUDA_FORWARD=prefetch selects the forward kernel and the backward's top pass (segmented rows with
        # parameter gradients); a stack of butterflies' XOR path changes its forward only: its cases run the full
        # backward only (a single butterfly's backward runs the butterfly backward kernel: every mask)
        forward_only = env.get("QGOFT_CUDA_FORWARD") == "prefetch" or (lay.name.startswith("butterfly*")
                                                                       and "QGOFT_CUDA_XOR" in env)
        masks = MASKS[:1] if forward_only else MASKS
        outs = [bwd(g, x, params, pairs, offs, scale, list(m), tops) for m in masks]
        torch.cuda.synchronize()
    finally:
        for k in KNOBS:
            os.environ.pop(k, None)
    fn = ref.quasi_givens_chain_reference if quasi else ref.givens_chain_reference
    want = fn(x.double(), params.double(), pairs, offs, None if scale is None else scale.double())
    err = (y.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err < 0.05, err
    assert not outs or all(torch.isfinite(t).all() for t in outs[0] if t.numel()), "non-finite backward"


def main():
    all_cases = cases()
    if "--float32-only" in sys.argv:  # and the paired reg backward's first case (16-bit rows only; its barriers)
        first_pair = next(c for c in all_cases if c[6].get("QGOFT_CUDA_BACKWARD") == "pair")
        all_cases = [c for c in all_cases if c[3] == torch.float32 or c is first_pair]
    if "--list" in sys.argv:
        for c in all_cases:
            print(f"{c[0]}: d={c[1].d} rows={c[2]} {c[3]} {'qgoft' if c[4] else 'goft'} scale={c[5]} env={c[6]}")
        print(f"{len(all_cases)} cases")
        return
    assert qgoft.build_info().get("cuda_compiled"), qgoft.build_info()
    torch.manual_seed(0)
    for k, (name, lay, rows, dtype, quasi, with_scale, env, unaligned) in enumerate(all_cases):
        print(f"case {k + 1}/{len(all_cases)}: {name} d={lay.d} {dtype}", flush=True)
        try:
            run(lay, rows, dtype, quasi, with_scale, env, unaligned)
        except AssertionError as err:
            raise AssertionError(f"{name} d={lay.d} {dtype} quasi={quasi}: {err}") from err
    print(f"sanitize case OK: {len(all_cases)} cases")


if __name__ == "__main__":
    main()
