"""Locating and loading the compiled part of qgoft (docs/BUILD.md).

Built next to this file:

* ``libqgoft_ops.so``: the ops library. It registers ``torch.ops.qgoft.*`` (schemas and CPU kernels) and is
  written against PyTorch's stable ABI, so it loads under every torch from ``TORCH_ABI_FLOOR`` (2.10) on,
  whichever torch it was compiled against; it depends on libtorch only, so C++ programs can link it.
* ``libqgoft_cuda.so`` (with a CUDA build of torch): the CUDA kernels. Their glue uses torch's
  version-specific C++ API, so it is loaded only under the torch release it was built against.
* ``_C``: a small pybind11 module that reports build information.
* ``_build_meta.py``: what they were built against (written by CMake).

If the ops library is missing, fails to load or the running torch is older than the floor, importing qgoft
warns once and every op falls back to the pure-PyTorch reference in :mod:`qgoft.reference` (slow but
correct); likewise CUDA tensors when only the CUDA library cannot be used.
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
_cuda_loaded = False
_cuda_error: str | None = None
_C: Any = None
_meta: Any = None


def ops_library_path() -> Path:
    """Path of the ops shared library (for ``torch.ops.load_library`` or linking from C++)."""
    return _PACKAGE_DIR / OPS_LIBRARY_NAME


def _release(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13): the local tag and the patch level do not change the C++ ABI."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def _load_cuda_library() -> None:
    global _cuda_loaded, _cuda_error
    name = getattr(_meta, "CUDA_LIBRARY", "")
    if not name:
        return
    if _release(_meta.TORCH_VERSION) != _release(torch.__version__):
        _cuda_error = (
            f"the CUDA kernels were built against torch {_meta.TORCH_VERSION} (their glue uses torch's "
            f"version-specific C++ API) but torch {torch.__version__} is installed; rebuild qgoft "
            "(pip install --no-build-isolation .)")
        return
    try:
        torch.ops.load_library(str(_PACKAGE_DIR / name))
    except (OSError, RuntimeError) as exc:
        _cuda_error = f"loading the CUDA kernels ({name}) failed: {exc}"
        return
    _cuda_loaded = True


def _load() -> None:
    global _loaded, _load_error, _C, _meta, _cuda_loaded
    if os.environ.get("QGOFT_DISABLE_EXTENSION", "0") == "1":
        _load_error = "disabled by QGOFT_DISABLE_EXTENSION=1"
        return
    try:
        from . import _build_meta  # written by CMake at build time
    except ImportError:
        _load_error = "qgoft was not built (no qgoft/_build_meta.py); install it with pip"
        return
    floor = getattr(_build_meta, "TORCH_ABI_FLOOR", None)
    if floor is None:  # binaries of a build before the stable ABI: tied to the torch release they were built for
        floor = _build_meta.TORCH_VERSION
        if _release(floor) != _release(torch.__version__):
            _load_error = (f"qgoft was built against torch {floor} but torch {torch.__version__} is installed; "
                           "rebuild qgoft (pip install .)")
            return
    if _release(torch.__version__) < _release(floor):
        _load_error = (f"qgoft's ops library needs torch >= {floor} (the stable ABI it uses), but torch "
                       f"{torch.__version__} is installed; pip install 'torch>={floor}'")
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
    _C, _meta = c_module, _build_meta
    _loaded = True
    if getattr(_build_meta, "TORCH_ABI_FLOOR", None) is None:  # pre-stable-ABI binaries: CUDA kernels inside
        _cuda_loaded = bool(c_module.build_info().get("cuda_compiled", False))
        return
    _load_cuda_library()


_load()
if not _loaded:
    warnings.warn(
        f"qgoft: {_load_error}. Falling back to the pure-PyTorch reference implementation "
        "(correct but slow).",
        RuntimeWarning,
        stacklevel=2,
    )
elif _cuda_error is not None and torch.cuda.is_available():
    warnings.warn(f"qgoft: {_cuda_error}. CUDA tensors use the pure-PyTorch reference implementation "
                  "(correct but slow).", RuntimeWarning, stacklevel=2)


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
        return _cuda_loaded
    return False


def build_info() -> dict[str, Any]:
    """Build and run-time information of the compiled library (or why it is not in use): among others
    ``abi`` (the ops library's: PyTorch's stable ABI, loading under torch >= ``torch_abi_floor``),
    ``torch_version_built`` (the torch it was compiled against), ``cuda_compiled`` / ``cuda_loaded``."""
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
    info["cuda_compiled"] = bool(getattr(_meta, "CUDA_LIBRARY", "")) or _cuda_loaded
    info["cuda_loaded"] = _cuda_loaded
    if info["cuda_compiled"]:
        info["cuda_abi"] = f"torch {_meta.TORCH_VERSION} only (version-specific C++ API)"
        info["torch_cuda_version_built"] = _meta.TORCH_CUDA_VERSION
        if _cuda_error is not None:
            info["cuda_error"] = _cuda_error
    info["ops_library"] = str(ops_library_path())
    return info
