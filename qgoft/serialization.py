"""The saved adapter format (no pickle anywhere): a directory with two files.

``adapter_config.json``::

    {
      "adapter_type": "qgoft",
      "format_version": 1,
      "qgoft_version": "0.1.0",
      "base_model_class": "BertModel",                      # informational
      "config": {...QGoftConfig.to_dict()...},
      "layers": {"<path>": {"kind": "linear" | "conv1d", "in_features": d, "out_features": n,
                            "bias": true, "layout": {"name", "d", "num_layers", "num_pairs", "sha256"},
                            "parameters": {"givens_blocks": [P, 2, 2]}}, ...},
      "modules_to_save": {"<path>": {"<state key>": {"shape": [...], "dtype": "float32"}}, ...},
      "tensor_sha256": {"<tensor name>": "<hex>", ...}      # every tensor of the weights file
    }

``adapter_model.safetensors``: tensors ``"<layer path>.givens_angles|givens_scale|givens_blocks"`` (adapter
dtype, float32 by default) and ``"<module to save path>.<state key>"`` (their own dtype); header metadata
``{"format": "pt", "adapter_type": "qgoft", "format_version": "1"}``. Paths are relative to the base model.

``tensor_sha256[name]`` is the SHA-256 of ``"<dtype>:<shape>:"`` (e.g. ``"float32:[15, 2, 2]:"``) followed by the
tensor's raw little-endian bytes in row-major order: a modified or corrupted weights file whose header is still
consistent (flipped data bytes, swapped tensors) is refused.

Loading validates everything (files present and parseable, safetensors header consistent with the file size,
versions, config values, every tensor's presence, shape, dtype, finiteness and checksum, the base model's layers
and their shapes, layout fingerprints) before the first change to the model, so a failed load leaves the model
exactly as it was. Errors are ``FileNotFoundError`` (missing directory/file) or ``ValueError``, naming the
file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import os
import shutil
import struct
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import FORMAT_VERSION, QGoftConfig
from .model import (LayerSpec, is_known_kind, QGoftModel, adapter_parameter_shapes,
                    layout_fingerprint, plan_adaptation)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ADAPTER_TYPE", "save_adapter", "read_adapter", "SavedAdapter",
           "tensor_sha256"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_TYPE = "qgoft"

_SAFETENSORS_DTYPES: Dict[str, Tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_ADAPTER_PARAMETER_DTYPES = (torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_sha256(tensor: Tensor) -> str:
    """The checksum recorded for a saved tensor: SHA-256 of ``"<dtype>:<shape>:"`` and its raw bytes."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{_dtype_name(t.dtype)}:{list(t.shape)}:".encode("ascii"))
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------------------------------
# Saving.
# --------------------------------------------------------------------------------------------------

def _describe(model: QGoftModel, tensors: Dict[str, Tensor]) -> Dict[str, Any]:
    from . import __version__

    config = model.qgoft_config
    modules_to_save: Dict[str, Dict[str, Any]] = {}
    for path in model.modules_to_save_paths:
        entries = {}
        for key, value in model.base_model.get_submodule(path).state_dict().items():
            entries[key] = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
        modules_to_save[path] = entries
    return {
        "adapter_type": ADAPTER_TYPE,
        "format_version": FORMAT_VERSION,
        "qgoft_version": __version__,
        "base_model_class": type(model.base_model).__name__,
        "config": config.to_dict(),
        "layers": {spec.path: spec.describe(config.method) for spec in model.layer_specs()},
        "modules_to_save": modules_to_save,
        "tensor_sha256": {name: tensor_sha256(tensors[name]) for name in sorted(tensors)},
    }


def save_adapter(model: QGoftModel, save_directory: str) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of ``model`` into ``save_directory``.

    Each file is written to a temporary name and renamed, so an interrupted save never leaves a truncated
    file under the final name."""
    from safetensors.torch import save_file

    if os.path.isfile(save_directory):
        raise ValueError(f"save_pretrained: {save_directory!r} is a file, expected a directory")
    os.makedirs(save_directory, exist_ok=True)
    # Distinct contiguous CPU copies: safetensors refuses shared or non-contiguous storage.
    tensors = {key: value.detach().to("cpu", copy=True).contiguous()
               for key, value in model.get_adapter_state_dict().items()}
    description = _describe(model, tensors)
    metadata = {"format": "pt", "adapter_type": ADAPTER_TYPE, "format_version": str(FORMAT_VERSION)}

    weights_path = os.path.join(save_directory, WEIGHTS_NAME)
    config_path = os.path.join(save_directory, CONFIG_NAME)
    tmp_weights, tmp_config = weights_path + ".tmp", config_path + ".tmp"
    save_file(tensors, tmp_weights, metadata=metadata)
    with open(tmp_config, "w", encoding="utf-8") as handle:
        json.dump(description, handle, indent=2, sort_keys=False)
        handle.write("\n")
    shutil.copymode(tmp_config, tmp_weights)  # safetensors creates 0600 files; follow the umask like the JSON
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_config, config_path)


# --------------------------------------------------------------------------------------------------
# Reading and validating the files (no model involved).
# --------------------------------------------------------------------------------------------------

class SavedAdapter:
    """A parsed, validated adapter directory: ``config`` (QGoftConfig), ``layers`` (path -> description),
    ``modules_to_save`` (path -> {key: {"shape", "dtype"}}), ``tensors`` (name -> CPU tensor)."""

    def __init__(self, directory: str, config: QGoftConfig, layers: Dict[str, Dict[str, Any]],
                 modules_to_save: Dict[str, Dict[str, Any]], tensors: Dict[str, Tensor],
                 checksums: Optional[Dict[str, str]] = None) -> None:
        self.directory = directory
        self.config = config
        self.layers = layers
        self.modules_to_save = modules_to_save
        self.tensors = tensors
        self.checksums = checksums or {}


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{where}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)


def _read_config(directory: str) -> Tuple[QGoftConfig, Dict[str, Any], Dict[str, Any], Dict[str, str]]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"qgoft adapter config not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON file ({err})") from None
    _require(isinstance(data, dict), path, "expected a JSON object at the top level")
    _require(data.get("adapter_type") == ADAPTER_TYPE, path,
             f"adapter_type is {data.get('adapter_type')!r}, expected {ADAPTER_TYPE!r} (not a qgoft adapter)")
    version = data.get("format_version")
    _require(_is_int(version) and version == FORMAT_VERSION, path,
             f"adapter format version {version!r} is not supported; this qgoft reads format version "
             f"{FORMAT_VERSION} (the file was written by qgoft {data.get('qgoft_version', '?')})")
    try:
        config = QGoftConfig.from_dict(data.get("config"))
    except ValueError as err:
        raise ValueError(f"{path}: invalid 'config': {err}") from None

    layers = data.get("layers")
    _require(isinstance(layers, dict) and layers, path, "'layers' must be a non-empty object")
    for layer_path, desc in layers.items():
        where = f"{path}: layers[{layer_path!r}]"
        _require(isinstance(desc, dict), where, "expected an object")
        _require(is_known_kind(desc.get("kind")), where, f"unknown kind {desc.get('kind')!r}")
        _require(_is_int(desc.get("in_features")) and desc["in_features"] >= 2, where,
                 "in_features must be an integer >= 2")
        _require(_is_int(desc.get("out_features")) and desc["out_features"] >= 0, where,
                 "out_features must be an integer >= 0 (0: a custom module that does not say)")
        _require(isinstance(desc.get("bias"), bool), where, "bias must be true or false")
        layout = desc.get("layout")
        _require(isinstance(layout, dict) and _is_int(layout.get("num_pairs"))
                 and isinstance(layout.get("sha256"), str), where, "layout must have num_pairs and sha256")
        params = desc.get("parameters")
        expected = adapter_parameter_shapes(config.method, layout["num_pairs"], desc["in_features"])
        _require(params == expected, where,
                 f"parameters {params!r} do not match method {config.method!r} (expected {expected!r})")

    modules_to_save = data.get("modules_to_save", {})
    _require(isinstance(modules_to_save, dict), path, "'modules_to_save' must be an object")
    for module_path, entries in modules_to_save.items():
        where = f"{path}: modules_to_save[{module_path!r}]"
        _require(isinstance(entries, dict), where, "expected an object")
        for key, entry in entries.items():
            _require(isinstance(entry, dict) and _is_shape(entry.get("shape"))
                     and isinstance(entry.get("dtype"), str), where, f"bad entry for {key!r}")
    checksums = data.get("tensor_sha256")
    _require(isinstance(checksums, dict), path,
             "'tensor_sha256' (the checksum of every saved tensor) is missing or not an object; the file was "
             "modified or not written by this qgoft, so the weights cannot be verified")
    for name, value in checksums.items():
        _require(isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None, path,
                 f"tensor_sha256[{name!r}] is not a SHA-256 hex digest: {value!r}")
    return config, layers, modules_to_save, checksums


def _validate_safetensors_header(path: str) -> Dict[str, Any]:
    """Parse and check the safetensors header against the file size; returns the header dict."""
    size = os.path.getsize(path)
    _require(size >= 8, path, f"file is truncated ({size} bytes; a safetensors file has an 8-byte header "
                              "length first)")
    with open(path, "rb") as handle:
        head = handle.read(8)
        _require(not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"), path,
                 "this is a pickle / torch.save file, not safetensors; qgoft adapter weights are safetensors "
                 "only and pickles are never loaded")
        (header_len,) = struct.unpack("<Q", head)
        _require(0 < header_len <= min(_MAX_HEADER_BYTES, size - 8), path,
                 f"corrupt or truncated safetensors file (header length {header_len}, file size {size})")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt safetensors header ({err})") from None
    _require(isinstance(header, dict), path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    _require(isinstance(metadata, dict), path, "corrupt safetensors header (__metadata__ is not an object)")
    data_len = size - 8 - header_len
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        _require(isinstance(info, dict), where, "corrupt header entry")
        _require(info.get("dtype") in _SAFETENSORS_DTYPES, where, f"unsupported dtype {info.get('dtype')!r}")
        _require(_is_shape(info.get("shape")), where, f"bad shape {info.get('shape')!r}")
        offsets = info.get("data_offsets")
        _require(isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets), where,
                 f"bad data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(info["shape"]) * _SAFETENSORS_DTYPES[info["dtype"]][1]
        _require(0 <= begin <= end and end - begin == nbytes, where,
                 f"data_offsets {offsets} do not fit shape {info['shape']} of dtype {info['dtype']}")
        _require(end <= data_len, where, f"data ends at byte {end} but the file holds only {data_len} data "
                                         "bytes (truncated file)")
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        _require(begin == position, path, "corrupt safetensors file (tensor data overlaps or has gaps)")
        position = end
    _require(position == data_len, path,
             f"corrupt safetensors file ({data_len - position} unexpected trailing bytes)")
    return {"tensors": header, "metadata": metadata}


def _read_tensors(directory: str) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"qgoft adapter weights not found: {path}")
    header = _validate_safetensors_header(path)
    metadata = header["metadata"]
    _require(metadata.get("adapter_type", ADAPTER_TYPE) == ADAPTER_TYPE, path, "not a qgoft adapter file")
    version = metadata.get("format_version", str(FORMAT_VERSION))
    _require(version == str(FORMAT_VERSION), path,
             f"adapter format version {version!r} is not supported (expected {FORMAT_VERSION})")
    try:
        tensors = load_file(path, device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: cannot read safetensors file ({type(err).__name__}: {err})") from None
    # Materialize (no mmap-backed tensors outlive this call).
    return {name: tensor.clone() for name, tensor in tensors.items()}


def read_adapter(directory: str) -> SavedAdapter:
    """Read and validate a saved adapter directory (both files, their mutual consistency). No model needed."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"qgoft adapter directory not found: {directory}")
    config, layers, modules_to_save, checksums = _read_config(directory)
    tensors = _read_tensors(directory)
    weights_path = os.path.join(directory, WEIGHTS_NAME)

    expected: Dict[str, Tuple[List[int], Optional[str]]] = {}
    for layer_path, desc in layers.items():
        for name, shape in desc["parameters"].items():
            expected[f"{layer_path}.{name}"] = (shape, None)
    for module_path, entries in modules_to_save.items():
        for key, entry in entries.items():
            expected[f"{module_path}.{key}"] = (entry["shape"], entry["dtype"])
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    _require(not missing, weights_path, f"missing tensors {missing[:10]} (described in {CONFIG_NAME})")
    _require(not unexpected, weights_path, f"unexpected tensors {unexpected[:10]} (not in {CONFIG_NAME})")
    for name, (shape, dtype) in expected.items():
        tensor = tensors[name]
        where = f"{weights_path}: tensor {name!r}"
        _require(list(tensor.shape) == shape, where, f"shape {list(tensor.shape)} != expected {shape}")
        if dtype is None:
            _require(tensor.dtype in _ADAPTER_PARAMETER_DTYPES, where,
                     f"adapter parameters must be float32 or float64, got {tensor.dtype}")
            _require(bool(torch.isfinite(tensor).all()), where, "contains NaN or infinite values")
        else:
            _require(_dtype_name(tensor.dtype) == dtype, where,
                     f"dtype {_dtype_name(tensor.dtype)} != {dtype} recorded in {CONFIG_NAME}")
    # Last, so that the checks above report the specific problem of a damaged file.
    config_path = os.path.join(directory, CONFIG_NAME)
    _require(sorted(checksums) == sorted(expected), config_path,
             f"tensor_sha256 names {sorted(checksums)[:10]} do not match the tensors {sorted(expected)[:10]}")
    for name in sorted(expected):
        _require(tensor_sha256(tensors[name]) == checksums[name], f"{weights_path}: tensor {name!r}",
                 f"its data does not match the SHA-256 recorded in {CONFIG_NAME} (the weights file was modified "
                 "or corrupted)")
    return SavedAdapter(directory, config, layers, modules_to_save, tensors, checksums)


# --------------------------------------------------------------------------------------------------
# Checking a saved adapter against a model, then loading.
# --------------------------------------------------------------------------------------------------

def _check_layers(saved: SavedAdapter, specs: List[LayerSpec], what: str) -> None:
    where = os.path.join(saved.directory, CONFIG_NAME)
    by_path = {spec.path: spec for spec in specs}
    missing = sorted(set(saved.layers) - set(by_path))
    extra = sorted(set(by_path) - set(saved.layers))
    _require(not missing and not extra, where,
             f"the adapter does not fit {what}: adapter layers absent from it {missing[:8]}, its targeted "
             f"layers absent from the adapter {extra[:8]}")
    for path, desc in saved.layers.items():
        spec = by_path[path]
        got = {"kind": spec.kind, "in_features": spec.in_features, "out_features": spec.out_features,
               "bias": spec.bias}
        want = {key: desc[key] for key in got}
        _require(got == want, where, f"layer {path!r} of {what} is {got}, the adapter was saved for {want}")
        _require(layout_fingerprint(spec.layout) == desc["layout"]["sha256"], where,
                 f"layer {path!r}: layout {spec.layout!r} differs from the saved one {desc['layout']}")


def _check_modules_to_save(saved: SavedAdapter, model: nn.Module, paths: List[str], what: str) -> None:
    where = os.path.join(saved.directory, CONFIG_NAME)
    _require(sorted(paths) == sorted(saved.modules_to_save), where,
             f"modules to save of {what} are {sorted(paths)}, the adapter has {sorted(saved.modules_to_save)}")
    for path in paths:
        state = model.get_submodule(path).state_dict()
        entries = saved.modules_to_save[path]
        _require(sorted(state) == sorted(entries), where,
                 f"module {path!r}: state keys {sorted(state)} != saved {sorted(entries)}")
        for key, value in state.items():
            tensor = saved.tensors[f"{path}.{key}"]
            _require(tuple(tensor.shape) == tuple(value.shape), where,
                     f"module {path!r}: {key} has shape {tuple(value.shape)} here, {tuple(tensor.shape)} saved")
            _require(tensor.dtype.is_floating_point == value.dtype.is_floating_point
                     and (tensor.dtype == torch.bool) == (value.dtype == torch.bool), where,
                     f"module {path!r}: {key} is {value.dtype} here, {tensor.dtype} saved")


@torch.no_grad()
def _copy_into(model: QGoftModel, saved: SavedAdapter) -> None:
    for path, layer in model.named_qgoft_layers():
        for name in saved.layers[path]["parameters"]:
            getattr(layer, name).copy_(saved.tensors[f"{path}.{name}"])
    for path in model.modules_to_save_paths:
        module = model.base_model.get_submodule(path)
        state = {key: saved.tensors[f"{path}.{key}"] for key in module.state_dict()}
        module.load_state_dict(state, strict=True)


def _set_trainable(model: QGoftModel, is_trainable: bool) -> None:
    for param in model.adapter_parameters():
        param.requires_grad_(is_trainable)
    for path in model.modules_to_save_paths:
        model.base_model.get_submodule(path).requires_grad_(is_trainable)
    if not is_trainable:
        model.eval()


def adapter_from_pretrained(cls: type, model: nn.Module, directory: str, *, is_trainable: bool) -> QGoftModel:
    """Implementation of :meth:`QGoftModel.from_pretrained` (validate everything, then adapt and load)."""
    if isinstance(model, QGoftModel):
        raise ValueError("from_pretrained expects a plain base model, got a QGoftModel (use load_adapter)")
    saved = read_adapter(directory)
    where = os.path.join(saved.directory, CONFIG_NAME)
    try:
        plan = plan_adaptation(model, saved.config)
    except ValueError as err:
        raise ValueError(f"{where}: the adapter does not fit {type(model).__name__}: {err}") from None
    _check_layers(saved, plan.layers, f"this {type(model).__name__}")
    _check_modules_to_save(saved, model, plan.modules_to_save, f"this {type(model).__name__}")
    # Everything is validated: from here on nothing can fail.
    adapted = cls(model, saved.config)
    _copy_into(adapted, saved)
    _set_trainable(adapted, is_trainable)
    return adapted


def load_adapter_into(model: QGoftModel, directory: str, *, is_trainable: bool) -> None:
    """Implementation of :meth:`QGoftModel.load_adapter`."""
    saved = read_adapter(directory)
    where = os.path.join(saved.directory, CONFIG_NAME)
    merged = [path for path, layer in model.named_qgoft_layers() if layer.merged]
    _require(not merged, where, f"cannot load into merged layers {merged[:4]}; call unmerge_adapter() first")
    methods = {layer.method for _, layer in model.named_qgoft_layers()}
    _require(methods == {saved.config.method}, where,
             f"the adapter's method is {saved.config.method!r}, this model's layers use {sorted(methods)}")
    _check_layers(saved, model.layer_specs(), "this QGoftModel")
    _check_modules_to_save(saved, model.base_model, model.modules_to_save_paths, "this QGoftModel")
    for path, layer in model.named_qgoft_layers():
        for name in saved.layers[path]["parameters"]:
            target = getattr(layer, name)
            _require(target is not None and target.dtype in _ADAPTER_PARAMETER_DTYPES, where,
                     f"layer {path!r} has no float adapter parameter {name!r}")
    _copy_into(model, saved)
    model.qgoft_config = saved.config
    _set_trainable(model, is_trainable)
