"""``QGoftConfig``: what to adapt in a model and how (the model-level counterpart of ``qgoft.nn.Linear``).

Familiar to HF PEFT users: ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` follow PEFT's
matching rules, and the config round-trips through a JSON-safe dict (``to_dict`` / ``from_dict``) that
``save_pretrained`` writes into ``adapter_config.json``.

Module matching (:meth:`QGoftConfig.matches_target` etc.), on a module's full dotted path such as
``"encoder.layer.0.attention.self.query"``:

* a list of names matches when the path equals a name or ends with ``"." + name``
  (``"query"`` and ``"self.query"`` both match the path above; ``"uery"`` does not);
* a string is a regular expression matched with ``re.fullmatch`` against the full path;
* ``target_modules="all-linear"`` targets every supported layer (``nn.Linear``, transformers' ``Conv1D``)
  except the model's output embedding layer (``get_output_embeddings()``, e.g. ``lm_head``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from .layouts import BUILTIN_LAYOUTS
from .methods import ADAPTER_DTYPES, check_method

__all__ = ["QGoftConfig", "FORMAT_VERSION", "ALL_LINEAR", "ModuleSelector"]

FORMAT_VERSION = 2
"""Version of the config dict and of the saved adapter format (``adapter_config.json`` +
``adapter_model.safetensors``; the history is in ``qgoft.serialization``). A config dict must have this
version: files of earlier versions are migrated by ``qgoft.serialization.migrate`` when loaded, newer ones
are refused."""

ALL_LINEAR = "all-linear"
"""Special ``target_modules`` value: every supported linear layer except the output embedding layer."""

ModuleSelector = Union[List[str], str]
"""A list of module names (suffix match on the dotted path) or a regex (``re.fullmatch`` on the full path)."""

def _normalize_selector(value: Any, what: str, *, allow_none: bool) -> Optional[ModuleSelector]:
    """Validate a selector; lists/tuples become lists of str, strings are compiled to check the regex."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{what} is required: a list of module names (e.g. ['query', 'value']), "
                         f"a regex string, or {ALL_LINEAR!r}")
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} must not be an empty string")
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{what}={value!r} is not a valid regular expression: {err}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{what} entries must be non-empty strings, got {name!r}")
        if not names and not allow_none:
            raise ValueError(f"{what} must not be empty")
        return names
    raise ValueError(f"{what} must be a list of module names or a regex string, got {type(value).__name__} "
                     f"{value!r}")


def _normalize_custom_modules(value: Any) -> Optional[Dict[str, Union[str, int]]]:
    """``{class name: width attribute name or int >= 2}`` (a copy), or None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"QGoftConfig.custom_modules must map module class names to an input width (an "
                         f"attribute name or an int), got {type(value).__name__}")
    out: Dict[str, Union[str, int]] = {}
    for name, width in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"QGoftConfig.custom_modules: {name!r} is not a class name")
        valid_int = isinstance(width, int) and not isinstance(width, bool) and width >= 2
        if not (valid_int or (isinstance(width, str) and width.isidentifier())):
            raise ValueError(f"QGoftConfig.custom_modules[{name!r}] must be the name of the module's input-width "
                             f"attribute or an int >= 2, got {width!r}")
        out[name] = width
    return out


def _selector_matches(selector: Optional[ModuleSelector], path: str) -> bool:
    if selector is None:
        return False
    if isinstance(selector, str):
        return re.fullmatch(selector, path) is not None
    return any(path == name or path.endswith("." + name) for name in selector)


@dataclass
class QGoftConfig:
    """Configuration of a (q)GOFT adapter over a whole model.

    Attributes:
        method: ``"goft"`` (strict Givens rotations, ``P`` angles per layer), ``"goft_scaled"`` (the paper's
            GOFT*: angles plus a per-feature scale, ``P + d``) or ``"qgoft"`` (quasi-Givens 2x2 blocks,
            ``4 P``). ``P = in_features - 1`` for the parallel and sequential layouts.
        layout: builtin layout name, ``"parallel"`` (paper default), ``"sequential"`` or ``"butterfly"``.
        stack: repeat the layout this many times (more parameters, more expressive), ``>= 1``.
        target_modules: which ``nn.Linear`` / ``Conv1D`` layers to adapt (list of names, regex, or
            ``"all-linear"``; see the module docstring). Required.
        exclude_modules: layers never adapted even if targeted (same forms, except ``"all-linear"``).
        modules_to_save: modules (e.g. ``["classifier"]``) kept fully trainable and saved in full by
            ``save_pretrained``; layers inside them are never adapted. Same matching as ``exclude_modules``.
        orthogonality_weight: ``lambda`` of the qGOFT soft-orthogonality penalty
            ``lambda * sum <alpha, beta>^2`` (``QGoftModel.orthogonality_penalty()``); the paper uses
            0.001 to 0.05. Irrelevant (the penalty is zero) for ``goft`` / ``goft_scaled``.
        adapter_dtype: ``"float32"`` (default, also for bf16/fp16 base models) or ``"float64"``.
        custom_modules: other module classes to adapt, by class name, with their input width: the name of an
            int attribute of the module (e.g. ``{"MyProjection": "in_dim"}``) or one int for every instance.
            Such a module must take its features in the last input dimension; it is wrapped by
            ``qgoft.nn.InputAdapter`` (``y = module(s * (R^T x))``) and refuses to merge.
        format_version: version of this dict / the saved adapter format (:data:`FORMAT_VERSION`).
    """

    method: str = "qgoft"
    layout: str = "parallel"
    stack: int = 1
    target_modules: Optional[ModuleSelector] = None
    exclude_modules: Optional[ModuleSelector] = None
    modules_to_save: Optional[ModuleSelector] = None
    orthogonality_weight: float = 0.01
    adapter_dtype: str = "float32"
    custom_modules: Optional[Dict[str, Union[str, int]]] = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (raises ValueError naming the field); normalizes tuples/sets to lists."""
        check_method(self.method, "QGoftConfig.method")
        if not isinstance(self.layout, str) or self.layout.lower() not in BUILTIN_LAYOUTS:
            raise ValueError(f"QGoftConfig.layout: unknown layout {self.layout!r}; expected one of "
                             f"{sorted(BUILTIN_LAYOUTS)}")
        self.layout = self.layout.lower()
        if isinstance(self.stack, bool) or not isinstance(self.stack, int) or self.stack < 1:
            raise ValueError(f"QGoftConfig.stack must be an integer >= 1, got {self.stack!r}")
        self.target_modules = _normalize_selector(self.target_modules, "QGoftConfig.target_modules",
                                                  allow_none=False)
        self.exclude_modules = _normalize_selector(self.exclude_modules, "QGoftConfig.exclude_modules",
                                                   allow_none=True)
        self.modules_to_save = _normalize_selector(self.modules_to_save, "QGoftConfig.modules_to_save",
                                                   allow_none=True)
        for name in ("exclude_modules", "modules_to_save"):
            if getattr(self, name) == ALL_LINEAR:
                raise ValueError(f"QGoftConfig.{name} does not accept {ALL_LINEAR!r} (only target_modules does)")
        weight = self.orthogonality_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise ValueError(f"QGoftConfig.orthogonality_weight must be a finite number >= 0, got {weight!r}")
        self.orthogonality_weight = float(weight)
        if not isinstance(self.adapter_dtype, str) or self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"QGoftConfig.adapter_dtype must be one of {sorted(ADAPTER_DTYPES)}, "
                             f"got {self.adapter_dtype!r}")
        self.custom_modules = _normalize_custom_modules(self.custom_modules)
        if isinstance(self.format_version, bool) or self.format_version != FORMAT_VERSION:
            raise ValueError(f"QGoftConfig.format_version {self.format_version!r} is not supported: this qgoft "
                             f"reads and writes format version {FORMAT_VERSION}")

    # ------------------------------------------------------------------------------------------------
    # Matching.
    # ------------------------------------------------------------------------------------------------

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        """``adapter_dtype`` as a ``torch.dtype``."""
        return ADAPTER_DTYPES[self.adapter_dtype]

    def matches_target(self, path: str) -> bool:
        """Whether ``target_modules`` selects the module at dotted ``path`` (``"all-linear"`` selects all;
        the caller restricts it to supported layers and drops the output embedding layer)."""
        if self.target_modules == ALL_LINEAR:
            return True
        return _selector_matches(self.target_modules, path)

    def matches_exclude(self, path: str) -> bool:
        """Whether ``exclude_modules`` selects the module at dotted ``path``."""
        return _selector_matches(self.exclude_modules, path)

    def matches_modules_to_save(self, path: str) -> bool:
        """Whether ``modules_to_save`` selects the module at dotted ``path``."""
        return _selector_matches(self.modules_to_save, path)

    # ------------------------------------------------------------------------------------------------
    # Serialization.
    # ------------------------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-safe dict of every field (lists copied)."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) \
                else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QGoftConfig":
        """Inverse of :meth:`to_dict`. Raises ValueError for unknown keys, another ``format_version``
        (checked first, so a newer file gives a version error rather than a field error) or invalid values."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a QGoftConfig dict must be a mapping, got {type(data).__name__}")
        version = data.get("format_version", None)
        if version is None:
            raise ValueError("QGoftConfig dict has no 'format_version'; not a qgoft adapter config")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise ValueError(f"adapter format version {version!r} is not supported: this qgoft reads format "
                             f"version {FORMAT_VERSION} (adapter files of earlier versions are migrated when "
                             "loaded)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QGoftConfig dict has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))

    def copy(self, **changes: Any) -> "QGoftConfig":
        """A validated copy with some fields replaced."""
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)
