"""The adapter methods: which trainable parameters each has (names, shapes), and the allowed adapter dtypes.

The one table that ``qgoft.nn.Linear`` (which creates the parameters), ``QGoftConfig`` (which validates
``method`` / ``adapter_dtype``), ``qgoft.model`` (which collects adapter state) and ``qgoft.serialization``
(which checks saved tensors) read. With ``P = layout.num_pairs`` and ``d = in_features``:

* ``"goft"``: ``givens_angles`` ``(P,)`` (identity: angles 0);
* ``"goft_scaled"``: ``givens_angles`` ``(P,)`` and ``givens_scale`` ``(d,)`` (angles 0, scale 1);
* ``"qgoft"``: ``givens_blocks`` ``(P, 2, 2)`` (blocks ``I``).

Adapter parameters are float32 (default) or float64 (``ADAPTER_DTYPES``), whatever the base model's dtype.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

__all__ = ["METHODS", "PARAMETER_NAMES", "METHOD_PARAMETERS", "ADAPTER_DTYPES", "ADAPTER_TORCH_DTYPES",
           "QUASI_METHOD", "parameter_shapes", "check_method", "check_adapter_dtype"]

METHOD_PARAMETERS: Dict[str, Tuple[str, ...]] = {
    "goft": ("givens_angles",),
    "goft_scaled": ("givens_angles", "givens_scale"),
    "qgoft": ("givens_blocks",),
}
"""Method name -> names of its adapter parameters, in the order they are created and saved."""

METHODS: Tuple[str, ...] = tuple(METHOD_PARAMETERS)
"""The method names accepted by ``qgoft.nn.Linear`` and ``QGoftConfig``."""

QUASI_METHOD = "qgoft"
"""The method with free 2x2 blocks (``quasi_givens_chain``); the others use angles (``givens_chain``)."""

PARAMETER_NAMES: Tuple[str, ...] = ("givens_angles", "givens_scale", "givens_blocks")
"""Every adapter parameter name of any method (the attributes of ``qgoft.nn.Linear``)."""

ADAPTER_DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
"""Allowed adapter parameter dtypes, by the name ``QGoftConfig.adapter_dtype`` and saved files use."""

ADAPTER_TORCH_DTYPES: Tuple[torch.dtype, ...] = tuple(ADAPTER_DTYPES.values())


def check_method(method: object, what: str = "method") -> None:
    """Raise ValueError unless ``method`` is one of :data:`METHODS`."""
    if not isinstance(method, str) or method not in METHOD_PARAMETERS:
        raise ValueError(f"{what}: unknown method {method!r}; expected one of {METHODS}")


def check_adapter_dtype(dtype: torch.dtype) -> None:
    """Raise ValueError unless ``dtype`` is an allowed adapter dtype (float32 or float64)."""
    if dtype not in ADAPTER_TORCH_DTYPES:
        raise ValueError(f"adapter_dtype must be torch.float32 or torch.float64, got {dtype}")


def parameter_shapes(method: str, num_pairs: int, in_features: int) -> Dict[str, List[int]]:
    """Names and shapes of one layer's adapter parameters (``P = num_pairs``, ``d = in_features``)."""
    check_method(method)
    shapes = {"givens_angles": [num_pairs], "givens_scale": [in_features], "givens_blocks": [num_pairs, 2, 2]}
    return {name: shapes[name] for name in METHOD_PARAMETERS[method]}
