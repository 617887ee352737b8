"""Layer-level contenders of ``bench/run.py``: one adapted linear layer, forward + backward.

Every contender wraps its own copy of the same frozen ``nn.Linear(d, n)``; the input requires grad (as
inside a network), the output gradient is a fixed random tensor, and a step is ``y = layer(x);
y.backward(g)`` followed by clearing the gradients. The baseline is the frozen ``nn.Linear`` itself: two
matmuls (``x Wᵀ`` and ``g W``), no weight gradient.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import qgoft
from qgoft import layouts, reference

from bench_common import ChainProblem, Target

FROZEN = "frozen nn.Linear"
GOFT = "qgoft GOFT"
GOFT_SCALED = "qgoft GOFT*"
QGOFT = "qgoft qGOFT"
QGOFT_SEQ = "qgoft qGOFT sequential"
QGOFT_BUT = "qgoft qGOFT butterfly"
REFERENCE = "PyTorch reference GOFT"
LORA = "PEFT LoRA r=8"
OFT = "PEFT OFT b=32"
BOFT = "PEFT BOFT"
ROAD = "PEFT RoAd"

# Column labels of the compact tables (in this order).
SHORT = {FROZEN: "frozen", GOFT: "GOFT", GOFT_SCALED: "GOFT*", QGOFT: "qGOFT", REFERENCE: "reference",
         LORA: "LoRA r=8", OFT: "OFT b=32", BOFT: "BOFT", ROAD: "RoAd"}

INFER_BASE = "nn.Linear forward"
INFER_MERGED = "qgoft qGOFT merged forward"
INFER_UNMERGED = "qgoft qGOFT unmerged forward"


@dataclass
class Contender:
    name: str
    module: nn.Module
    trainable: int
    note: str = ""


class _Wrap(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin


class ReferenceGoft(nn.Module):
    """The frozen layer behind the pure-PyTorch GOFT chain (``qgoft.reference``: one gather/scatter per
    Givens layer, autograd through plain ops), roughly the paper's own implementation minus its bugs."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        lay = layouts.parallel(base.in_features)
        self.register_buffer("pairs", lay.pairs_tensor().to(base.weight.device))
        self.register_buffer("offsets", lay.layer_offsets_tensor().to(base.weight.device))
        self.angles = nn.Parameter(torch.zeros(lay.num_pairs, device=base.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(reference.givens_chain_reference(x, self.angles, self.pairs, self.offsets))


def _trainable(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def _peft(base: nn.Linear, config) -> nn.Module:
    from peft import inject_adapter_in_model

    wrap = _Wrap(copy.deepcopy(base))
    inject_adapter_in_model(config, wrap)
    return wrap.lin


def peft_missing() -> Optional[str]:
    try:
        import peft  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"peft not importable ({type(err).__name__}: {err})"
    return None


SLOW_PEERS = (REFERENCE, BOFT)


def build_contenders(d: int, n: int, target: Target, *, extra_layouts: bool, log: Callable[[str], None],
                     skip: Optional[Dict[str, str]] = None
                     ) -> Tuple[nn.Linear, List[Contender], Dict[str, str]]:
    """The frozen base and every contender at this shape; ``skipped`` maps names to the reason (``skip``:
    names not to build, with the reason)."""
    torch.manual_seed(0)
    base = nn.Linear(d, n, device=target.device, dtype=target.dtype)
    base.requires_grad_(False)
    out = [Contender(FROZEN, base, 0)]
    skipped: Dict[str, str] = dict(skip or {})

    def add(name: str, make: Callable[[], nn.Module], note: str = "") -> None:
        if name in skipped:
            return
        try:
            m = make()
        except Exception as err:  # noqa: BLE001 - a peer that cannot be built here is reported, not fatal
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            log(f"    {name}: skipped ({skipped[name]})")
            return
        m.train()
        out.append(Contender(name, m, _trainable(m), note))

    for name, method in ((GOFT, "goft"), (GOFT_SCALED, "goft_scaled"), (QGOFT, "qgoft")):
        add(name, lambda method=method: qgoft.nn.Linear.from_linear(copy.deepcopy(base), method=method))
    if extra_layouts:
        for name, layout in ((QGOFT_SEQ, "sequential"), (QGOFT_BUT, "butterfly")):
            add(name, lambda layout=layout: qgoft.nn.Linear.from_linear(copy.deepcopy(base), method="qgoft",
                                                                        layout=layout))
    add(REFERENCE, lambda: ReferenceGoft(copy.deepcopy(base)))
    reason = peft_missing()
    if reason:
        for name in (LORA, OFT, BOFT, ROAD):
            skipped[name] = reason
        return base, out, skipped
    import warnings

    from peft import BOFTConfig, LoraConfig, OFTConfig, RoadConfig

    add(LORA, lambda: _peft(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["lin"])))
    add(OFT, lambda: _peft(base, OFTConfig(r=0, oft_block_size=32, module_dropout=0.0, target_modules=["lin"])))
    with warnings.catch_warnings():
        # Without its CUDA extension (fbd_cuda, built with ninja at first use) PEFT forces the butterfly
        # factor to 1 and warns; the effective factor is read back from the layer below.
        warnings.simplefilter("ignore")
        add(BOFT, lambda: _peft(base, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                 boft_dropout=0.0, target_modules=["lin"])))
    for c in out:
        if c.name == BOFT:
            shape = tuple(c.module.boft_R["default"].shape)  # (factors, blocks, b, b)
            c.note = f"block size {shape[2]}, butterfly factors {shape[0]}"
    add(ROAD, lambda: _peft(base, RoadConfig(variant="road_1", group_size=64, target_modules=["lin"])))
    return base, out, skipped


def train_step(module: nn.Module, x: Tensor, g: Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        y = module(x)
        y.backward(g)
        x.grad = None
        for p in params:
            p.grad = None

    return run


def inference_contenders(base: nn.Linear, x: Tensor) -> Dict[str, Callable[[], object]]:
    """Inference forward (no grad): plain nn.Linear, a merged qGOFT layer, an unmerged one."""
    merged = qgoft.nn.Linear.from_linear(copy.deepcopy(base), method="qgoft").eval()
    unmerged = qgoft.nn.Linear.from_linear(copy.deepcopy(base), method="qgoft").eval()
    with torch.no_grad():
        for m in (merged, unmerged):
            m.givens_blocks.add_(0.01 * torch.randn_like(m.givens_blocks))
        merged.merge()
    xi = x.detach()

    def fwd(m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(xi)
        return run

    plain = copy.deepcopy(base).eval()
    return {INFER_BASE: fwd(plain), INFER_MERGED: fwd(merged), INFER_UNMERGED: fwd(unmerged)}


BD_MM_F = "matmul x·Wᵀ + b (frozen forward)"
BD_MM_B = "matmul g·W (frozen input grad)"
BD_GF = "GOFT chain forward"
BD_GB = "GOFT chain backward (dx, dθ)"
BD_QF = "qGOFT chain forward"
BD_QB = "qGOFT chain backward (dx, dblocks)"
BD_QA = "qGOFT chain forward + backward through autograd"


def breakdown_contenders(d: int, n: int, rows: int, target: Target) -> Dict[str, Callable[[], object]]:
    """The ops a qgoft layer step is made of, alone: the frozen layer's two matmuls and the chain's
    forward and backward kernels (what ``qgoft.nn.Linear`` adds)."""
    torch.manual_seed(0)
    dev, dt = target.device, target.dtype
    x = torch.randn(rows, d, device=dev, dtype=dt)
    gx = torch.randn(rows, d, device=dev, dtype=dt)
    gy = torch.randn(rows, n, device=dev, dtype=dt)
    w = torch.randn(n, d, device=dev, dtype=dt) / d ** 0.5
    b = torch.randn(n, device=dev, dtype=dt)
    chain = ChainProblem.parallel(d, target)
    calls = chain.kernel_calls(x, gx)
    xa = x.clone().requires_grad_(True)
    ba = chain.blocks.clone().requires_grad_(True)

    def autograd_step() -> None:
        qgoft.ops.quasi_givens_chain(xa, ba, chain.pairs, chain.offsets, None).backward(gx)
        xa.grad = None
        ba.grad = None

    return {
        BD_MM_F: lambda: torch.nn.functional.linear(x, w, b),
        BD_MM_B: lambda: gy @ w,
        BD_GF: calls["goft forward"],
        BD_GB: calls["goft backward"],
        BD_QF: calls["qgoft forward"],
        BD_QB: calls["qgoft backward"],
        BD_QA: autograd_step,
    }
