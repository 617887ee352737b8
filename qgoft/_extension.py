"""Locating and loading the compiled part of qgoft.

Two binaries are built next to this file:

* ``libqgoft_ops.so``: the ops library. It registers ``torch.ops.qgoft.*`` (schemas and CPU kernels,
  CUDA kernels when built with them) and depends on libtorch only, so C++ programs can link it.
* ``_C``: a small pybind11 module that reports build information.

If they are missing or were built against another torch, importing qgoft warns once and every op falls
back to the pure-PyTorch reference in :mod:`qgoft.reference` (slow but correct).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
OPS_LIBRARY_NAME = "libqgoft_ops.so"

_loaded = False
_load_error: str | None = None
_C: Any = None


def ops_library_path() -> Path:
    """Path of the ops shared library (for ``torch.ops.load_library`` or linking from C++)."""
    return _PACKAGE_DIR / OPS_LIBRARY_NAME


def _torch_release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0' (the local tag does not change the C++ ABI we rely on)."""
    return version.split("+")[0]


def _load() -> None:
    global _loaded, _load_error, _C
    if os.environ.get("QGOFT_DISABLE_EXTENSION", "0") == "1":
        _load_error = "disabled by QGOFT_DISABLE_EXTENSION=1"
        return
    try:
        from . import _build_meta  # written by setup.py at build time
    except ImportError:
        _load_error = "qgoft was not built (no qgoft/_build_meta.py); install it with pip"
        return
    built_for = _torch_release(_build_meta.TORCH_VERSION)
    running = _torch_release(torch.__version__)
    if built_for != running:
        _load_error = (
            f"qgoft was built against torch {_build_meta.TORCH_VERSION} but torch {torch.__version__} "
            "is installed; rebuild qgoft (pip install --no-build-isolation .)"
        )
        return
    lib = ops_library_path()
    if not lib.exists():
        _load_error = f"compiled ops library not found at {lib}"
        return
    try:
        torch.ops.load_library(str(lib))
        from . import _C as c_module  # type: ignore[attr-defined]
    except (OSError, ImportError, RuntimeError) as exc:  # undefined symbols, ABI mismatch, ...
        _load_error = f"loading the compiled qgoft library failed: {exc}"
        return
    _C = c_module
    _loaded = True


_load()
if not _loaded:
    warnings.warn(
        f"qgoft: {_load_error}. Falling back to the pure-PyTorch reference implementation "
        "(correct but slow).",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    """True when the compiled ops are registered in ``torch.ops.qgoft``."""
    return _loaded


def extension_error() -> str | None:
    """Why the compiled ops are not in use (None when they are)."""
    return _load_error


def has_kernel(device_type: str) -> bool:
    """Whether the compiled ops have a kernel for ``device_type`` ('cpu', 'cuda')."""
    if not _loaded:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_C.cuda_compiled())
    return False


def build_info() -> dict[str, Any]:
    """Build and run-time information of the compiled library (or why it is not in use)."""
    from . import __version__

    info: dict[str, Any] = {
        "qgoft_version": __version__,
        "torch_version_running": torch.__version__,
        "extension_loaded": _loaded,
    }
    if not _loaded:
        info["extension_error"] = _load_error
        return info
    info.update(_C.build_info())
    info["ops_library"] = str(ops_library_path())
    return info
