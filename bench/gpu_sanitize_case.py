"""Small cases through every CUDA kernel path of qgoft, for compute-sanitizer (run by bench/gpu_check.sh):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/gpu_sanitize_case.py

Paths: parallel (rows sharing a block, one row of 512 threads, scalar loads of an unaligned input),
segmented parallel (forward top kernel, backward recomputation and top layers in warp 0), general in
shared memory and in global memory; forward, full backward, and the masks; float32, bfloat16, float64.
Prints "sanitize case OK" at the end (checked by gpu_check.sh) after a loose correctness check.
"""
import os

import torch

import qgoft
from qgoft import layouts
from qgoft import reference as ref

DEV = "cuda"
ops = torch.ops.qgoft


def run(lay, rows, dtype, quasi, with_scale, env=None, unaligned=False):
    os.environ.pop("QGOFT_CUDA_PATH", None)
    os.environ.pop("QGOFT_CUDA_SEGMENT", None)
    os.environ.update(env or {})
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
    fwd = ops.quasi_givens_chain if quasi else ops.givens_chain
    bwd = ops.quasi_givens_chain_backward if quasi else ops.givens_chain_backward
    y = fwd(x, params, pairs, offs, scale)
    outs = [bwd(g, x, params, pairs, offs, scale, list(m))
            for m in ((True, True, True), (True, False, False), (False, True, False), (False, False, True))]
    torch.cuda.synchronize()
    fn = ref.quasi_givens_chain_reference if quasi else ref.givens_chain_reference
    want = fn(x.double(), params.double(), pairs, offs, None if scale is None else scale.double())
    err = (y.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err < 0.05, (lay.name, d, dtype, env, err)
    assert all(torch.isfinite(t).all() for t in outs[0] if t.numel()), (lay.name, d, dtype, env)
    os.environ.pop("QGOFT_CUDA_PATH", None)
    os.environ.pop("QGOFT_CUDA_SEGMENT", None)


def main():
    assert qgoft.build_info().get("cuda_compiled"), qgoft.build_info()
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for quasi, with_scale in ((False, True), (True, False)):
            run(layouts.parallel(100), 37, dtype, quasi, with_scale)                 # R > 1 row slots
            run(layouts.parallel(4096), 3, dtype, quasi, with_scale)                 # 512 threads
            run(layouts.parallel(1000), 5, dtype, quasi, with_scale, unaligned=True)  # scalar loads
            run(layouts.parallel(1000), 3, dtype, quasi, with_scale, env={"QGOFT_CUDA_SEGMENT": "256"})
            run(layouts.parallel(9000), 2, dtype, quasi, with_scale)                 # segmented, default widths
            run(layouts.butterfly(64), 9, dtype, quasi, with_scale)                  # general, shared memory
            run(layouts.sequential(40), 4, dtype, quasi, with_scale)
            run(layouts.parallel(300), 3, dtype, quasi, with_scale, env={"QGOFT_CUDA_PATH": "global"})
    run(layouts.parallel(513), 5, torch.float64, True, True)
    run(layouts.butterfly(8192), 2, torch.float32, False, True)                      # general, global (natural)
    print("sanitize case OK")


if __name__ == "__main__":
    main()
