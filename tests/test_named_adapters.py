"""Named adapters on one base, PEFT style: add / set / delete / disable, different methods and layouts,
per-adapter modules to save, merge of the active adapter, save (default at the top level, others in
subfolders) and load back, and the errors (unknown / active / invalid names) that change nothing."""

from __future__ import annotations

import os

import pytest
import torch

import qgoft
from qgoft import QGoftConfig, QGoftModel, get_qgoft_model

pytest.importorskip("transformers")
from tiny_models import Classifier, assert_same_snapshot, snapshot, token_batch  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]


def config(**changes) -> QGoftConfig:
    values = dict(method="qgoft", target_modules=TARGETS, modules_to_save=["classifier"])
    values.update(changes)
    return QGoftConfig(**values)


def perturb(model: QGoftModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g, dtype=param.dtype))
        for param in model.classifier.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g, dtype=param.dtype))


def two_adapters():
    model = get_qgoft_model(Classifier(), config())
    perturb(model, 1)
    model.add_adapter("sst", config(method="goft_scaled", layout="butterfly"))
    model.set_adapter("sst")
    perturb(model, 2)
    model.set_adapter("default")
    return model


def test_add_set_delete_and_each_adapter_has_its_own_tensors():
    ids, mask = token_batch()
    base_out = Classifier()(ids, mask)
    model = get_qgoft_model(Classifier(), config())
    perturb(model, 1)
    out_default = model(ids, mask)
    with model.disable_adapter():
        head_only = model(ids, mask)  # frozen encoder + the default adapter's trained head
    model.add_adapter("sst", config(method="goft_scaled", layout="butterfly"))
    assert model.active_adapter == "default" and model.adapter_names() == ["default", "sst"]
    assert torch.equal(model(ids, mask), out_default)  # adding does not change the active adapter
    assert not any(p.requires_grad for n, p in model.named_parameters() if "qgoft_adapters" in n)
    model.set_adapter("sst")
    layer = model.base_model.encoder.encoder.layer[0].attention.self.query
    assert layer.method == "goft_scaled" and layer.layout.name == "butterfly" and layer.active_adapter == "sst"
    # a new adapter is the identity; its copy of the head starts as the active adapter's
    assert torch.equal(model(ids, mask), head_only)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("givens_angles") for n in trainable) and any(n.endswith("givens_scale") for n in trainable)
    assert not any(n.endswith("givens_blocks") for n in trainable)
    perturb(model, 2)
    out_sst = model(ids, mask)
    assert not torch.equal(out_sst, out_default)
    model.set_adapter("default")
    assert torch.equal(model(ids, mask), out_default)
    model.set_adapter("sst")
    assert torch.equal(model(ids, mask), out_sst)
    model.set_adapter("default")
    model.delete_adapter("sst")
    assert model.adapter_names() == ["default"]
    assert not any("qgoft_adapters.sst" in n or "qgoft_saved_modules.sst" in n for n, _ in model.named_parameters())
    assert torch.equal(model(ids, mask), out_default)
    with model.disable_adapter():
        assert not torch.equal(model(ids, mask), base_out)  # the trained head stays (modules to save)


def test_penalty_and_merge_use_the_active_adapter():
    ids, mask = token_batch()
    model = two_adapters()
    out_default = model(ids, mask)
    assert model.orthogonality_penalty() > 0
    model.set_adapter("sst")
    out_sst = model(ids, mask)
    assert model.orthogonality_penalty() == 0  # goft_scaled blocks are orthogonal
    model.merge_adapter()
    torch.testing.assert_close(model(ids, mask), out_sst, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        model.set_adapter("default")
    model.unmerge_adapter()
    model.set_adapter("default")
    assert torch.equal(model(ids, mask), out_default)
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(ids, mask), out_default, rtol=1e-4, atol=1e-5)


def test_bad_names_and_unknown_or_active_adapters_raise_and_change_nothing():
    model = two_adapters()
    before = snapshot(model)
    for bad in ("..", "a/b", "", ".hidden", "a.b", "x" * 65, 3):
        with pytest.raises(ValueError, match="invalid adapter name"):
            model.add_adapter(bad, config())
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("sst", config())
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="cannot delete the active adapter 'default'"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.delete_adapter("nope")
    with pytest.raises(ValueError, match="same layers"):
        model.add_adapter("few", config(target_modules=["query"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_adapter("nohead", config(modules_to_save=None))
    assert model.adapter_names() == ["default", "sst"]
    assert_same_snapshot(before, snapshot(model))


def test_save_writes_default_on_top_and_others_in_subfolders_and_loads_back(tmp_path):
    ids, mask = token_batch()
    model = two_adapters()
    out_default = model(ids, mask)
    model.set_adapter("sst")
    out_sst = model(ids, mask)
    model.set_adapter("default")
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "sst"} <= set(os.listdir(tmp_path))
    assert sorted(os.listdir(tmp_path / "sst")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert model.active_adapter == "default"

    again = QGoftModel.from_pretrained(Classifier(), tmp_path)
    assert torch.equal(again(ids, mask), out_default)
    again.load_adapter(tmp_path / "sst", adapter_name="sst")
    assert again.active_adapter == "default" and again.adapter_names() == ["default", "sst"]
    assert torch.equal(again(ids, mask), out_default)
    again.set_adapter("sst")
    assert torch.equal(again(ids, mask), out_sst)

    only = QGoftModel.from_pretrained(Classifier(), tmp_path / "sst", adapter_name="sst")
    assert only.active_adapter == "sst" and torch.equal(only(ids, mask), out_sst)
    # saving a model whose only adapter is not "default" writes it into its subfolder
    only.save_pretrained(tmp_path / "solo")
    assert os.listdir(tmp_path / "solo") == ["sst"]


def test_load_adapter_of_another_width_refuses_and_removes_nothing(tmp_path):
    wide = get_qgoft_model(Classifier(hidden=32), config())
    wide.save_pretrained(tmp_path / "wide")
    model = two_adapters()
    before = snapshot(model)
    with pytest.raises(ValueError, match="in_features"):
        model.load_adapter(tmp_path / "wide", adapter_name="wide")
    assert model.adapter_names() == ["default", "sst"]
    assert_same_snapshot(before, snapshot(model))


def test_layer_state_moves_without_copies():
    model = two_adapters()
    layer = model.base_model.encoder.encoder.layer[1].output.dense
    blocks = layer.givens_blocks
    model.set_adapter("sst")
    assert layer.givens_blocks is None and layer.qgoft_adapters["default"].givens_blocks is blocks
    model.set_adapter("default")
    assert layer.givens_blocks is blocks
    assert isinstance(layer, qgoft.nn.Linear)


def test_adapter_names_runs_each_row_through_its_adapter():
    ids, mask = token_batch(batch=5)
    model = two_adapters()
    per_adapter = {}
    for name in ("default", "sst"):
        model.set_adapter(name)
        per_adapter[name] = model(ids, mask)
    model.set_adapter("default")
    with model.disable_adapter():
        base_rows = model(ids, mask)  # base layers, the active adapter's head
    names = ["sst", "default", "__base__", "sst", "default"]
    mixed = model(ids, mask, adapter_names=names)
    for row, name in enumerate(names):
        want = base_rows[row] if name == "__base__" else per_adapter[name][row]
        torch.testing.assert_close(mixed[row], want, rtol=1e-5, atol=1e-6)
    # the forward is restored afterwards; gradients reach the adapters of the rows that used them
    assert "forward" not in vars(model.base_model.encoder.encoder.layer[0].attention.self.query)
    assert torch.equal(model(ids, mask), per_adapter["default"])
    for _, adapted in model.named_qgoft_layers():
        adapted.qgoft_adapters["sst"].requires_grad_(True)  # inactive adapters are frozen by default
    model(ids, mask, adapter_names=["sst"] * 5).sum().backward()
    layer = model.base_model.encoder.encoder.layer[0].attention.self.query
    assert layer.qgoft_adapters["sst"].givens_angles.grad is not None and layer.givens_blocks.grad is None
    with pytest.raises(ValueError, match="unknown adapters \\['nope'\\]"):
        model(ids, mask, adapter_names=["nope"] * 5)
    with pytest.raises(ValueError, match="first dimension must be the batch"):
        model(ids, mask, adapter_names=["sst"] * 4)
    assert "forward" not in vars(layer)
