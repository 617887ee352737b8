"""save_pretrained / from_pretrained / load_adapter: exact round trips, the on-disk format, and clear errors
that leave the model unchanged (missing, corrupt, truncated or tampered files -- data bytes, header, config --;
wrong shapes; other versions; unknown methods; pickle files, which are never unpickled)."""

import json
import os
import struct

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import qgoft  # noqa: E402
from qgoft import QGoftConfig, QGoftModel, get_qgoft_model  # noqa: E402
from qgoft.serialization import CONFIG_NAME, WEIGHTS_NAME, read_adapter, tensor_sha256  # noqa: E402
from tiny_models import Classifier, assert_same_snapshot, snapshot, tiny_gpt2, token_batch  # noqa: E402

METHODS = qgoft.methods.METHODS


# ------------------------------------------------------------------------------------------------
# Helpers (tiny_models builders give the same fresh base model for the same arguments).
# ------------------------------------------------------------------------------------------------

def trained(model, seed=1):
    """Give the adapters and the modules to save non-trivial values (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=g, dtype=param.dtype))
    return model


def config_for(method="qgoft", **kwargs):
    kwargs.setdefault("target_modules", "all-linear")
    kwargs.setdefault("modules_to_save", ["classifier"])
    return QGoftConfig(method=method, **kwargs)


def assert_unchanged(before, model):
    assert_same_snapshot(before, snapshot(model))


@pytest.fixture
def saved(tmp_path):
    """A trained qGOFT classifier saved to tmp_path/'adapter'; returns (directory, expected logits)."""
    model = trained(get_qgoft_model(Classifier(), config_for()))
    directory = tmp_path / "adapter"
    model.save_pretrained(directory)  # a pathlib.Path works as well as a str
    return directory, model(*token_batch())


# ------------------------------------------------------------------------------------------------
# Round trips.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_from_pretrained_on_a_fresh_base_reproduces_outputs_bitwise(tmp_path, method):
    model = trained(get_qgoft_model(Classifier(), config_for(method, orthogonality_weight=0.02)))
    expected = model(*token_batch())
    model.save_pretrained(str(tmp_path))
    loaded = QGoftModel.from_pretrained(Classifier(), str(tmp_path))
    assert torch.equal(loaded(*token_batch()), expected)
    assert loaded.qgoft_config == model.qgoft_config
    # Default is inference: frozen and in eval mode (like PEFT); is_trainable=True keeps them trainable.
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    trainable = QGoftModel.from_pretrained(Classifier(), str(tmp_path), is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    assert torch.equal(trainable(*token_batch()), expected)


def test_round_trip_float64_and_gpt2_conv1d(tmp_path):
    model = trained(get_qgoft_model(tiny_gpt2().double(), QGoftConfig(method="goft_scaled",
                                                                      target_modules=["c_attn", "c_fc"],
                                                                      adapter_dtype="float64")))
    ids, _ = token_batch()
    expected = model(ids).last_hidden_state
    model.save_pretrained(str(tmp_path))
    assert load_file(str(tmp_path / WEIGHTS_NAME))["h.0.attn.c_attn.givens_angles"].dtype == torch.float64
    loaded = QGoftModel.from_pretrained(tiny_gpt2().double(), str(tmp_path))
    assert torch.equal(loaded(ids).last_hidden_state, expected)
    assert loaded.layer_specs()[0].kind == "conv1d"


def test_load_adapter_into_an_adapted_model(saved):
    directory, expected = saved
    model = get_qgoft_model(Classifier(), config_for())
    assert not torch.equal(model(*token_batch()), expected)
    model.load_adapter(directory)
    assert torch.equal(model(*token_batch()), expected)
    assert model.get_nb_trainable_parameters()[0] > 0  # load_adapter keeps it trainable by default


def test_save_while_merged_or_disabled_writes_the_same_adapter(tmp_path):
    model = trained(get_qgoft_model(Classifier(), config_for()))
    model.save_pretrained(str(tmp_path / "a"))
    model.merge_adapter()
    model.disable_adapters()
    model.save_pretrained(str(tmp_path / "b"))
    model.save_pretrained(str(tmp_path / "b"))  # overwriting is fine
    assert (tmp_path / "a" / CONFIG_NAME).read_bytes() == (tmp_path / "b" / CONFIG_NAME).read_bytes()
    # (safetensors does not fix the order of the metadata keys, so compare the tensors.)
    a, b = load_file(str(tmp_path / "a" / WEIGHTS_NAME)), load_file(str(tmp_path / "b" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path / "b")) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary leftovers


def test_file_format_contents(saved):
    directory, _ = saved
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    meta = json.loads((directory / CONFIG_NAME).read_text())
    assert meta["adapter_type"] == "qgoft" and meta["format_version"] == qgoft.FORMAT_VERSION
    assert meta["qgoft_version"] == qgoft.__version__ and meta["base_model_class"] == "Classifier"
    assert meta["config"] == config_for().to_dict()
    layer = meta["layers"]["encoder.encoder.layer.0.intermediate.dense"]
    assert layer["kind"] == "linear" and (layer["in_features"], layer["out_features"]) == (16, 32)
    assert layer["layout"]["name"] == "parallel" and layer["layout"]["num_pairs"] == 15
    assert layer["parameters"] == {"givens_blocks": [15, 2, 2]}
    assert meta["modules_to_save"] == {"classifier": {"weight": {"shape": [2, 16], "dtype": "float32"},
                                                      "bias": {"shape": [2], "dtype": "float32"}}}
    raw = (directory / WEIGHTS_NAME).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"] == {"format": "pt", "adapter_type": "qgoft",
                                      "format_version": str(qgoft.FORMAT_VERSION)}
    tensors = load_file(str(directory / WEIGHTS_NAME))
    assert len(tensors) == 12 + 2 and all(t.dtype == torch.float32 for t in tensors.values())
    # Only adapter parameters and the head: 12 layers of 4 * 15 (d = 16) or 4 * 31 (d = 32) values.
    assert sum(t.numel() for t in tensors.values()) == 2 * (5 * 60 + 124) + 34
    assert len(raw) < 8 + header_len + 4 * (2 * (5 * 60 + 124) + 34) + 1
    for path in (directory / CONFIG_NAME, directory / WEIGHTS_NAME):
        assert not path.read_bytes().startswith(b"\x80")  # no pickle protocol header
    # Both files get the same permissions (safetensors alone would create the weights as 0600).
    assert os.stat(directory / WEIGHTS_NAME).st_mode & 0o777 == os.stat(directory / CONFIG_NAME).st_mode & 0o777
    assert read_adapter(str(directory)).config == config_for()


# ------------------------------------------------------------------------------------------------
# Errors: clear, and the model stays unchanged.
# ------------------------------------------------------------------------------------------------

def _rewrite_config(directory, edit):
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _rewrite_weights(directory, edit):
    path = str(directory / WEIGHTS_NAME)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt", "adapter_type": "qgoft",
                                       "format_version": str(qgoft.FORMAT_VERSION)})


def _set(data, keys, value):
    for key in keys[:-1]:
        data = data[key]
    data[keys[-1]] = value


QKEY = "encoder.encoder.layer.0.attention.self.query.givens_blocks"

CORRUPTIONS = {
    "missing config": (lambda d: os.remove(d / CONFIG_NAME), FileNotFoundError, "adapter_config.json"),
    "missing weights": (lambda d: os.remove(d / WEIGHTS_NAME), FileNotFoundError, "adapter_model.safetensors"),
    "config not json": (lambda d: (d / CONFIG_NAME).write_text("{not json"), ValueError, "not a valid JSON"),
    "config not an object": (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), ValueError, "JSON object"),
    "other adapter type": (lambda d: _rewrite_config(d, lambda c: _set(c, ["adapter_type"], "lora")),
                           ValueError, "not a qgoft adapter"),
    "newer format version": (lambda d: _rewrite_config(d, lambda c: _set(c, ["format_version"], 3)),
                             ValueError, "format version 3 is not supported: this qgoft reads format versions 1 to 2"),
    "config format version": (lambda d: _rewrite_config(d, lambda c: _set(c, ["config", "format_version"], 7)),
                              ValueError, "format version 7"),
    "unknown method": (lambda d: _rewrite_config(d, lambda c: _set(c, ["config", "method"], "lora")),
                       ValueError, "unknown method 'lora'"),
    "unknown config key": (lambda d: _rewrite_config(d, lambda c: _set(c, ["config", "rank"], 8)),
                           ValueError, "unknown keys"),
    "layer description": (lambda d: _rewrite_config(
        d, lambda c: _set(c, ["layers", "encoder.encoder.layer.0.attention.self.query", "parameters"],
                          {"givens_angles": [15]})), ValueError, "do not match method"),
    "layout fingerprint": (lambda d: _rewrite_config(
        d, lambda c: _set(c, ["layers", "encoder.encoder.layer.0.attention.self.query", "layout", "sha256"],
                          "0" * 64)), ValueError, "layout"),
    "truncated weights": (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-10]),
                          ValueError, "truncated"),
    "tiny weights file": (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x01\x02"), ValueError, "truncated"),
    "garbage weights": (lambda d: (d / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 20) + b"\xff" * 40),
                        ValueError, "corrupt safetensors header"),
    "trailing bytes": (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes() + b"\0" * 8),
                       ValueError, "trailing bytes"),
    "wrong tensor shape": (lambda d: _rewrite_weights(d, lambda t: t.__setitem__(QKEY, torch.zeros(14, 2, 2))),
                           ValueError, r"shape \[14, 2, 2\] != expected \[15, 2, 2\]"),
    "missing tensor": (lambda d: _rewrite_weights(d, lambda t: t.pop(QKEY)), ValueError, "missing tensors"),
    "extra tensor": (lambda d: _rewrite_weights(d, lambda t: t.__setitem__("extra.w", torch.zeros(2))),
                     ValueError, "unexpected tensors"),
    "non-finite values": (lambda d: _rewrite_weights(d, lambda t: t[QKEY].__setitem__((0, 0, 0), float("nan"))),
                          ValueError, "NaN"),
    "wrong head dtype": (lambda d: _rewrite_weights(d, lambda t: t.__setitem__("classifier.bias",
                                                                               t["classifier.bias"].double())),
                         ValueError, "dtype float64 != float32"),
    # Tampering that leaves a consistent safetensors file: only the checksums recorded in the config notice.
    "flipped data byte": (lambda d: _flip_data_byte(d, QKEY), ValueError,
                          rf"tensor '{QKEY}'.*does not match the SHA-256 recorded in adapter_config.json"),
    "swapped tensors in header": (lambda d: _swap_header_offsets(d, QKEY, QKEY.replace("query", "key")),
                                  ValueError, "does not match the SHA-256"),
    "rewritten values": (lambda d: _rewrite_weights(d, lambda t: t[QKEY].mul_(1.5)), ValueError,
                         "does not match the SHA-256"),
    "checksum removed": (lambda d: _rewrite_config(d, lambda c: c.pop("tensor_sha256")), ValueError,
                         "'tensor_sha256' .* is missing"),
    "checksum not hex": (lambda d: _rewrite_config(d, lambda c: _set(c, ["tensor_sha256", QKEY], "xyz")),
                         ValueError, "is not a SHA-256 hex digest"),
    "checksum names": (lambda d: _rewrite_config(d, lambda c: c["tensor_sha256"].pop(QKEY)), ValueError,
                       "tensor_sha256 names"),
    # Header tampering the header validation catches.
    "header length past the end": (lambda d: _patch_bytes(d, 0, struct.pack("<Q", 10 ** 9)), ValueError,
                                   "corrupt or truncated safetensors file"),
    "header not json": (lambda d: _patch_bytes(d, 8, b"#"), ValueError, "corrupt safetensors header"),
    "header dtype changed": (lambda d: _edit_header(d, lambda h: h[QKEY].__setitem__("dtype", "F16")),
                             ValueError, "do not fit shape"),
    "header shape changed": (lambda d: _edit_header(d, lambda h: h[QKEY].__setitem__("shape", [60])),
                             ValueError, r"shape \[60\] != expected \[15, 2, 2\]"),
    "header offsets overlap": (lambda d: _edit_header(d, lambda h: h[QKEY].__setitem__(
        "data_offsets", h[QKEY.replace("query", "key")]["data_offsets"])), ValueError, "overlaps or has gaps"),
    "header unknown dtype": (lambda d: _edit_header(d, lambda h: h[QKEY].__setitem__("dtype", "F128")),
                             ValueError, "unsupported dtype 'F128'"),
    # A truncation anywhere, not just at the end.
    "truncated in the header": (lambda d: _truncate(d, 40), ValueError, "truncated"),
    "truncated to the header": (lambda d: _truncate(d, 8 + _header_len(d)), ValueError, "truncated"),
    "empty weights file": (lambda d: _truncate(d, 0), ValueError, "truncated"),
    "truncated config": (lambda d: (d / CONFIG_NAME).write_bytes((d / CONFIG_NAME).read_bytes()[:100]),
                         ValueError, "not a valid JSON"),
    # The weights file is a pickle (torch.save) under the safetensors name: refused, never unpickled.
    "pickle as weights": (lambda d: _pickle_with_payload(d / WEIGHTS_NAME, d), ValueError,
                          "pickle / torch.save file, not safetensors"),
    "old-style pickle as weights": (lambda d: _pickle_with_payload(d / WEIGHTS_NAME, d, zip_format=False),
                                    ValueError, "pickle / torch.save file, not safetensors"),
    # Unknown method / layout / kind in the config.
    "unknown layout": (lambda d: _rewrite_config(d, lambda c: _set(c, ["config", "layout"], "zigzag")),
                       ValueError, "unknown layout 'zigzag'"),
    "unknown layer kind": (lambda d: _rewrite_config(
        d, lambda c: _set(c, ["layers", "encoder.encoder.layer.0.attention.self.query", "kind"], "conv2d")),
        ValueError, "unknown kind 'conv2d'"),
    "method of other shapes": (lambda d: _rewrite_config(d, lambda c: _set(c, ["config", "method"], "goft")),
                               ValueError, "do not match method 'goft'"),
}


def _header_len(directory):
    return struct.unpack("<Q", (directory / WEIGHTS_NAME).read_bytes()[:8])[0]


def _patch_bytes(directory, position, patch):
    raw = bytearray((directory / WEIGHTS_NAME).read_bytes())
    raw[position:position + len(patch)] = patch
    (directory / WEIGHTS_NAME).write_bytes(bytes(raw))


def _truncate(directory, size):
    (directory / WEIGHTS_NAME).write_bytes((directory / WEIGHTS_NAME).read_bytes()[:size])


def _edit_header(directory, edit):
    """Rewrite the safetensors JSON header (same data bytes)."""
    raw = (directory / WEIGHTS_NAME).read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (directory / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def _flip_data_byte(directory, name):
    """Flip one bit inside the tensor ``name``'s data: the file stays a valid safetensors file."""
    raw = (directory / WEIGHTS_NAME).read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    begin, _ = json.loads(raw[8:8 + length])[name]["data_offsets"]
    position = 8 + length + begin + 5  # inside the first float of the first block
    _patch_bytes(directory, position, bytes([raw[position] ^ 0x10]))


def _swap_header_offsets(directory, a, b):
    def swap(header):
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    _edit_header(directory, swap)


class _Payload:
    """Unpickling this creates the file ``marker``: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_with_payload(path, directory, zip_format=True):
    torch.save({"x": torch.zeros(2), "payload": _Payload(directory / "UNPICKLED")}, str(path),
               _use_new_zipfile_serialization=zip_format)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_adapter_gives_a_clear_error_and_leaves_the_model_unchanged(saved, case):
    directory, _ = saved
    corrupt, error, message = CORRUPTIONS[case]
    corrupt(directory)
    base = Classifier()
    before = snapshot(base)
    with pytest.raises(error, match=message):
        QGoftModel.from_pretrained(base, str(directory))
    assert_unchanged(before, base)
    adapted = trained(get_qgoft_model(Classifier(), config_for()), seed=5)
    before = snapshot(adapted)
    with pytest.raises(error, match=message):
        adapted.load_adapter(str(directory))
    assert_unchanged(before, adapted)


@pytest.mark.parametrize("zip_format", [True, False])
def test_damaged_files_never_unpickle_anything(saved, zip_format):
    directory, _ = saved
    _pickle_with_payload(directory / WEIGHTS_NAME, directory, zip_format)
    with pytest.raises(ValueError, match="pickles are never loaded"):
        QGoftModel.from_pretrained(Classifier(), str(directory))
    assert not (directory / "UNPICKLED").exists()
    _pickle_with_payload(directory / CONFIG_NAME, directory, zip_format)  # and a pickle as the config
    with pytest.raises(ValueError, match="not a valid JSON"):
        QGoftModel.from_pretrained(Classifier(), str(directory))
    assert not (directory / "UNPICKLED").exists()


def test_pickle_files_next_to_the_adapter_are_ignored(saved):
    """PEFT-style pickle files (adapter_model.bin / .pt) are never read: with the safetensors file present they
    are ignored; without it the load is refused naming the safetensors file."""
    directory, expected = saved
    for name in ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin"):
        _pickle_with_payload(directory / name, directory)
    loaded = QGoftModel.from_pretrained(Classifier(), str(directory))
    assert torch.equal(loaded(*token_batch()), expected)
    os.remove(directory / WEIGHTS_NAME)
    base = Classifier()
    before = snapshot(base)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        QGoftModel.from_pretrained(base, str(directory))
    assert_unchanged(before, base)
    assert not (directory / "UNPICKLED").exists()


def test_checksums_are_recorded_for_every_tensor(saved):
    directory, _ = saved
    meta = json.loads((directory / CONFIG_NAME).read_text())
    tensors = load_file(str(directory / WEIGHTS_NAME))
    assert sorted(meta["tensor_sha256"]) == sorted(tensors)
    assert all(meta["tensor_sha256"][k] == tensor_sha256(v) for k, v in tensors.items())
    # a value changed and changed back loads again (the checksum is of the content, not of the file)
    _rewrite_weights(directory, lambda t: t[QKEY].mul_(2.0))
    with pytest.raises(ValueError, match="SHA-256"):
        read_adapter(str(directory))
    _rewrite_weights(directory, lambda t: t[QKEY].div_(2.0))
    read_adapter(str(directory))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        QGoftModel.from_pretrained(Classifier(), str(tmp_path / "nope"))


@pytest.mark.parametrize("make_base, message", [
    (lambda: Classifier(hidden=24), "in_features"),   # other hidden size
    (lambda: Classifier(layers=1), "absent"),          # fewer blocks
    (lambda: Classifier(layers=3), "absent"),          # more blocks
    (lambda: tiny_gpt2(), "matches no module"),        # another architecture (no classifier to save)
])
def test_base_model_with_other_shapes_is_refused_unchanged(saved, make_base, message):
    directory, _ = saved
    base = make_base()
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        QGoftModel.from_pretrained(base, str(directory))
    assert_unchanged(before, base)


def test_load_adapter_into_an_incompatible_qgoft_model_is_refused_unchanged(saved):
    directory, _ = saved
    cases = [
        (get_qgoft_model(Classifier(), config_for("goft")), "method"),
        (get_qgoft_model(Classifier(), config_for(target_modules=["query"])), "absent"),
        (get_qgoft_model(Classifier(), config_for(stack=2)), "layout"),
        (get_qgoft_model(Classifier(), config_for(modules_to_save=None)), r"absent from the adapter \['classifier'\]"),
        (get_qgoft_model(Classifier(), config_for(modules_to_save=None, exclude_modules=["classifier"])),
         "modules to save"),
        (get_qgoft_model(Classifier(hidden=24), config_for()), "in_features"),
    ]
    for model, message in cases:
        before = snapshot(model)
        with pytest.raises(ValueError, match=message):
            model.load_adapter(str(directory))
        assert_unchanged(before, model)
    merged = trained(get_qgoft_model(Classifier(), config_for()))
    merged.merge_adapter()
    before = snapshot(merged)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        merged.load_adapter(str(directory))
    assert_unchanged(before, merged)


def test_from_pretrained_refuses_an_adapted_model(saved):
    directory, _ = saved
    with pytest.raises(ValueError, match="load_adapter"):
        QGoftModel.from_pretrained(get_qgoft_model(Classifier(), config_for()), str(directory))
