"""The saved adapter format: reading, validating and writing adapter directories (no model involved; building
and loading models is ``qgoft.model``'s job). No pickle anywhere. A directory with two files:

``adapter_config.json``::

    {
      "adapter_type": "qgoft",
      "format_version": 2,
      "qgoft_version": "0.1.0",
      "base_model_class": "BertModel",                      # informational
      "config": {...QGoftConfig.to_dict()...},
      "layers": {"<path>": {"kind": "linear" | "conv1d", "in_features": d, "out_features": n,
                            "bias": true, "layout": {"name", "d", "num_layers", "num_pairs", "sha256"},
                            "parameters": {"givens_blocks": [P, 2, 2]}}, ...},
      "modules_to_save": {"<path>": {"<state key>": {"shape": [...], "dtype": "float32"}}, ...},
      "tensor_sha256": {"<tensor name>": "<hex>", ...}      # every tensor of the weights file
    }

``adapter_model.safetensors``: tensors ``"<layer path>.givens_angles|givens_scale|givens_blocks"`` (float32 or
float64, see ``qgoft.methods``) and ``"<module to save path>.<state key>"`` (their own dtype); header metadata
``{"format": "pt", "adapter_type": "qgoft", "format_version": "2"}``. Paths are relative to the base model.

``tensor_sha256[name]`` is the SHA-256 of ``"<dtype>:<shape>:"`` (e.g. ``"float32:[15, 2, 2]:"``) followed by the
tensor's raw little-endian bytes in row-major order: a modified or corrupted weights file whose header is still
consistent (flipped data bytes, swapped tensors) is refused.

Format versions (``FORMAT_VERSION`` is the one written; every on-disk change bumps it):

* 1 -- the first format. Its early files have no ``tensor_sha256`` (the checksums were added without a
  version change). Loaded through :func:`migrate`, with a :class:`FormatMigrationWarning`; the files without
  checksums cannot be verified against corruption (save them again to upgrade).
* 2 -- ``tensor_sha256`` is required; saves replace the directory as a whole (below).

A newer version than ``FORMAT_VERSION`` is refused, naming both versions.

Saving (:func:`write_adapter`) is crash-safe: the new adapter is written into a sibling temporary directory
(``.<name>.qgoft-tmp-<pid>-<random>``), its files and the directory are fsynced, and it is then exchanged with
the existing directory in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). At every instant the path holds
the complete old or the complete new adapter, also across SIGKILL or power loss, and concurrent saves to one
path leave one complete adapter. Other entries of an existing directory (a tokenizer, a Trainer's checkpoint
folders) are carried over as hard links (copies where the filesystem refuses links). Limits: where
``RENAME_EXCHANGE`` is missing (not Linux, or filesystems such as some network ones) the swap is two renames,
and a crash between them leaves the complete old adapter at ``.<name>.qgoft-old-*``, which the next save puts
back and the next load reads; a file created inside the directory by another program during the save may be
lost; processes whose working directory is inside the directory keep the old (deleted) one (a shell
``cd``-ed into it sees it empty until it ``cd``-s again; the saving process itself follows to the new one).
Leftover temporaries of killed saves are removed by the next save and ignored by loads.

Loading validates everything before the first change to the model and before any allocation larger than the
adapter itself: both files are read from one directory (also during a concurrent save), their size is bounded
before parsing, the JSON of both is parsed strictly (UTF-8, no duplicate keys, no NaN literals, bounded
nesting), module paths are plain dotted names, the config's regular expressions must have a bounded matching
cost, the safetensors header must describe exactly the tensors of the config (names, shapes, dtypes, data
offsets tiling the file); only then are the tensor bytes read (``qgoft.model`` first checks the description
against the model), and every tensor is checked for finiteness and its checksum. Errors are
``FileNotFoundError`` (missing directory/file) or :class:`AdapterFormatError` (a ``ValueError``) naming the
file and the problem.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
import sys
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import torch
from torch import Tensor

from .config import FORMAT_VERSION, QGoftConfig
from .methods import ADAPTER_TORCH_DTYPES, parameter_shapes

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ADAPTER_TYPE", "FORMAT_VERSION", "FIRST_FORMAT_VERSION",
           "KIND_LINEAR", "KIND_CONV1D", "is_known_kind", "AdapterFormatError", "FormatMigrationWarning", "SavedAdapter",
           "AdapterFiles", "open_adapter", "read_adapter", "write_adapter", "migrate", "tensor_sha256"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_TYPE = "qgoft"
FIRST_FORMAT_VERSION = 1
KIND_LINEAR = "linear"
KIND_CONV1D = "conv1d"
# Kinds of the layers wrapped by qgoft.nn.InputAdapter: "<prefix>:<details>" (qgoft.nn.input_adapter.
# base_description), e.g. "torchao:Int8Tensor", "bitsandbytes:Linear4bit:nf4", "module:MyProjection".
WRAPPED_KIND_PREFIXES = ("torchao", "bitsandbytes", "module")
_WRAPPED_KIND = re.compile(r"(torchao|bitsandbytes|module):[A-Za-z_][A-Za-z0-9_]*(:[A-Za-z0-9_]+)?")

MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""Largest ``adapter_config.json`` read (a 500-layer model's config is well under 1 MiB)."""
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest safetensors JSON header read."""
MAX_JSON_DEPTH = 16
"""Deepest nesting of JSON objects/arrays accepted in either file (the format needs 5)."""
MAX_PATH_LENGTH = 1024
MAX_REGEX_LENGTH = 1000
MAX_REGEX_UNBOUNDED_REPEATS = 3
"""A saved regex selector may hold at most this many unbounded repeats (``*``, ``+``, ``{n,}``), none nested
and none around an alternation or back-reference: its matching cost is then polynomial of low degree in the
length of a module path, so a hostile config cannot hang the loader."""

_SAFETENSORS_DTYPES: Dict[str, Tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# One dotted module path component: no separators, no control characters, not empty (so no "..").
_PATH_COMPONENT = re.compile(r"[^./\\\x00-\x1f\x7f]+")


class AdapterFormatError(ValueError):
    """A saved adapter is damaged, hostile, of an unsupported format version, or does not fit the model.
    A ``ValueError``, so ``except ValueError`` keeps working; the message names the file and the problem."""


class FormatMigrationWarning(UserWarning):
    """An adapter of an earlier format version was loaded through :func:`migrate` (save it again to upgrade)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_sha256(tensor: Tensor) -> str:
    """The checksum recorded for a saved tensor: SHA-256 of ``"<dtype>:<shape>:"`` and its raw bytes."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{_dtype_name(t.dtype)}:{list(t.shape)}:".encode("ascii"))
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise AdapterFormatError(f"{where}: {message}")


def is_known_kind(kind: Any) -> bool:
    """Whether ``kind`` is a layer kind this qgoft writes (``"linear"``, ``"conv1d"`` or a wrapped base)."""
    return isinstance(kind, str) and (kind in (KIND_LINEAR, KIND_CONV1D) or
                                      (len(kind) <= 200 and _WRAPPED_KIND.fullmatch(kind) is not None))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return (isinstance(value, list) and len(value) <= 8
            and all(_is_int(v) and 0 <= v < 2 ** 48 for v in value))


def _check_module_path(path: Any, where: str, what: str) -> None:
    """A module path is dotted plain names: no '/', '\\', empty components ('..'), control characters."""
    _require(isinstance(path, str) and 0 < len(path) <= MAX_PATH_LENGTH
             and all(_PATH_COMPONENT.fullmatch(part) for part in path.split(".")), where,
             f"{what} {path!r} is not a module path (dotted names without '/', '\\', empty parts or control "
             "characters)")


# --------------------------------------------------------------------------------------------------
# Strict JSON.
# --------------------------------------------------------------------------------------------------

def _no_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _json_depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def _parse_json(raw: bytes, where: str, what: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity literals, nesting at most MAX_JSON_DEPTH.
    ``what`` starts the error message (e.g. "not a valid JSON file")."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except RecursionError:
        raise AdapterFormatError(f"{where}: {what} (nested deeper than {MAX_JSON_DEPTH} levels)") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError and int-size errors are ValueErrors
        raise AdapterFormatError(f"{where}: {what} ({err})") from None
    _require(_json_depth_ok(value), where, f"{what} (nested deeper than {MAX_JSON_DEPTH} levels)")
    return value


# --------------------------------------------------------------------------------------------------
# Format versions.
# --------------------------------------------------------------------------------------------------

def migrate(data: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Bring a parsed ``adapter_config.json`` of an earlier format version to ``FORMAT_VERSION`` (a new dict),
    warning with :class:`FormatMigrationWarning`. Refuses versions newer than ``FORMAT_VERSION``."""
    version = data.get("format_version")
    written_by = data.get("qgoft_version", "?")
    _require(_is_int(version) and FIRST_FORMAT_VERSION <= version <= FORMAT_VERSION, where,
             f"adapter format version {version!r} is not supported: this qgoft reads format versions "
             f"{FIRST_FORMAT_VERSION} to {FORMAT_VERSION}"
             + (f" (format version {version} is newer: the file was written by qgoft {written_by!s:.40}; "
                "upgrade qgoft to load it)" if _is_int(version) and version > FORMAT_VERSION else ""))
    if version == FORMAT_VERSION:
        return data
    data = dict(data)
    if version == 1:
        # 1 -> 2: checksums become required. Early version-1 files have none: accepted, unverifiable.
        detail = ("it has no tensor checksums, so its weights cannot be verified against corruption"
                  if "tensor_sha256" not in data else "its tensor checksums are verified")
        warnings.warn(f"{where}: adapter format version 1 (written by qgoft {written_by!s:.40}) migrated to "
                      f"format version {FORMAT_VERSION}; {detail}. Save it again to upgrade the file.",
                      FormatMigrationWarning, stacklevel=3)
        if "tensor_sha256" not in data:
            data["tensor_sha256"] = None
        config = data.get("config")
        if isinstance(config, dict) and config.get("format_version") == 1:
            data["config"] = dict(config, format_version=FORMAT_VERSION)
        data["format_version"] = FORMAT_VERSION
    return data


# --------------------------------------------------------------------------------------------------
# Untrusted regular expressions (selectors of a saved config).
# --------------------------------------------------------------------------------------------------

def _regex_cost_problem(pattern: str) -> Optional[str]:
    """Why matching ``pattern`` could take super-polynomial (or high-degree) time, or None."""
    if len(pattern) > MAX_REGEX_LENGTH:
        return f"longer than {MAX_REGEX_LENGTH} characters"
    try:
        from re import _constants as sre_constants, _parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_constants  # type: ignore[no-redef]
        import sre_parse  # type: ignore[no-redef]

    try:
        parsed = sre_parse.parse(pattern)
    except re.error as err:
        return f"not a valid regular expression ({err})"
    unbounded = 0
    repeats = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT,
               getattr(sre_constants, "POSSESSIVE_REPEAT", None))

    def walk(items: Any, inside_repeat: bool) -> Optional[str]:
        nonlocal unbounded
        for op, arg in items:
            if op in (sre_constants.GROUPREF, getattr(sre_constants, "GROUPREF_EXISTS", None)):
                return "uses a back-reference"
            if op in repeats and op is not None:
                low, high, body = arg
                is_unbounded = high > 1
                if is_unbounded:
                    if inside_repeat:
                        return "nests repeats"
                    unbounded += 1
                problem = walk(body, inside_repeat or is_unbounded)
                if problem:
                    return problem
            elif op is sre_constants.BRANCH:
                if inside_repeat:
                    return "repeats an alternation"
                for branch in arg[1]:
                    problem = walk(branch, inside_repeat)
                    if problem:
                        return problem
            elif op is sre_constants.SUBPATTERN:
                problem = walk(arg[-1], inside_repeat)
                if problem:
                    return problem
            elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
                problem = walk(arg[1], inside_repeat)
                if problem:
                    return problem
            elif op is getattr(sre_constants, "ATOMIC_GROUP", None):
                problem = walk(arg, inside_repeat)
                if problem:
                    return problem
        return None

    problem = walk(parsed, False)
    if problem is None and unbounded > MAX_REGEX_UNBOUNDED_REPEATS:
        problem = f"has {unbounded} unbounded repeats (at most {MAX_REGEX_UNBOUNDED_REPEATS})"
    return problem


def _check_saved_selectors(config: Dict[str, Any], where: str) -> None:
    for field in ("target_modules", "exclude_modules", "modules_to_save"):
        value = config.get(field)
        if isinstance(value, str) and value != "all-linear":
            problem = _regex_cost_problem(value)
            _require(problem is None, where,
                     f"config.{field} regex {value[:80]!r} {problem}; a saved regex must have a bounded matching "
                     "cost (use a list of module names instead)")


# --------------------------------------------------------------------------------------------------
# Validating the config and the safetensors header.
# --------------------------------------------------------------------------------------------------

class SavedAdapter:
    """A parsed, validated adapter: ``config`` (QGoftConfig), ``layers`` (path -> description),
    ``modules_to_save`` (path -> {key: {"shape", "dtype"}}), ``checksums`` (tensor name -> hex, or None for
    an early format-1 file without checksums), ``format_version`` (as found in the file), ``tensors`` (name ->
    CPU tensor, filled by :meth:`AdapterFiles.read_tensors`)."""

    def __init__(self, directory: str, config: QGoftConfig, layers: Dict[str, Dict[str, Any]],
                 modules_to_save: Dict[str, Dict[str, Any]], checksums: Optional[Dict[str, str]],
                 format_version: int) -> None:
        self.directory = directory
        self.config = config
        self.layers = layers
        self.modules_to_save = modules_to_save
        self.checksums = checksums
        self.format_version = format_version
        self.tensors: Dict[str, Tensor] = {}

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, CONFIG_NAME)

    @property
    def weights_path(self) -> str:
        return os.path.join(self.directory, WEIGHTS_NAME)

    def expected_tensors(self) -> Dict[str, Tuple[List[int], Optional[str]]]:
        """Tensor name -> (shape, dtype name or None for an adapter parameter: float32 or float64)."""
        expected: Dict[str, Tuple[List[int], Optional[str]]] = {}
        for layer_path, desc in self.layers.items():
            for name, shape in desc["parameters"].items():
                expected[f"{layer_path}.{name}"] = (shape, None)
        for module_path, entries in self.modules_to_save.items():
            for key, entry in entries.items():
                expected[f"{module_path}.{key}"] = (entry["shape"], entry["dtype"])
        return expected


def _validate_config(data: Any, path: str, directory: str) -> SavedAdapter:
    _require(isinstance(data, dict), path, "expected a JSON object at the top level")
    _require(data.get("adapter_type") == ADAPTER_TYPE, path,
             f"adapter_type is {str(data.get('adapter_type'))[:40]!r}, expected {ADAPTER_TYPE!r} "
             "(not a qgoft adapter)")
    found_version = data.get("format_version")
    data = migrate(data, path)
    config_dict = data.get("config")
    _require(isinstance(config_dict, dict), path, "'config' must be an object")
    _check_saved_selectors(config_dict, path)
    try:
        config = QGoftConfig.from_dict(config_dict)
    except (ValueError, TypeError) as err:
        raise AdapterFormatError(f"{path}: invalid 'config': {err}") from None

    layers = data.get("layers")
    _require(isinstance(layers, dict) and layers, path, "'layers' must be a non-empty object")
    for layer_path, desc in layers.items():
        where = f"{path}: layers[{layer_path[:100]!r}]"
        _check_module_path(layer_path, path, "layer path")
        _require(isinstance(desc, dict), where, "expected an object")
        _require(is_known_kind(desc.get("kind")), where, f"unknown kind {str(desc.get('kind'))[:40]!r}")
        _require(_is_int(desc.get("in_features")) and 2 <= desc["in_features"] < 2 ** 31, where,
                 "in_features must be an integer >= 2")
        _require(_is_int(desc.get("out_features")) and 0 <= desc["out_features"] < 2 ** 31, where,
                 "out_features must be an integer >= 0 (0: a custom module that does not say)")
        _require(isinstance(desc.get("bias"), bool), where, "bias must be true or false")
        layout = desc.get("layout")
        _require(isinstance(layout, dict) and _is_int(layout.get("num_pairs")) and 0 <= layout["num_pairs"] < 2 ** 40
                 and isinstance(layout.get("sha256"), str), where, "layout must have num_pairs and sha256")
        # Each repeat of the layout has at least one pair: bounds the layouts a loader builds for this config
        # by the size of the file (whose tensors have num_pairs rows).
        _require(layout["num_pairs"] >= config.stack and layout["num_pairs"] % config.stack == 0, where,
                 f"layout num_pairs {layout['num_pairs']} does not fit stack={config.stack}")
        params = desc.get("parameters")
        expected = parameter_shapes(config.method, layout["num_pairs"], desc["in_features"])
        _require(params == expected, where,
                 f"parameters {str(params)[:200]} do not match method {config.method!r} (expected {expected!r})")

    modules_to_save = data.get("modules_to_save", {})
    _require(isinstance(modules_to_save, dict), path, "'modules_to_save' must be an object")
    for module_path, entries in modules_to_save.items():
        where = f"{path}: modules_to_save[{module_path[:100]!r}]"
        _check_module_path(module_path, path, "module to save")
        _require(isinstance(entries, dict), where, "expected an object")
        for key, entry in entries.items():
            _check_module_path(key, where, "state key")
            _require(isinstance(entry, dict) and _is_shape(entry.get("shape"))
                     and entry.get("dtype") in {_dtype_name(d) for d, _ in _SAFETENSORS_DTYPES.values()}, where,
                     f"bad entry for {key[:100]!r}")
        for layer_path in layers:
            _require(not _path_within(layer_path, module_path) and not _path_within(module_path, layer_path),
                     where, f"overlaps the adapted layer {layer_path[:100]!r}")

    checksums = data.get("tensor_sha256")
    if checksums is not None or found_version != 1:
        _require(isinstance(checksums, dict), path,
                 "'tensor_sha256' (the checksum of every saved tensor) is missing or not an object; the file was "
                 "modified or not written by this qgoft, so the weights cannot be verified")
        for name, value in checksums.items():
            _require(isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None, path,
                     f"tensor_sha256[{name[:100]!r}] is not a SHA-256 hex digest: {str(value)[:80]!r}")
    saved = SavedAdapter(directory, config, layers, modules_to_save, checksums, found_version)
    names = saved.expected_tensors()
    _require(len(names) == sum(len(d["parameters"]) for d in layers.values())
             + sum(len(e) for e in modules_to_save.values()), path, "two tensors of the adapter have the same name")
    if checksums is not None:
        _require(sorted(checksums) == sorted(names), path,
                 f"tensor_sha256 names {sorted(checksums)[:10]} do not match the tensors {sorted(names)[:10]}")
    return saved


def _path_within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".")


def _validate_header(raw: bytes, path: str, file_size: int, header_len: int,
                     saved: SavedAdapter) -> Dict[str, Tuple[torch.dtype, List[int], int, int]]:
    """Check the safetensors header against the file size and the config; name -> (dtype, shape, begin, end)."""
    header = _parse_json(raw, path, "corrupt safetensors header")
    _require(isinstance(header, dict), path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    _require(isinstance(metadata, dict), path, "corrupt safetensors header (__metadata__ is not an object)")
    _require(metadata.get("adapter_type", ADAPTER_TYPE) == ADAPTER_TYPE, path, "not a qgoft adapter file")
    version = metadata.get("format_version", str(saved.format_version))
    _require(version == str(saved.format_version), path,
             f"adapter format version {str(version)[:20]!r} is not supported here: {CONFIG_NAME} has format "
             f"version {saved.format_version} (the two files were not written together)")
    data_len = file_size - 8 - header_len
    spans = []
    entries: Dict[str, Tuple[torch.dtype, List[int], int, int]] = {}
    for name, info in header.items():
        where = f"{path}: tensor {name[:100]!r}"
        _require(isinstance(info, dict), where, "corrupt header entry")
        _require(isinstance(info.get("dtype"), str) and info["dtype"] in _SAFETENSORS_DTYPES, where,
                 f"unsupported dtype {str(info.get('dtype'))[:20]!r}")
        _require(_is_shape(info.get("shape")), where, f"bad shape {str(info.get('shape'))[:80]}")
        offsets = info.get("data_offsets")
        _require(isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets), where,
                 f"bad data_offsets {str(offsets)[:80]}")
        begin, end = offsets
        dtype, itemsize = _SAFETENSORS_DTYPES[info["dtype"]]
        nbytes = math.prod(info["shape"]) * itemsize
        _require(0 <= begin <= end and end - begin == nbytes, where,
                 f"data_offsets {offsets} do not fit shape {info['shape']} of dtype {info['dtype']}")
        _require(end <= data_len, where, f"data ends at byte {end} but the file holds only {data_len} data "
                                         "bytes (truncated file)")
        spans.append((begin, end))
        entries[name] = (dtype, info["shape"], begin, end)
    spans.sort()
    position = 0
    for begin, end in spans:
        _require(begin == position, path, "corrupt safetensors file (tensor data overlaps or has gaps)")
        position = end
    _require(position == data_len, path,
             f"corrupt safetensors file ({data_len - position} unexpected trailing bytes)")

    expected = saved.expected_tensors()
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    _require(not missing, path, f"missing tensors {missing[:10]} (described in {CONFIG_NAME})")
    _require(not unexpected, path, f"unexpected tensors {[n[:100] for n in unexpected[:10]]} (not in {CONFIG_NAME})")
    for name, (shape, dtype_name) in expected.items():
        dtype, got_shape = entries[name][:2]
        where = f"{path}: tensor {name!r}"
        _require(got_shape == shape, where, f"shape {got_shape} != expected {shape}")
        if dtype_name is None:
            _require(dtype in ADAPTER_TORCH_DTYPES, where,
                     f"adapter parameters must be float32 or float64, got {dtype}")
        else:
            _require(_dtype_name(dtype) == dtype_name, where,
                     f"dtype {_dtype_name(dtype)} != {dtype_name} recorded in {CONFIG_NAME}")
    return entries


# --------------------------------------------------------------------------------------------------
# Reading: one consistent snapshot of the directory.
# --------------------------------------------------------------------------------------------------

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.qgoft-(?P<kind>tmp|old|del)-(?P<pid>\d+)-[0-9a-f]{8}")


def _open_regular(name: str, dir_fd: int, path: str) -> int:
    """Open a regular file for reading (never blocks on a FIFO or device); FileNotFoundError if absent."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(name, flags, dir_fd=dir_fd) if dir_fd >= 0 else os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterFormatError(f"{path}: not a regular file")
    return fd


def _read_exactly(fd: int, size: int, offset: int, path: str) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            os.lseek(fd, offset + done, os.SEEK_SET)
            chunk = os.read(fd, size - done)
            got = len(chunk)
            view[done:done + got] = chunk
        if got == 0:
            raise AdapterFormatError(f"{path}: file is truncated (it shrank while being read)")
        done += got
    return buffer


def _previous_copy(directory: str) -> Optional[str]:
    """The complete old adapter an interrupted two-rename swap left beside a missing ``directory``."""
    parent, name = os.path.split(directory)
    try:
        entries = list(os.scandir(parent or "."))
    except OSError:
        return None
    olds = []
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match and match["name"] == name and match["kind"] == "old":
            try:
                olds.append((entry.stat(follow_symlinks=False).st_mtime, entry.path))
            except FileNotFoundError:
                continue  # put back or deleted meanwhile
    return max(olds)[1] if olds else None


class AdapterFiles:
    """An open adapter directory (context manager): ``saved`` (the validated :class:`SavedAdapter`, without
    tensor data yet) and :meth:`read_tensors`. Both files are opened from one directory snapshot, so a save
    swapping the directory meanwhile cannot mix two adapters. Use :func:`open_adapter`."""

    _ATTEMPTS = 5

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self._config_fd = self._weights_fd = -1
        for attempt in range(self._ATTEMPTS):
            if self._open(last=attempt == self._ATTEMPTS - 1):
                break
            time.sleep(0.001 * attempt)  # a concurrent save is between two steps: let it finish
        try:
            self._validate()
        except BaseException:
            self.close()
            raise

    def _open(self, last: bool) -> bool:
        """Open both files; False when the directory was swapped by a save meanwhile (try again)."""
        directory = self.directory
        if not os.path.isdir(directory):
            previous = _previous_copy(directory)
            if previous is None:
                if not last and os.path.isdir(directory):  # a two-rename save put the new one in place
                    return False
                raise FileNotFoundError(f"qgoft adapter directory not found: {directory}")
            warnings.warn(f"{directory} is missing (a save was interrupted between its two renames); reading the "
                          f"complete previous adapter left at {previous}", UserWarning, stacklevel=4)
            directory = previous
        use_dir_fd = os.open in os.supports_dir_fd
        try:
            dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if use_dir_fd else -1
        except FileNotFoundError:
            # Renamed away by a two-rename save since the check above (or the previous copy was removed
            # by the save that completed): look again.
            if not last:
                return False
            raise FileNotFoundError(f"qgoft adapter directory not found: {self.directory}") from None
        try:
            config_fd = weights_fd = -1
            try:
                config_fd = _open_regular(CONFIG_NAME, dir_fd, os.path.join(self.directory, CONFIG_NAME))
                weights_fd = _open_regular(WEIGHTS_NAME, dir_fd, os.path.join(self.directory, WEIGHTS_NAME))
            except FileNotFoundError:
                for fd in (config_fd, weights_fd):
                    if fd >= 0:
                        os.close(fd)
                if not last and dir_fd >= 0 and self._swapped(directory, dir_fd):
                    return False
                name = CONFIG_NAME if config_fd < 0 else WEIGHTS_NAME
                what = "config" if config_fd < 0 else "weights"
                raise FileNotFoundError(f"qgoft adapter {what} not found: "
                                        f"{os.path.join(self.directory, name)}") from None
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        self._config_fd, self._weights_fd = config_fd, weights_fd
        return True

    @staticmethod
    def _swapped(directory: str, dir_fd: int) -> bool:
        try:
            now = os.stat(directory)
        except FileNotFoundError:
            return True
        before = os.fstat(dir_fd)
        return (now.st_ino, now.st_dev) != (before.st_ino, before.st_dev)

    def _validate(self) -> None:
        path = os.path.join(self.directory, CONFIG_NAME)
        size = os.fstat(self._config_fd).st_size
        _require(size <= MAX_CONFIG_BYTES, path, f"{size} bytes is larger than the limit of {MAX_CONFIG_BYTES}")
        data = _parse_json(bytes(_read_exactly(self._config_fd, size, 0, path)), path, "not a valid JSON file")
        self.saved = _validate_config(data, path, self.directory)

        path = self.saved.weights_path
        size = os.fstat(self._weights_fd).st_size
        _require(size >= 8, path, f"file is truncated ({size} bytes; a safetensors file has an 8-byte header "
                                  "length first)")
        head = bytes(_read_exactly(self._weights_fd, 8, 0, path))
        (header_len,) = struct.unpack("<Q", head)
        plausible = 0 < header_len <= min(MAX_HEADER_BYTES, size - 8)
        # A zip (torch.save) or pickle (protocol 2-5) start, unless they happen to be a valid header length.
        _require(plausible or not (head.startswith(b"PK\x03\x04")
                                   or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))),
                 path, "this is a pickle / torch.save file, not safetensors; qgoft adapter weights are safetensors "
                       "only and pickles are never loaded")
        _require(plausible, path,
                 f"corrupt or truncated safetensors file (header length {header_len}, file size {size})")
        raw = bytes(_read_exactly(self._weights_fd, header_len, 8, path))
        self._data_offset = 8 + header_len
        self._entries = _validate_header(raw, path, size, header_len, self.saved)
        self.data_nbytes = size - self._data_offset

    def read_tensors(self) -> Dict[str, Tensor]:
        """Read the tensor data (exactly the bytes the validated header describes), check finiteness and
        checksums; returns and stores ``saved.tensors``."""
        path = self.saved.weights_path
        data = _read_exactly(self._weights_fd, self.data_nbytes, self._data_offset, path)
        tensors: Dict[str, Tensor] = {}
        for name, (dtype, shape, begin, end) in self._entries.items():
            if end == begin:
                tensor = torch.empty(shape, dtype=dtype)
            else:
                itemsize = torch.empty((), dtype=dtype).element_size()
                flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // itemsize, offset=begin)
                tensor = flat.reshape(shape).clone()
            if sys.byteorder != "little" and tensor.element_size() > 1:  # pragma: no cover
                tensor = tensor.view(torch.uint8).view(-1, tensor.element_size()).flip(-1).view(dtype).reshape(shape)
            tensors[name] = tensor
        del data
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                _require(bool(torch.isfinite(tensor).all()), f"{path}: tensor {name!r}",
                         "contains NaN or infinite values")
        checksums = self.saved.checksums
        if checksums is not None:
            for name in sorted(tensors):
                _require(tensor_sha256(tensors[name]) == checksums[name], f"{path}: tensor {name!r}",
                         f"its data does not match the SHA-256 recorded in {CONFIG_NAME} (the weights file was "
                         "modified or corrupted)")
        self.saved.tensors = tensors
        return tensors

    def close(self) -> None:
        for attr in ("_config_fd", "_weights_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> "AdapterFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_adapter(directory: str) -> AdapterFiles:
    """Open and validate an adapter directory (config, safetensors header, their consistency) without reading
    the tensor data; use as a context manager and call ``read_tensors()``."""
    return AdapterFiles(directory)


def read_adapter(directory: str) -> SavedAdapter:
    """Read and validate a saved adapter directory (both files, their mutual consistency). No model needed."""
    with open_adapter(directory) as files:
        files.read_tensors()
        return files.saved


# --------------------------------------------------------------------------------------------------
# Writing: a sibling directory, fsynced, swapped in atomically.
# --------------------------------------------------------------------------------------------------

def _load_renameat2() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
                         errno.EXDEV, errno.EPERM}


def _rename_exchange(a: str, b: str) -> None:
    """Atomically exchange the two paths (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    if _RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "renameat2(RENAME_EXCHANGE) is not available")
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


def _fsync_directory(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_file(path: str, payload: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _carry_over(target: str, destination: str, skip: Tuple[str, ...]) -> None:
    """Reproduce the entries of the adapter directory now at ``target`` (or, while a two-rename save is
    between its renames, of the complete previous one beside it) in ``destination``, except ``skip`` and names
    starting with one of them: hard links for files (copies where links fail), the same symlinks,
    recursively for directories; ``destination`` gets the source's permissions.

    The source is read through one directory descriptor, and the copy is redone when the source was replaced
    meanwhile (a concurrent save swapped it out and may be deleting it, so its listing can miss entries)."""
    for _ in range(100):
        source = target if os.path.isdir(target) else _previous_copy(target)
        if source is None:
            return  # nothing to carry over (a first save)
        try:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            continue  # moved meanwhile: look again
        try:
            os.chmod(destination, stat.S_IMODE(os.fstat(fd).st_mode))
            carried = _carry_entries(fd, destination, skip)
            try:
                now = os.stat(source)
            except FileNotFoundError:
                now = None
            before = os.fstat(fd)
        finally:
            os.close(fd)
        if now is not None and (now.st_ino, now.st_dev) == (before.st_ino, before.st_dev):
            return
        for path in carried:  # copied from a directory that was being replaced: start again
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    raise OSError(errno.EBUSY, f"could not copy the other files of {source}: too many concurrent saves")


def _carry_entries(source_fd: int, destination: str, skip: Tuple[str, ...]) -> List[str]:
    """One pass of :func:`_carry_over` over the directory open at ``source_fd``; returns what it created."""
    carried: List[str] = []
    with os.scandir(source_fd) as entries:
        listing = [(entry.name, entry.is_symlink(), entry.is_dir(follow_symlinks=False),
                    entry.is_file(follow_symlinks=False)) for entry in entries if not entry.name.startswith(skip)]
    for name, is_symlink, is_dir, is_file in listing:
        target = os.path.join(destination, name)
        try:
            if is_symlink:
                os.symlink(os.readlink(name, dir_fd=source_fd), target)
            elif is_dir:
                sub_fd = os.open(name, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0), dir_fd=source_fd)
                try:
                    os.mkdir(target)
                    carried.append(target)
                    _carry_entries(sub_fd, target, ())
                    stat_ = os.fstat(sub_fd)
                    os.chmod(target, stat.S_IMODE(stat_.st_mode))
                    os.utime(target, ns=(stat_.st_atime_ns, stat_.st_mtime_ns))
                finally:
                    os.close(sub_fd)
                continue
            elif is_file:
                try:
                    os.link(name, target, src_dir_fd=source_fd, follow_symlinks=False)
                except OSError as err:
                    if isinstance(err, FileNotFoundError):
                        raise
                    src_fd = os.open(name, os.O_RDONLY, dir_fd=source_fd)
                    try:
                        with os.fdopen(src_fd, "rb", closefd=False) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        stat_ = os.fstat(src_fd)
                        os.chmod(target, stat.S_IMODE(stat_.st_mode))
                        os.utime(target, ns=(stat_.st_atime_ns, stat_.st_mtime_ns))
                    finally:
                        os.close(src_fd)
            else:
                continue
            carried.append(target)
        except FileNotFoundError:
            continue  # removed meanwhile
    return carried


def _in_use(path: str, pid: int) -> bool:
    """Whether a leftover temporary may still belong to a running save (then it is left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return True
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live save holds its staging directory locked
            except OSError:
                return True
        age = time.time() - os.fstat(fd).st_mtime
    finally:
        os.close(fd)
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except OSError:
        alive = True
    return alive and pid != os.getpid() and age < 3600


def _clean_leftovers(parent: str, name: str, target: str) -> None:
    """Remove the temporaries of killed saves of ``target``; put back the old adapter an interrupted two-rename
    swap left when ``target`` is missing."""
    for entry in list(os.scandir(parent)):
        match = _LEFTOVER.fullmatch(entry.name)
        if not match or match["name"] != name:
            continue
        if match["kind"] == "old" and not os.path.lexists(target):
            try:
                os.rename(entry.path, target)
                continue
            except OSError:
                pass
        if not _in_use(entry.path, int(match["pid"])):
            _discard(entry.path, parent, name)


def _cwd_inside(target: str) -> Optional[str]:
    """The working directory relative to ``target`` when it is ``target`` or below it, else None."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        return None
    if cwd == target or cwd.startswith(target + os.sep):
        return os.path.relpath(cwd, target)
    return None


def _sibling(parent: str, name: str, kind: str) -> str:
    return os.path.join(parent, f".{name}.qgoft-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _discard(path: str, parent: str, name: str) -> None:
    """Delete a replaced adapter directory. It is first renamed to a ``del`` name, so that a deletion cut
    short by a crash never leaves a partial directory under an ``old`` name, where loads and the next save
    would take it for a complete previous adapter."""
    if _LEFTOVER.fullmatch(os.path.basename(path))["kind"] != "del":
        doomed = _sibling(parent, name, "del")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        path = doomed
    shutil.rmtree(path, ignore_errors=True)


def _swap_in(staging: str, target: str, parent: str, name: str) -> List[str]:
    """Put ``staging`` at ``target`` atomically; returns the paths now holding replaced content (to delete)."""
    garbage: List[str] = []
    exchange = _RENAMEAT2 is not None
    for _ in range(1000):
        if exchange:
            try:
                _rename_exchange(staging, target)
                return garbage + [staging]
            except FileNotFoundError:
                pass  # no target yet: a plain rename below
            except OSError as err:
                if err.errno not in _EXCHANGE_UNSUPPORTED:
                    raise
                exchange = False  # this filesystem cannot exchange: two renames from now on
                continue
        else:
            # Two renames; in between the old adapter stays complete at `old` (restored by the next save).
            old = _sibling(parent, name, "old")
            try:
                os.rename(target, old)
                garbage.append(old)
            except FileNotFoundError:
                pass
        try:
            os.rename(staging, target)  # target absent (or an empty directory): one atomic rename
            return garbage
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # otherwise another save put an adapter there meanwhile: replace it in turn
    raise OSError(errno.EBUSY, f"could not replace {target}: too many concurrent saves")


def write_adapter(directory: str, document: Dict[str, Any], tensors: Dict[str, Tensor]) -> None:
    """Write an adapter directory: ``document`` (``config``, ``layers``, ``modules_to_save``,
    ``base_model_class``) completed with the format fields and checksums as ``adapter_config.json``, and
    ``tensors`` (CPU, contiguous, no shared storage) as ``adapter_model.safetensors``. Crash-safe and
    atomic (see the module docstring). Raises ValueError when ``directory`` is a file."""
    from safetensors.torch import save as safetensors_bytes

    from . import __version__

    target = os.path.realpath(os.fspath(directory))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ValueError(f"save_pretrained: {os.fspath(directory)!r} is a file, expected a directory")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    full = {"adapter_type": ADAPTER_TYPE, "format_version": FORMAT_VERSION, "qgoft_version": __version__}
    full.update(document)
    full["tensor_sha256"] = {key: tensor_sha256(tensors[key]) for key in sorted(tensors)}
    config_bytes = (json.dumps(full, indent=2) + "\n").encode("utf-8")
    metadata = {"format": "pt", "adapter_type": ADAPTER_TYPE, "format_version": str(FORMAT_VERSION)}
    weights_bytes = safetensors_bytes(tensors, metadata=metadata)

    _clean_leftovers(parent, name, target)
    staging = _sibling(parent, name, "tmp")
    try:
        if os.path.ismount(target):
            raise OSError(errno.EBUSY, "a mount point cannot be swapped", target)
        os.mkdir(staging)
    except OSError as err:
        if not os.path.isdir(target):
            raise
        _write_in_place(target, {WEIGHTS_NAME: weights_bytes, CONFIG_NAME: config_bytes}, err)
        return
    lock_fd = os.open(staging, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    garbage = [staging]
    try:
        if fcntl is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write_file(os.path.join(staging, WEIGHTS_NAME), weights_bytes)
        _write_file(os.path.join(staging, CONFIG_NAME), config_bytes)
        # Not carried: the old files, leftovers of qgoft < format 2 ("<name>.tmp") and of killed in-place
        # saves (".<name>.qgoft-tmp-*").
        ours = (CONFIG_NAME, WEIGHTS_NAME)
        _carry_over(target, staging, ours + tuple(f".{n}.qgoft-tmp-" for n in ours))
        os.fsync(lock_fd)
        inside = _cwd_inside(target)
        garbage = _swap_in(staging, target, parent, name)
        if inside is not None:  # this process worked inside the replaced directory: follow it to the new one
            with contextlib.suppress(OSError):
                os.chdir(os.path.join(target, inside))
        _fsync_directory(parent)
    finally:
        os.close(lock_fd)
        for path in garbage:
            _discard(path, parent, name)


def _write_in_place(target: str, files: Dict[str, bytes], reason: OSError) -> None:
    """Fallback when no sibling directory can be swapped in (the directory is a mount point, or its parent is
    not writable): each file is written to a temporary name, fsynced and renamed over the old one, weights
    first. Not atomic as a pair: a crash between the two renames leaves the new weights beside the old config,
    whose checksums then refuse them (the load fails rather than mixing two adapters)."""
    warnings.warn(f"save_pretrained: cannot replace {target} as a whole ({reason.strerror or reason}); writing "
                  "its files one by one, so a crash during this save can leave an adapter that does not load",
                  UserWarning, stacklevel=4)
    for file_name, payload in files.items():
        temporary = os.path.join(target, f".{file_name}.qgoft-tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            _write_file(temporary, payload)
            os.replace(temporary, os.path.join(target, file_name))
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    _fsync_directory(target)


def iter_leftovers(directory: str) -> Iterator[str]:
    """Paths of the temporaries (``.<name>.qgoft-tmp-*`` / ``-old-*`` / ``-del-*``) of saves to ``directory``."""
    target = os.path.realpath(os.fspath(directory))
    parent, name = os.path.split(target)
    for entry in os.scandir(parent):
        match = _LEFTOVER.fullmatch(entry.name)
        if match and match["name"] == name:
            yield entry.path
