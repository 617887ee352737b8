"""Modules: drop-in adapted layers (``qgoft.nn.Linear``) and the adapter in front of any module whose input is
``(..., d)`` (``qgoft.nn.InputAdapter``: quantized linears, user-named modules)."""

from .input_adapter import InputAdapter
from .linear import METHODS, GivensAdapterMixin, Linear

__all__ = ["Linear", "InputAdapter", "GivensAdapterMixin", "METHODS"]
