"""Long-run numerics: GOFT stays orthogonal in float32 after 1,000 optimizer steps with large learning rates
(the angles are the parameters, so there is no drift to correct: R is a product of exact rotations up to
rounding), and merge/unmerge cycles leave the base weight bitwise unchanged."""
from __future__ import annotations

import math

import pytest
import torch

import qgoft
from qgoft import layouts
from qgoft.nn import Linear

F32, F64 = torch.float32, torch.float64


def orthogonality_error(R: torch.Tensor) -> float:
    eye = torch.eye(R.shape[0], dtype=F64)
    R = R.double()
    return max((R.T @ R - eye).abs().max().item(), (R @ R.T - eye).abs().max().item())


def train(layer: Linear, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> list[float]:
    """Fit random targets (new batch every step): large, noisy gradients that push the angles far."""
    gen = torch.Generator().manual_seed(seed)
    d, n = layer.in_features, layer.out_features
    losses = []
    for _ in range(steps):
        x = torch.randn(32, d, generator=gen)
        target = 3.0 * torch.randn(32, n, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss = (layer(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("d,layout,method,optimizer,lr", [
    (64, "parallel", "goft", "adam", 0.5),
    (128, "parallel", "goft", "sgd", 1.0),
    (128, "butterfly", "goft_scaled", "adam", 0.3),
    (96, "sequential", "goft", "sgd", 0.5),
])
def test_goft_stays_orthogonal_after_1000_large_steps(one_thread, d, layout, method, optimizer, lr):
    torch.manual_seed(d)
    layer = Linear(d, 48, method=method, layout=layout)
    params = list(layer.adapter_parameters())
    opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9))
    losses = train(layer, opt, 1000, seed=d)  # one thread: tiny matmuls only lose time to a second one
    assert all(math.isfinite(v) for v in losses)
    angles = layer.givens_angles.detach()
    assert torch.isfinite(angles).all()
    assert angles.abs().max().item() > 1.0, "the steps were meant to move the angles far from 0"
    R32 = layer.rotation_matrix()                   # float32 chain applied to the identity
    assert R32.dtype == F32
    err = orthogonality_error(R32)
    assert err <= 1e-5, f"|R^T R - I| = {err:.3g} in float32 after 1000 steps"
    # and it is the R of the float64 math of the same angles, to float32 rounding
    R64 = layer.rotation_matrix(dtype=F64)
    assert orthogonality_error(R64) <= 1e-12
    assert (R32.double() - R64).abs().max().item() <= 1e-5
    # the adapted layer is W R^T (S): merged forward == adapted forward
    x = torch.randn(16, d)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)
    layer.unmerge()


def _randomized(layer: Linear, seed: int, magnitude: float = 1.0) -> Linear:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.adapter_parameters():
            param.add_(magnitude * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return layer


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16, F64], ids=str)
@pytest.mark.parametrize("method", ["goft", "goft_scaled", "qgoft"])
def test_merge_unmerge_100_times_is_bitwise(method, dtype):
    torch.manual_seed(7)
    layer = _randomized(Linear(80, 33, method=method, layout=layouts.stack(layouts.parallel(80), 2)), seed=8)
    layer = layer.to(dtype)  # the adapter stays float32 for bf16/fp16 (float64 follows .to(float64))
    weight = layer.weight
    original = weight.detach().clone()
    x = torch.randn(7, 80).to(dtype)
    y = layer(x)
    merged_first = None
    for cycle in range(100):
        layer.merge()
        assert layer.merged and layer.weight is weight  # merged in place
        if merged_first is None:
            merged_first = weight.detach().clone()
            assert not torch.equal(merged_first, original)
        else:
            assert torch.equal(weight, merged_first), f"cycle {cycle}: the merge is not reproducible"
        layer.unmerge()
        assert not layer.merged
        assert torch.equal(weight, original), f"cycle {cycle}: unmerge did not restore the weight bitwise"
    assert torch.equal(layer(x), y)


def test_merge_unmerge_cycles_through_the_model_api():
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5))
    adapted = qgoft.get_qgoft_model(model, qgoft.QGoftConfig(method="qgoft", target_modules=["0", "2"]))
    for _, layer in adapted.named_qgoft_layers():
        _randomized(layer, seed=3, magnitude=0.3)
    originals = {name: p.detach().clone() for name, p in model.named_parameters() if "weight" in name}
    x = torch.randn(9, 24)
    y = adapted(x)
    for _ in range(100):
        adapted.merge_adapter()
        adapted.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in originals:
            assert torch.equal(p, originals[name]), name
    assert torch.equal(adapted(x), y)
