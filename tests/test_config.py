"""QGoftConfig: defaults, validation errors, dict/JSON round trip, module matching rules."""

import json
import math

import pytest
import torch

from qgoft import FORMAT_VERSION, QGoftConfig


def test_defaults_and_round_trip_through_json():
    config = QGoftConfig(target_modules=("query", "value"), modules_to_save=["classifier"])
    assert config.method == "qgoft" and config.layout == "parallel" and config.stack == 1
    assert config.target_modules == ["query", "value"]  # tuple normalized to list
    assert config.adapter_dtype == "float32" and config.torch_adapter_dtype == torch.float32
    assert config.format_version == FORMAT_VERSION == 2
    data = json.loads(json.dumps(config.to_dict()))
    assert set(data) == {"method", "layout", "stack", "target_modules", "exclude_modules", "modules_to_save",
                         "orthogonality_weight", "adapter_dtype", "custom_modules", "format_version"}
    again = QGoftConfig.from_dict(data)
    assert again == config
    assert again.to_dict() == config.to_dict()


def test_round_trip_of_regex_and_all_fields():
    config = QGoftConfig(method="goft_scaled", layout="Butterfly", stack=3, target_modules=r".*\.(query|key)",
                         exclude_modules=["layer.0.attention.self.key"], orthogonality_weight=0.05,
                         adapter_dtype="float64")
    assert config.layout == "butterfly"
    assert config.torch_adapter_dtype == torch.float64
    assert QGoftConfig.from_dict(config.to_dict()) == config
    changed = config.copy(method="goft", stack=1)
    assert changed.method == "goft" and changed.stack == 1 and config.method == "goft_scaled"


def test_to_dict_copies_lists():
    config = QGoftConfig(target_modules=["a"])
    config.to_dict()["target_modules"].append("b")
    assert config.target_modules == ["a"]


@pytest.mark.parametrize("changes, field", [
    (dict(method="lora"), "method"),
    (dict(method="GOFT"), "method"),
    (dict(layout="diagonal"), "layout"),
    (dict(layout=3), "layout"),
    (dict(stack=0), "stack"),
    (dict(stack=1.5), "stack"),
    (dict(stack=True), "stack"),
    (dict(target_modules=None), "target_modules"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=[""]), "target_modules"),
    (dict(target_modules=["query", 3]), "target_modules"),
    (dict(target_modules=""), "target_modules"),
    (dict(target_modules="(unclosed"), "regular expression"),
    (dict(target_modules=7), "target_modules"),
    (dict(exclude_modules="all-linear"), "exclude_modules"),
    (dict(modules_to_save="all-linear"), "modules_to_save"),
    (dict(modules_to_save=[""]), "modules_to_save"),
    (dict(orthogonality_weight=-0.1), "orthogonality_weight"),
    (dict(orthogonality_weight=math.nan), "orthogonality_weight"),
    (dict(orthogonality_weight=math.inf), "orthogonality_weight"),
    (dict(orthogonality_weight="0.1"), "orthogonality_weight"),
    (dict(orthogonality_weight=True), "orthogonality_weight"),
    (dict(adapter_dtype="bfloat16"), "adapter_dtype"),
    (dict(adapter_dtype=torch.float32), "adapter_dtype"),
    (dict(format_version=3), "format_version"),
    (dict(format_version=1), "format_version"),
])
def test_invalid_values_raise_naming_the_field(changes, field):
    kwargs = dict(target_modules=["query"])
    kwargs.update(changes)
    with pytest.raises(ValueError, match=field):
        QGoftConfig(**kwargs)


def test_validate_catches_later_mutation():
    config = QGoftConfig(target_modules=["query"])
    config.method = "oft"
    with pytest.raises(ValueError, match="method"):
        config.validate()


def test_from_dict_errors():
    good = QGoftConfig(target_modules=["query"]).to_dict()
    with pytest.raises(ValueError, match="mapping"):
        QGoftConfig.from_dict(["method", "qgoft"])
    with pytest.raises(ValueError, match="unknown keys.*'rank'"):
        QGoftConfig.from_dict({**good, "rank": 8})
    no_version = dict(good)
    del no_version["format_version"]
    with pytest.raises(ValueError, match="format_version"):
        QGoftConfig.from_dict(no_version)
    # A future file fails on its version first, even when its fields are unknown to this version.
    with pytest.raises(ValueError, match="format version 3 is not supported"):
        QGoftConfig.from_dict({**good, "format_version": 3, "method": "qgoft2", "new_field": 1})
    with pytest.raises(ValueError, match="format version"):
        QGoftConfig.from_dict({**good, "format_version": "1"})
    with pytest.raises(ValueError, match="method"):
        QGoftConfig.from_dict({**good, "method": "lora"})


def test_name_list_matches_path_suffixes_like_peft():
    config = QGoftConfig(target_modules=["query", "attention.output.dense"])
    assert config.matches_target("encoder.layer.0.attention.self.query")
    assert config.matches_target("query")
    assert not config.matches_target("encoder.layer.0.attention.self.myquery")
    assert not config.matches_target("encoder.layer.0.attention.self.query.inner_not_really")
    assert config.matches_target("encoder.layer.3.attention.output.dense")
    assert not config.matches_target("encoder.layer.3.output.dense")
    assert not config.matches_target("encoder.layer.3.xattention.output.dense")


def test_regex_is_full_match_on_the_whole_path():
    config = QGoftConfig(target_modules=r"encoder\.layer\.\d+\.attention\.self\.(query|value)",
                         exclude_modules=r".*layer\.1\..*")
    assert config.matches_target("encoder.layer.0.attention.self.query")
    assert config.matches_target("encoder.layer.11.attention.self.value")
    assert not config.matches_target("encoder.layer.0.attention.self.key")
    assert not config.matches_target("bert.encoder.layer.0.attention.self.query")  # full match, not search
    assert config.matches_exclude("encoder.layer.1.attention.self.query")
    assert not config.matches_exclude("encoder.layer.0.attention.self.query")
    # A plain word as a regex only matches a top-level module of that exact name.
    word = QGoftConfig(target_modules="query")
    assert word.matches_target("query") and not word.matches_target("self.query")


def test_all_linear_and_modules_to_save_matching():
    config = QGoftConfig(target_modules="all-linear", modules_to_save=["classifier"])
    assert config.matches_target("anything.at.all")
    assert config.matches_modules_to_save("head.classifier")
    assert not config.matches_modules_to_save("head.classifier_bias")
    assert not config.matches_exclude("anything")
