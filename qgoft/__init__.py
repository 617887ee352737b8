"""qgoft: exact and fast (quasi-)Givens Orthogonal Fine-Tuning (GOFT / qGOFT) for PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _extension
from ._extension import build_info, extension_loaded, ops_library_path
from . import layouts, reference, ops, nn
from .config import FORMAT_VERSION, QGoftConfig
from .model import QGoftModel, get_qgoft_model
from . import serialization

__all__ = [
    "__version__",
    "build_info",
    "extension_loaded",
    "ops_library_path",
    "layouts",
    "reference",
    "ops",
    "nn",
    "QGoftConfig",
    "QGoftModel",
    "get_qgoft_model",
    "FORMAT_VERSION",
    "serialization",
]
