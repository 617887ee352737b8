"""qGOFT adapters on quantized bases on CUDA: torchao int8 / int4 weight-only and bitsandbytes Linear8bitLt /
Linear4bit (each checked where its package is installed, reported SKIP otherwise). Run by tools/gpu_check.sh.

For every base: the adapted model equals the quantized base at initialization, three AdamW steps reach every
adapter parameter and leave the quantized weights bitwise unchanged, merge either requantizes (torchao: the
reported error is printed) or refuses changing nothing (bitsandbytes), and a saved adapter reloads onto a fresh
quantized base with equal outputs. ``--device cpu`` runs the torchao part on the CPU.

    python tools/gpu_quantized_check.py [--device cuda|cpu]      # exit status 1 when a check failed
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from typing import Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qgoft  # noqa: E402

WIDTH = 256


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 8))


def torchao_int8(net: nn.Module, device: str) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    net = net.to(device, torch.bfloat16)
    quantize_(net, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name in ("0", "2"))
    return net


def torchao_int4(net: nn.Module, device: str) -> nn.Module:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    net = net.to(device, torch.bfloat16)
    quantize_(net, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
              filter_fn=lambda m, name: name in ("0", "2"))
    return net


def bnb_layers(four_bit: bool) -> Callable[[nn.Module, str], nn.Module]:
    def convert(net: nn.Module, device: str) -> nn.Module:
        import bitsandbytes as bnb

        for name in ("0", "2"):
            dense = net.get_submodule(name)
            if four_bit:
                layer = bnb.nn.Linear4bit(WIDTH, WIDTH, compute_dtype=torch.bfloat16, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(WIDTH, WIDTH, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False,
                                                 has_fp16_weights=False)
            layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
            setattr(net, name, layer)
        net[4] = net[4].to(torch.bfloat16)
        return net.to(device)  # bitsandbytes quantizes when the weights move to the GPU
    return convert


def inner_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of every frozen tensor (the inner tensors of quantized weights)."""
    out = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.requires_grad:
            continue
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
            for inner in tensor.__tensor_flatten__()[0]:
                out[f"{name}.{inner}"] = getattr(tensor, inner).detach().clone()
        else:
            out[name] = tensor.detach().clone()
    return out


def check(name: str, quantize: Callable[[nn.Module, str], nn.Module], device: str, mergeable: bool) -> None:
    config = qgoft.QGoftConfig(method="qgoft", target_modules=["0", "2"], modules_to_save=["4"])
    x = torch.randn(64, WIDTH, device=device, dtype=torch.bfloat16, generator=None)
    net = quantize(make_net(0), device)
    expected = net(x)
    model = qgoft.get_qgoft_model(net, config)
    kinds = sorted({spec.kind for spec in model.layer_specs()})
    assert all(isinstance(layer, qgoft.nn.InputAdapter) for _, layer in model.named_qgoft_layers()), kinds
    assert torch.equal(model(x), expected), "not the identity at initialization"
    frozen = inner_tensors(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(x).float().square().mean() + model.orthogonality_penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter_parameters()), "no gradient"
    after = inner_tensors(model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen if k in after), "a frozen base tensor changed"
    adapted = model(x)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        again = qgoft.QGoftModel.from_pretrained(quantize(make_net(0), device), directory)
        assert torch.equal(again(x), adapted), "reloaded adapter gives other outputs"
    if mergeable:
        errors = model.merge_adapter()
        merged = model(x)
        rel = ((merged.float() - adapted.float()).norm() / adapted.float().norm()).item()
        model.unmerge_adapter()
        assert torch.equal(model(x), adapted), "unmerge did not restore the outputs"
        detail = f"merge error per layer {[f'{e:.2e}' for e in errors.values()]}, on x {rel:.2e}"
    else:
        before = inner_tensors(model)
        try:
            model.merge_adapter()
        except RuntimeError as err:
            assert "nothing was changed" in str(err), err
        else:
            raise AssertionError("merge of a base that cannot be requantized did not refuse")
        assert all(torch.equal(before[k], v) for k, v in inner_tensors(model).items()), "refused merge changed it"
        detail = "merge refused, nothing changed"
    print(f"PASS {name}: kinds {kinds}; {detail}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = ap.parse_args().device
    if device == "cuda" and not torch.cuda.is_available():
        print("FAIL: no CUDA device")
        return 1
    cases = [("torchao int8", "torchao", torchao_int8, True), ("torchao int4", "torchao", torchao_int4, True)]
    if device == "cuda":
        cases += [("bitsandbytes Linear8bitLt", "bitsandbytes", bnb_layers(False), False),
                  ("bitsandbytes Linear4bit nf4", "bitsandbytes", bnb_layers(True), False)]
    failed: List[str] = []
    for name, package, quantize, mergeable in cases:
        try:
            __import__(package)
        except Exception as err:  # noqa: BLE001 - a missing or broken package is a SKIP
            print(f"SKIP {name}: {package} not importable ({type(err).__name__}: {err})")
            continue
        try:
            check(name, quantize, device, mergeable)
        except Exception:  # noqa: BLE001 - report every case
            failed.append(name)
            print(f"FAIL {name}:\n{traceback.format_exc()}")
    print(f"quantized bases on {device}: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
