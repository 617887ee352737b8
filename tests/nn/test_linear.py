"""qgoft.nn.Linear: identity init, freezing, counts, merge/unmerge, dtypes, training."""

import pytest
import torch
import torch.nn.functional as F

from qgoft import layouts
from qgoft import reference as ref
from qgoft.nn import Linear

METHODS = ["goft", "goft_scaled", "qgoft"]
SHAPES = [(2, 3), (3, 5), (8, 8), (13, 7), (64, 33), (100, 16)]
F64 = torch.float64


def adapter_names(method):
    return {"goft": ["givens_angles"], "goft_scaled": ["givens_angles", "givens_scale"],
            "qgoft": ["givens_blocks"]}[method]


def randomize(layer, generator, magnitude=1.0):
    """Non-trivial adapter parameters (angles ~ magnitude * N(0, 1), scale and blocks 0.3 * magnitude away
    from the identity)."""
    with torch.no_grad():
        if layer.givens_angles is not None:
            layer.givens_angles.copy_(magnitude * torch.randn(layer.givens_angles.shape, generator=generator))
        if layer.givens_scale is not None:
            layer.givens_scale.copy_(1 + 0.3 * magnitude * torch.randn(layer.givens_scale.shape, generator=generator))
        if layer.givens_blocks is not None:
            noise = 0.3 * magnitude * torch.randn(layer.givens_blocks.shape, generator=generator)
            layer.givens_blocks.copy_(torch.eye(2) + noise)


def dense_R(layer):
    """R = P_1 ... P_L built block by block from the layer's parameters (independent of qgoft.ops)."""
    if layer.method == "qgoft":
        blocks = layer.givens_blocks
    else:
        blocks = ref.blocks_from_angles(layer.givens_angles)
    return ref.dense_chain_matrix(blocks, layer.layout.pairs_tensor(), layer.layout.layer_offsets_tensor(),
                                  layer.in_features)


def expected_output(layer, x):
    """y = x R S W^T + b in float64 from dense matrices."""
    R = dense_R(layer).double()
    xr = x.double() @ R
    if layer.givens_scale is not None:
        xr = xr * layer.givens_scale.double()
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(xr, layer.weight.double(), bias)


# ------------------------------------------------------------------------------------------------
# construction, identity init, freezing, counts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d, n", SHAPES)
def test_identity_init_from_linear_is_bitwise(method, d, n):
    torch.manual_seed(d * 100 + n)
    base = torch.nn.Linear(d, n)
    x = torch.randn(4, 3, d)
    expected = base(x)
    layer = Linear.from_linear(base, method=method)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d, n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_identity_init_direct_is_bitwise(method, d, n, bias):
    torch.manual_seed(d + n)
    layer = Linear(d, n, bias=bias, method=method)
    x = torch.randn(5, d)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert (layer.bias is None) == (not bias)


@pytest.mark.parametrize("kind", ["sequential", "butterfly"])
@pytest.mark.parametrize("method", METHODS)
def test_identity_init_other_layouts(kind, method):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 6)
    x = torch.randn(7, 12)
    layer = Linear.from_linear(base, method=method, layout=kind, stack=2)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("method", METHODS)
def test_identity_values(method):
    layer = Linear(9, 4, method=method)
    if layer.givens_angles is not None:
        assert torch.equal(layer.givens_angles, torch.zeros(8))
    if layer.givens_scale is not None:
        assert torch.equal(layer.givens_scale, torch.ones(9))
    if layer.givens_blocks is not None:
        assert torch.equal(layer.givens_blocks, torch.eye(2).expand(8, 2, 2))
    randomize(layer, torch.Generator().manual_seed(1))
    layer.reset_adapter_parameters()
    x = torch.randn(3, 9)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("method", METHODS)
def test_frozen_and_trainable(method):
    base = torch.nn.Linear(10, 4)
    layer = Linear.from_linear(base, method=method)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert not base.weight.requires_grad  # same tensors
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_names(method))
    for name in {"givens_angles", "givens_scale", "givens_blocks"} - set(adapter_names(method)):
        assert getattr(layer, name) is None
    direct = Linear(10, 4, method=method)
    assert {name for name, p in direct.named_parameters() if p.requires_grad} == set(adapter_names(method))
    assert not direct.weight.requires_grad


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize("d", [2, 3, 7, 16, 100])
def test_parameter_counts(kind, d):
    assert Linear(d, 3, method="goft", layout=kind).num_adapter_parameters == d - 1
    assert Linear(d, 3, method="goft_scaled", layout=kind).num_adapter_parameters == 2 * d - 1
    assert Linear(d, 3, method="qgoft", layout=kind).num_adapter_parameters == 4 * (d - 1)
    layer = Linear(d, 3, method="qgoft", layout=kind)
    assert layer.givens_blocks.shape == (d - 1, 2, 2)
    assert Linear(d, 3, method="goft", layout=kind, stack=3).num_adapter_parameters == 3 * (d - 1)


def test_parameter_counts_butterfly():
    assert Linear(16, 3, method="goft", layout="butterfly").num_adapter_parameters == 8 * 4
    assert Linear(16, 3, method="qgoft", layout="butterfly").num_adapter_parameters == 4 * 8 * 4


def test_layout_buffers_and_attribute():
    layer = Linear(13, 5, method="qgoft", layout="butterfly", stack=2)
    expected = layouts.stack(layouts.butterfly(13), 2)
    assert layer.layout == expected and layer.layout.name == "butterfly*2"
    assert torch.equal(layer.givens_pairs, expected.pairs_tensor())
    assert torch.equal(layer.givens_layer_offsets, expected.layer_offsets_tensor())
    assert layer.givens_pairs.dtype == torch.int32 and layer.givens_layer_offsets.dtype == torch.int32
    # not the layout's cached tensor (a module must own its buffers)
    assert layer.givens_pairs.data_ptr() != expected.pairs_tensor().data_ptr()
    keys = set(layer.state_dict())
    assert keys == {"weight", "bias", "givens_blocks"}


def test_custom_layout_and_layout_object():
    custom = layouts.custom(6, [[(0, 5), (1, 4)], [(2, 3)]])
    layer = Linear(6, 2, layout=custom)
    assert layer.layout is custom and layer.num_adapter_parameters == 3
    layer = Linear(6, 2, layout=[[(0, 5), (1, 4)], [(2, 3)]])
    assert layer.layout == custom
    with pytest.raises(ValueError, match="d=6"):
        Linear(7, 2, layout=custom)


def test_constructor_errors():
    with pytest.raises(ValueError, match="method"):
        Linear(4, 4, method="lora")
    with pytest.raises(ValueError, match="adapter_dtype"):
        Linear(4, 4, adapter_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown layout"):
        Linear(4, 4, layout="zigzag")
    with pytest.raises(ValueError, match="d >= 2"):
        Linear(1, 4)
    with pytest.raises(TypeError):
        Linear.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError):
        Linear.from_linear(Linear(4, 4))


def test_from_linear_details():
    base = torch.nn.Linear(6, 3, bias=False)
    base.eval()
    layer = Linear.from_linear(base, method="goft_scaled", layout="sequential", adapter_dtype=F64)
    assert layer.bias is None and layer.weight is base.weight
    assert not layer.training
    assert layer.givens_angles.dtype == F64 and layer.givens_scale.dtype == F64
    assert layer.givens_angles.device == base.weight.device
    assert layer.method == "goft_scaled" and layer.layout == layouts.sequential(6)


def test_deberta_v3_base_parameter_counts():
    """docs/MATH.md Sec. 5 / paper Table 1: every linear of 12 DeBERTaV3-base blocks adapted."""
    block_shapes = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]  # q, k, v, attn-out, ffn-in, ffn-out
    totals = {}
    for method in ["goft", "qgoft"]:
        total = 0
        for _ in range(12):
            for d, n in block_shapes:
                base = torch.nn.Linear(d, n, device="meta")
                total += Linear.from_linear(base, method=method).num_adapter_parameters
        totals[method] = total
    assert totals == {"goft": 82_872, "qgoft": 331_488}
    direct = Linear(3072, 768, device="meta", method="qgoft")
    assert direct.givens_blocks.device.type == "meta" and direct.num_adapter_parameters == 4 * 3071


# ------------------------------------------------------------------------------------------------
# forward against dense math
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["parallel", "sequential", "butterfly"])
@pytest.mark.parametrize("d, n", [(5, 3), (8, 8), (13, 4)])
def test_forward_matches_dense_float64(method, kind, d, n):
    gen = torch.Generator().manual_seed(d * n)
    layer = Linear(d, n, method=method, layout=kind, dtype=F64, adapter_dtype=F64)
    randomize(layer, gen)
    x = torch.randn(2, 3, d, generator=gen, dtype=F64)
    out = layer(x)
    assert out.shape == (2, 3, n) and out.dtype == F64
    torch.testing.assert_close(out, expected_output(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_adapter_only_and_match_dense(method):
    gen = torch.Generator().manual_seed(5)
    layer = Linear(11, 6, method=method, dtype=F64, adapter_dtype=F64)
    randomize(layer, gen)
    x = torch.randn(7, 11, generator=gen, dtype=F64, requires_grad=True)
    target = torch.randn(7, 6, generator=gen, dtype=F64)
    loss = (layer(x) - target).square().mean()
    loss.backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    params = list(layer.adapter_parameters())
    grads = [p.grad.clone() for p in params]
    for g in grads:
        assert g.abs().max() > 0
    dense_loss = (expected_output(layer, x) - target).square().mean()
    dense_grads = torch.autograd.grad(dense_loss, params + [x])
    for got, expected in zip(grads + [x.grad], dense_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# merge / unmerge
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d, n", [(3, 5), (13, 7), (64, 48), (100, 33)])
def test_merge_matches_forward_fp32(method, d, n):
    gen = torch.Generator().manual_seed(d + 1000 * n)
    base = torch.nn.Linear(d, n)
    layer = Linear.from_linear(base, method=method)
    randomize(layer, gen)
    original = base.weight.detach().clone()
    x = torch.randn(16, d, generator=gen)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        merged = layer(x)
    assert not torch.equal(layer.weight, original)
    scale = unmerged.abs().max()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * scale)
    assert (merged - unmerged).norm() <= 1e-5 * unmerged.norm()
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, original) and torch.equal(base.weight, original)
    assert layer.weight is base.weight
    with torch.no_grad():
        assert torch.equal(layer(x), unmerged)


@pytest.mark.parametrize("method", METHODS)
def test_merge_matches_forward_fp64(method):
    gen = torch.Generator().manual_seed(77)
    layer = Linear(37, 21, method=method, dtype=F64, adapter_dtype=F64)
    randomize(layer, gen)
    x = torch.randn(9, 37, generator=gen, dtype=F64)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_merged_weight_formula(method):
    gen = torch.Generator().manual_seed(3)
    layer = Linear(10, 6, method=method, dtype=F64, adapter_dtype=F64)
    randomize(layer, gen)
    R = layer.rotation_matrix()
    torch.testing.assert_close(R, dense_R(layer), rtol=1e-13, atol=1e-13)
    s = layer.givens_scale if layer.givens_scale is not None else torch.ones(10, dtype=F64)
    expected = layer.weight @ torch.diag(s) @ R.T  # W_lin S R^T
    merged_weight = layer.merged_weight()
    assert merged_weight.shape == (6, 10) and merged_weight.dtype == F64
    torch.testing.assert_close(merged_weight, expected.detach(), rtol=1e-12, atol=1e-12)
    # while merged, merged_weight() still refers to the original weight
    layer.merge()
    torch.testing.assert_close(layer.merged_weight(), expected.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.weight, merged_weight)


def test_merged_weight_dtype_float32_for_low_precision_base():
    layer = Linear(8, 4, dtype=torch.bfloat16, method="qgoft")
    randomize(layer, torch.Generator().manual_seed(0))
    assert layer.merged_weight().dtype == torch.float32


def test_merge_twice_warns_and_unmerge_without_merge_warns():
    layer = Linear(6, 4, method="goft")
    randomize(layer, torch.Generator().manual_seed(1))
    original = layer.weight.detach().clone()
    layer.merge()
    once = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, once)
    layer.unmerge()
    assert torch.equal(layer.weight, original)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    assert torch.equal(layer.weight, original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_unmerge_low_precision_base_bitwise(dtype):
    torch.manual_seed(2)
    base = torch.nn.Linear(16, 8).to(dtype)
    original = base.weight.detach().clone()
    layer = Linear.from_linear(base, method="qgoft")
    randomize(layer, torch.Generator().manual_seed(2))
    layer.merge()
    assert layer.weight.dtype == dtype
    expected = layer.merged_weight().to(dtype)
    assert torch.equal(layer.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.weight, original)


def test_merge_does_not_track_gradients():
    layer = Linear(6, 3, method="goft_scaled")
    randomize(layer, torch.Generator().manual_seed(3))
    layer.merge()
    assert not layer.weight.requires_grad and layer.weight.grad_fn is None
    assert layer.merged_weight().grad_fn is None


# ------------------------------------------------------------------------------------------------
# rotation matrix, penalty, adapters on/off, repr
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["parallel", "sequential", "butterfly"])
def test_rotation_matrix_orthogonal_for_goft(kind):
    for method in ["goft", "goft_scaled"]:
        layer = Linear(13, 4, method=method, layout=kind, stack=2, adapter_dtype=F64)
        randomize(layer, torch.Generator().manual_seed(4))
        R = layer.rotation_matrix()
        assert R.shape == (13, 13) and R.dtype == F64
        eye = torch.eye(13, dtype=F64)
        assert (R.T @ R - eye).abs().max() < 1e-12  # the scale is not part of R
        R32 = layer.rotation_matrix(torch.float32)
        assert R32.dtype == torch.float32
        torch.testing.assert_close(R32.double(), R, rtol=0, atol=1e-5)
    layer = Linear(13, 4, method="goft")
    assert torch.equal(layer.rotation_matrix(), torch.eye(13))


def test_rotation_matrix_qgoft_matches_dense():
    layer = Linear(9, 4, method="qgoft")
    randomize(layer, torch.Generator().manual_seed(5))
    torch.testing.assert_close(layer.rotation_matrix(), dense_R(layer).detach(), rtol=1e-6, atol=1e-6)


def test_orthogonality_penalty():
    layer = Linear(9, 4, method="qgoft")
    assert layer.orthogonality_penalty() == 0
    randomize(layer, torch.Generator().manual_seed(6))
    blocks = layer.givens_blocks
    penalty = layer.orthogonality_penalty()
    assert penalty.dim() == 0 and penalty > 0
    expected = sum((blocks[p, :, 0] @ blocks[p, :, 1]) ** 2 for p in range(blocks.shape[0]))
    torch.testing.assert_close(penalty, expected)
    torch.testing.assert_close(penalty, ref.orthogonality_penalty_reference(blocks))
    penalty.backward()
    with torch.no_grad():
        inner = (blocks[:, :, 0] * blocks[:, :, 1]).sum(-1)
        expected_grad = torch.stack((2 * inner[:, None] * blocks[:, :, 1], 2 * inner[:, None] * blocks[:, :, 0]), -1)
    torch.testing.assert_close(blocks.grad, expected_grad)
    for method in ["goft", "goft_scaled"]:
        other = Linear(9, 4, method=method)
        randomize(other, torch.Generator().manual_seed(6))
        zero = other.orthogonality_penalty()
        assert zero.dim() == 0 and zero == 0 and zero.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_disable_adapters(method):
    base = torch.nn.Linear(12, 5)
    layer = Linear.from_linear(base, method=method)
    randomize(layer, torch.Generator().manual_seed(7))
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected_base = base(x)
        adapted = layer(x)
        assert not torch.allclose(adapted, expected_base)
        layer.disable_adapters()
        assert not layer.adapters_enabled
        assert torch.equal(layer(x), expected_base)
        layer.enable_adapters()
        assert layer.adapters_enabled
        assert torch.equal(layer(x), adapted)
        # merged and disabled: still the base output
        layer.merge()
        layer.disable_adapters()
        assert torch.equal(layer(x), expected_base)
        layer.enable_adapters()
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)


def test_extra_repr():
    layer = Linear(13, 7, method="qgoft", layout="butterfly")
    text = repr(layer)
    for piece in ["in_features=13", "out_features=7", "method='qgoft'", "layout='butterfly'",
                  f"adapter_parameters={layer.num_adapter_parameters}"]:
        assert piece in text
    layer.merge()
    assert "merged=True" in repr(layer)


# ------------------------------------------------------------------------------------------------
# dtypes and devices
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_adapter_stays_float32_with_bf16_base(method):
    """docs/MATH.md Sec. 9: the original cast the angles to the bf16 base dtype."""
    torch.manual_seed(8)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = Linear.from_linear(base, method=method)
    for p in layer.adapter_parameters():
        assert p.dtype == torch.float32
    direct = Linear(16, 8, dtype=torch.bfloat16, method=method)
    assert all(p.dtype == torch.float32 for p in direct.adapter_parameters())
    assert direct.weight.dtype == torch.bfloat16
    # module-wide half-precision casts do not reach the adapter
    layer32 = Linear(16, 8, method=method)
    layer32.to(torch.bfloat16)
    assert layer32.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in layer32.adapter_parameters())
    layer32.half()
    assert layer32.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in layer32.adapter_parameters())
    # small angle updates survive (they would round away in bf16)
    randomize(layer, torch.Generator().manual_seed(8))
    with torch.no_grad():
        for p in layer.adapter_parameters():
            before = p.clone()
            p.add_(1e-4)
            assert not torch.equal(p, before)
    x = torch.randn(3, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    exact = expected_output(layer, x)
    assert (y.double() - exact).abs().max() <= 0.05 * exact.abs().max()


def test_training_in_bf16_updates_float32_params():
    torch.manual_seed(9)
    layer = Linear(8, 4, dtype=torch.bfloat16, method="goft")
    x = torch.randn(16, 8).to(torch.bfloat16)
    layer(x).float().square().mean().backward()
    assert layer.givens_angles.grad is not None and layer.givens_angles.grad.dtype == torch.float32


def test_to_float64_and_device_moves_buffers():
    layer = Linear(10, 4, method="goft_scaled")
    randomize(layer, torch.Generator().manual_seed(10))
    layer.to(F64)
    assert layer.weight.dtype == F64 and layer.givens_angles.dtype == F64 and layer.givens_scale.dtype == F64
    assert layer.givens_pairs.dtype == torch.int32 and layer.givens_layer_offsets.dtype == torch.int32
    x = torch.randn(3, 10, dtype=F64)
    torch.testing.assert_close(layer(x), expected_output(layer, x), rtol=1e-12, atol=1e-12)
    layer.to("meta")
    for tensor in [layer.weight, layer.givens_angles, layer.givens_pairs, layer.givens_layer_offsets]:
        assert tensor.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_forward_and_merge(method):
    layer = Linear(33, 17, method=method)
    randomize(layer, torch.Generator().manual_seed(11))
    x = torch.randn(5, 33)
    expected = layer(x).detach()
    layer.cuda()
    assert layer.givens_pairs.is_cuda and layer.givens_layer_offsets.is_cuda
    out = layer(x.cuda())
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x.cuda()).cpu(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_tiny_training_loop_decreases_loss(method):
    torch.manual_seed(12)
    d, n = 16, 8
    base = torch.nn.Linear(d, n)
    teacher = Linear.from_linear(torch.nn.Linear(d, n), method=method)
    with torch.no_grad():
        teacher.weight.copy_(base.weight)
        teacher.bias.copy_(base.bias)
    randomize(teacher, torch.Generator().manual_seed(13), magnitude=0.3)
    x = torch.randn(64, d)
    with torch.no_grad():
        target = teacher(x)
    student = Linear.from_linear(base, method=method)
    weight_before = base.weight.detach().clone()
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.mse_loss(student(x), target)
        if method == "qgoft":
            loss = loss + 1e-3 * student.orthogonality_penalty()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(base.weight, weight_before)  # the frozen base never moves
    assert student.weight.grad is None and student.bias.grad is None


def test_float64_adapter_with_float32_base():
    layer = Linear(9, 4, method="goft_scaled", adapter_dtype=F64)
    randomize(layer, torch.Generator().manual_seed(14))
    x = torch.randn(3, 9)
    out = layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected_output(layer, x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.givens_angles.grad.dtype == F64 and layer.givens_scale.grad.dtype == F64
    assert layer.merged_weight().dtype == F64


def test_half_cast_guard_with_swap_tensors_and_grads():
    layer = Linear(8, 4, method="qgoft")
    layer(torch.randn(2, 8)).sum().backward()
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.bfloat16()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.givens_blocks.dtype == torch.float32 and layer.givens_blocks.grad.dtype == torch.float32


def test_deepcopy_and_pickle():
    import copy
    import io

    layer = Linear(9, 4, method="qgoft", layout="butterfly")
    randomize(layer, torch.Generator().manual_seed(15))
    x = torch.randn(2, 9)
    clone = copy.deepcopy(layer)
    assert clone.layout == layer.layout and clone.givens_blocks.data_ptr() != layer.givens_blocks.data_ptr()
    assert torch.equal(clone(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.layout == layer.layout and torch.equal(loaded(x), layer(x))
    # state_dict round trip into a fresh layer
    fresh = Linear(9, 4, method="qgoft", layout="butterfly")
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
