"""Modules: drop-in adapted layers (``qgoft.nn.Linear``)."""

from .linear import METHODS, Linear

__all__ = ["Linear", "METHODS"]
