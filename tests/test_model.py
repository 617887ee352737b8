"""get_qgoft_model / QGoftModel: targeting, freezing, counting, penalty, merge/unmerge, unload, adapters on/off.

Small models are built locally (nn.Sequential, tiny transformers BERT and GPT-2 from configs; no downloads).
"""

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from qgoft import QGoftConfig, get_qgoft_model  # noqa: E402
from qgoft.nn import Linear as QLinear  # noqa: E402
from tiny_models import (Classifier, assert_same_snapshot, snapshot, tiny_bert, tiny_gpt2,  # noqa: E402
                         token_batch)

METHODS = ["goft", "goft_scaled", "qgoft"]
F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# Model builders and helpers.
# ------------------------------------------------------------------------------------------------

def mlp(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)).to(dtype)


def randomize_adapters(model, seed=1, magnitude=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.named_qgoft_layers():
            if layer.givens_angles is not None:
                layer.givens_angles.copy_(magnitude * torch.randn(layer.givens_angles.shape, generator=g))
            if layer.givens_scale is not None:
                layer.givens_scale.copy_(1 + magnitude * torch.randn(layer.givens_scale.shape, generator=g))
            if layer.givens_blocks is not None:
                layer.givens_blocks.copy_(torch.eye(2) + magnitude * torch.randn(layer.givens_blocks.shape,
                                                                                generator=g))


def qgoft_paths(model):
    return sorted(path for path, _ in model.named_qgoft_layers())


# ------------------------------------------------------------------------------------------------
# Injection and targeting.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapters_reproduce_base_outputs_bitwise(method):
    x = torch.randn(5, 8, dtype=F64)
    net = mlp()
    expected = net(x)
    model = get_qgoft_model(net, QGoftConfig(method=method, target_modules=["0", "2", "4"]))
    assert qgoft_paths(model) == ["0", "2", "4"]
    assert torch.equal(model(x), expected)

    bert = tiny_bert()
    ids, mask = token_batch()
    expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    model = get_qgoft_model(bert, QGoftConfig(method=method, target_modules="all-linear"))
    assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, expected)

    gpt = tiny_gpt2()
    expected = gpt(ids).last_hidden_state
    model = get_qgoft_model(gpt, QGoftConfig(method=method, target_modules=["c_attn", "c_proj", "c_fc"]))
    assert len(qgoft_paths(model)) == 2 * 4
    assert torch.equal(model(ids).last_hidden_state, expected)


def test_target_list_regex_and_exclude_select_the_expected_bert_layers():
    model = get_qgoft_model(tiny_bert(), QGoftConfig(target_modules=["query", "value"]))
    assert qgoft_paths(model) == [f"encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")]

    model = get_qgoft_model(tiny_bert(), QGoftConfig(target_modules=r"encoder\.layer\.1\..*dense"))
    assert qgoft_paths(model) == ["encoder.layer.1.attention.output.dense", "encoder.layer.1.intermediate.dense",
                                  "encoder.layer.1.output.dense"]

    model = get_qgoft_model(tiny_bert(), QGoftConfig(target_modules="all-linear",
                                                     exclude_modules=["key", "intermediate.dense"]))
    paths = qgoft_paths(model)
    assert len(paths) == 2 * 4
    assert not any(p.endswith(".key") or p.endswith("intermediate.dense") for p in paths)
    # "output.dense" as a suffix also matches "attention.output.dense"; the longer name picks one.
    model = get_qgoft_model(tiny_bert(), QGoftConfig(target_modules=["attention.output.dense"]))
    assert qgoft_paths(model) == ["encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"]


def test_all_linear_skips_the_tied_output_embeddings_and_counts_shared_weights_once():
    gpt = tiny_gpt2(lm_head=True)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    model = get_qgoft_model(gpt, QGoftConfig(target_modules="all-linear"))
    paths = qgoft_paths(model)
    assert "lm_head" not in paths and len(paths) == 2 * 4
    assert type(gpt.lm_head) is nn.Linear
    trainable, total = model.get_nb_trainable_parameters()
    unique = {id(p): p.numel() for p in gpt.parameters()}
    assert total == sum(unique.values())
    assert trainable == sum(p.numel() for p in model.adapter_parameters())


def test_conv1d_becomes_a_transposed_view_without_copy():
    gpt = tiny_gpt2()
    conv = gpt.h[0].attn.c_attn
    assert isinstance(conv, Conv1D) and conv.weight.shape == (16, 48)
    model = get_qgoft_model(gpt, QGoftConfig(method="goft", target_modules=["c_attn"]))
    layer = gpt.h[0].attn.c_attn
    assert isinstance(layer, QLinear) and (layer.in_features, layer.out_features) == (16, 48)
    assert layer.weight.shape == (48, 16)
    assert layer.weight.data_ptr() == conv.weight.data_ptr()  # shared storage
    assert torch.equal(layer.weight, conv.weight.t())
    assert layer.bias is conv.bias
    assert layer.num_adapter_parameters == 15
    assert model.layer_specs()[0].kind == "conv1d"


def test_modules_to_save_stay_trainable_and_are_never_adapted():
    net = Classifier()
    model = get_qgoft_model(net, QGoftConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    assert model.modules_to_save_paths == ["classifier"]
    assert type(net.classifier) is nn.Linear
    assert len(qgoft_paths(model)) == 2 * 6
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "base_model.classifier.weight" in trainable and "base_model.classifier.bias" in trainable
    assert not any("embeddings" in n or n.endswith(".weight") and "classifier" not in n for n in trainable)
    expected = sum(p.numel() for p in model.adapter_parameters()) + 16 * 2 + 2
    assert model.get_nb_trainable_parameters()[0] == expected


def test_targets_inside_a_module_to_save_are_not_adapted():
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    model = get_qgoft_model(net, QGoftConfig(target_modules=r".*", modules_to_save=["1", "1.0"]))
    assert qgoft_paths(model) == ["0"]
    assert model.modules_to_save_paths == ["1"]  # "1.0" is covered by "1"
    assert all(p.requires_grad for p in net[1].parameters())


def test_multihead_attention_out_proj_is_not_adapted():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.attn(x, x, x)[0])

    model = get_qgoft_model(Block(), QGoftConfig(target_modules=r".*"))
    assert qgoft_paths(model) == ["proj"]


# ------------------------------------------------------------------------------------------------
# Errors leave the model unchanged.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    (QGoftConfig(target_modules=["qury"]), "matches no torch.nn.Linear"),
    (QGoftConfig(target_modules=["attention"]), "only unsupported modules"),
    (QGoftConfig(target_modules="all-linear", modules_to_save=["classifer"]), "'classifer' matches no module"),
    (QGoftConfig(target_modules="all-linear", modules_to_save=r"head\d"), "matches no module"),
    (QGoftConfig(target_modules="all-linear", exclude_modules=r".*"), "matches no"),
])
def test_bad_targets_raise_before_touching_the_model(config, message):
    net = Classifier()
    before = snapshot(net)
    with pytest.raises(ValueError, match=message):
        get_qgoft_model(net, config)
    assert_same_snapshot(before, snapshot(net))


def test_layer_with_one_input_feature_is_refused_and_nothing_changes():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(1, 4))
    before = snapshot(net)
    with pytest.raises(ValueError, match="'1' has in_features=1"):
        get_qgoft_model(net, QGoftConfig(target_modules=r"\d"))
    assert_same_snapshot(before, snapshot(net))
    model = get_qgoft_model(net, QGoftConfig(target_modules=r"\d", exclude_modules=["1"]))
    assert qgoft_paths(model) == ["0"]


def test_adapting_twice_or_shared_modules_is_refused():
    net = mlp()
    model = get_qgoft_model(net, QGoftConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="already"):
        get_qgoft_model(net, QGoftConfig(target_modules=["2"]))
    with pytest.raises(ValueError, match="already a QGoftModel"):
        get_qgoft_model(model, QGoftConfig(target_modules=["2"]))
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match="shared"):
        get_qgoft_model(net, QGoftConfig(target_modules=["0"]))
    with pytest.raises(TypeError):
        get_qgoft_model(mlp(), {"target_modules": ["0"]})


# ------------------------------------------------------------------------------------------------
# Wrapper behaviour, counts.
# ------------------------------------------------------------------------------------------------

def test_forwarding_of_arguments_and_attributes():
    bert = tiny_bert()
    model = get_qgoft_model(bert, QGoftConfig(target_modules=["query"]))
    ids, mask = token_batch()
    out = model(input_ids=ids, attention_mask=mask)
    assert out.last_hidden_state.shape == (3, 7, 16)
    assert model.config is bert.config  # the HF config, not the qgoft one
    assert model.embeddings is bert.embeddings
    assert model.get_base_model() is bert and model.base_model is bert
    assert model.qgoft_config.target_modules == ["query"]
    with pytest.raises(AttributeError):
        model.no_such_attribute
    assert all(k.startswith("base_model.") for k in model.state_dict())
    assert "adapted_layers=2" in repr(model)


def test_trainable_counts_and_print_format(capsys):
    net = mlp()
    model = get_qgoft_model(net, QGoftConfig(method="qgoft", target_modules=["0", "2", "4"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 4 * (7 + 15 + 15)
    base = (8 * 16 + 16) + (16 * 16 + 16) + (16 * 3 + 3)
    assert total == base + trainable
    model.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    assert printed == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                       f"trainable%: {100 * trainable / total:.4f}")
    for method, per_layer in [("goft", lambda d: d - 1), ("goft_scaled", lambda d: 2 * d - 1)]:
        model = get_qgoft_model(mlp(), QGoftConfig(method=method, target_modules=["0", "2", "4"]))
        assert model.get_nb_trainable_parameters()[0] == per_layer(8) + 2 * per_layer(16)


def test_paper_parameter_counts_on_deberta_base_shapes():
    """Paper Table 1: every linear of 12 DeBERTaV3-base blocks -> GOFT 82,872 and qGOFT 331,488 parameters."""

    def deberta_like():
        def block():
            return nn.ModuleDict({name: nn.Linear(768, 768, device="meta")
                                  for name in ("query", "key", "value", "attn_out")} |
                                 {"intermediate": nn.Linear(768, 3072, device="meta"),
                                  "output": nn.Linear(3072, 768, device="meta")})
        return nn.ModuleList([block() for _ in range(12)])

    for method, expected in [("goft", 82_872), ("qgoft", 331_488)]:
        model = get_qgoft_model(deberta_like(), QGoftConfig(method=method, target_modules="all-linear"))
        assert sum(p.numel() for p in model.adapter_parameters()) == expected
        assert model.get_nb_trainable_parameters()[0] == expected


def test_low_precision_base_keeps_float32_adapters():
    net = mlp(dtype=torch.bfloat16)
    model = get_qgoft_model(net, QGoftConfig(target_modules=["0", "2"]))
    assert all(p.dtype == torch.float32 for p in model.adapter_parameters())
    model = get_qgoft_model(mlp(), QGoftConfig(target_modules=["0"], adapter_dtype="float64"))
    assert all(p.dtype == F64 for p in model.adapter_parameters())


# ------------------------------------------------------------------------------------------------
# Orthogonality penalty.
# ------------------------------------------------------------------------------------------------

def test_orthogonality_penalty_is_lambda_times_the_sum_over_all_blocks():
    lam = 0.03
    model = get_qgoft_model(mlp(), QGoftConfig(method="qgoft", target_modules=["0", "2", "4"],
                                               orthogonality_weight=lam, adapter_dtype="float64"))
    assert model.orthogonality_penalty().item() == 0.0  # identity blocks are orthogonal
    randomize_adapters(model)
    expected = 0.0
    for _, layer in model.named_qgoft_layers():
        for block in layer.givens_blocks.detach().tolist():
            (a1, b1), (a2, b2) = block
            expected += (a1 * b1 + a2 * b2) ** 2
    penalty = model.orthogonality_penalty()
    assert penalty.dtype == F64 and penalty.dim() == 0
    assert penalty.item() == pytest.approx(lam * expected, rel=1e-12)
    penalty.backward()
    for _, layer in model.named_qgoft_layers():
        blocks = layer.givens_blocks.detach()
        inner = (blocks[:, :, 0] * blocks[:, :, 1]).sum(-1, keepdim=True)
        grad = torch.stack([2 * lam * inner * blocks[:, :, 1], 2 * lam * inner * blocks[:, :, 0]], dim=-1)
        torch.testing.assert_close(layer.givens_blocks.grad, grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["goft", "goft_scaled"])
def test_orthogonality_penalty_is_zero_for_strict_rotations(method):
    model = get_qgoft_model(mlp(), QGoftConfig(method=method, target_modules=["0"], orthogonality_weight=0.5))
    randomize_adapters(model)
    assert model.orthogonality_penalty().item() == 0.0
    assert model.orthogonality_penalty().dtype == torch.float32
    zero_lambda = get_qgoft_model(mlp(), QGoftConfig(target_modules=["0"], orthogonality_weight=0.0))
    randomize_adapters(zero_lambda)
    assert zero_lambda.orthogonality_penalty().item() == 0.0


# ------------------------------------------------------------------------------------------------
# Enable/disable, merge/unmerge, merge_and_unload, unload.
# ------------------------------------------------------------------------------------------------

def test_disable_adapter_context_and_switches():
    net = mlp()
    x = torch.randn(4, 8, dtype=F64)
    base_out = net(x)
    model = get_qgoft_model(net, QGoftConfig(target_modules=["0", "2", "4"]))
    randomize_adapters(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base_out)
    with model.disable_adapter():
        assert torch.equal(model(x), base_out)
    assert torch.equal(model(x), adapted)
    with pytest.raises(RuntimeError):
        with model.disable_adapter():
            raise RuntimeError("boom")
    assert torch.equal(model(x), adapted)  # restored after an exception too
    model.disable_adapters()
    assert torch.equal(model(x), base_out)
    with model.disable_adapter():
        assert torch.equal(model(x), base_out)
    assert torch.equal(model(x), base_out)  # the context restores "disabled"
    model.enable_adapters()
    assert torch.equal(model(x), adapted)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unmerge_adapter(method):
    bert = tiny_bert().double()
    original = {k: v.clone() for k, v in bert.state_dict().items()}
    model = get_qgoft_model(bert, QGoftConfig(method=method, target_modules="all-linear",
                                              adapter_dtype="float64"))
    randomize_adapters(model)
    ids, mask = token_batch()
    adapted = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.merge_adapter()
    assert all(layer.merged for _, layer in model.named_qgoft_layers())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, adapted,
                               rtol=1e-12, atol=1e-12)
    model.merge_adapter()  # idempotent, no warning needed
    model.unmerge_adapter()
    model.unmerge_adapter()
    state = bert.state_dict()
    for key, value in original.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, adapted)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("merge_first, disable_first", [(False, False), (True, False), (False, True)])
def test_merge_and_unload_gives_a_plain_bert_with_the_same_outputs(method, merge_first, disable_first):
    net = Classifier()
    model = get_qgoft_model(net, QGoftConfig(method=method, target_modules="all-linear",
                                             modules_to_save=["classifier"]))
    randomize_adapters(model)
    ids, mask = token_batch()
    adapted = model(ids, mask)
    if merge_first:
        model.merge_adapter()
    if disable_first:
        model.disable_adapters()
    rng = torch.get_rng_state()
    plain = model.merge_and_unload()
    assert torch.equal(torch.get_rng_state(), rng)  # rebuilding layers runs no initializer
    assert plain is net
    assert not any(isinstance(m, QLinear) for m in plain.modules())
    assert type(net.encoder.encoder.layer[0].attention.self.query) is nn.Linear
    out = plain(ids, mask)
    rel = (out - adapted).abs().max() / adapted.abs().max()
    assert rel <= 1e-5, rel
    assert list(model.named_qgoft_layers()) == []


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_restores_gpt2_conv1d(method):
    gpt = tiny_gpt2()
    model = get_qgoft_model(gpt, QGoftConfig(method=method, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize_adapters(model)
    ids, _ = token_batch()
    adapted = model(ids).last_hidden_state
    merged_c_attn = gpt.h[1].attn.c_attn.merged_weight()
    plain = model.merge_and_unload()
    conv = plain.h[1].attn.c_attn
    assert type(conv) is Conv1D and conv.weight.shape == (16, 48) and (conv.nf, conv.nx) == (48, 16)
    assert conv.weight.is_contiguous()
    assert torch.equal(conv.weight, merged_c_attn.t())
    out = plain(ids).last_hidden_state
    assert ((out - adapted).abs().max() / adapted.abs().max()) <= 1e-5
    assert "Conv1D(nf=48, nx=16)" in repr(conv)


def test_unload_restores_the_original_layers_bitwise():
    gpt = tiny_gpt2()
    original = {k: v.clone() for k, v in gpt.state_dict().items()}
    ids, _ = token_batch()
    expected = gpt(ids).last_hidden_state
    model = get_qgoft_model(gpt, QGoftConfig(target_modules=["c_attn", "c_fc"]))
    randomize_adapters(model)
    model.merge_adapter()  # unload() must undo the merge too
    plain = model.unload()
    assert type(plain.h[0].attn.c_attn) is Conv1D and type(plain.h[0].mlp.c_fc) is Conv1D
    for key, value in plain.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert torch.equal(plain(ids).last_hidden_state, expected)


def test_training_updates_only_adapters_and_modules_to_save():
    net = Classifier()
    model = get_qgoft_model(net, QGoftConfig(target_modules="all-linear", modules_to_save=["classifier"],
                                             orthogonality_weight=0.01))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = token_batch()
    labels = torch.tensor([0, 1, 1])
    model.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(ids, mask), labels) + model.orthogonality_penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(params[name], value), name
        assert params[name].grad is None
    for name, value in trainable.items():
        assert not torch.equal(params[name], value), name
