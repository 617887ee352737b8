"""``qgoft.nn.Linear``: a frozen ``torch.nn.Linear`` adapted by a (quasi-)Givens chain.

Conventions (docs/MATH.md): the base weight ``W_lin`` has shape ``(n, d)`` (``d = in_features``). The
adapted layer computes ``y = W_lin (s * (R^T x)) + b`` input-centrically: the chain runs on the input rows
(``x' = x R S``) and the frozen linear on ``x'``. Merged, the base weight holds ``W_lin S R^T``.
"""

# No ``from __future__ import annotations`` here: TorchScript reads the class-level attribute annotations
# below as objects (it cannot resolve them from strings).
import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _extension
from .. import layouts as _layouts
from .. import ops as _ops
from ..methods import METHODS, check_adapter_dtype, check_method, parameter_shapes
from ..methods import PARAMETER_NAMES as ADAPTER_PARAMETER_NAMES
from ..reference import orthogonality_penalty_reference

__all__ = ["Linear", "METHODS", "GivensAdapterMixin", "AdapterSlot", "ADAPTER_PARAMETER_NAMES", "DEFAULT_ADAPTER",
           "check_adapter_name"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class GivensAdapterMixin:
    """The (quasi-)Givens adapter shared by :class:`Linear` and :class:`qgoft.nn.InputAdapter`: parameters,
    layout buffers, the chain ``x -> s * (R^T x)``, the regularizer and the half-precision cast guard.

    The host module sets ``in_features`` and calls :meth:`_init_adapter`; it owns ``forward`` and merging.
    """

    def _init_adapter(self, method: str, layout: _layouts.LayoutSpec, stack: int,
                      adapter_dtype: torch.dtype, device: torch.device) -> None:
        """Create the identity-initialized adapter of ``self.in_features`` features on ``device``."""
        check_method(method)
        check_adapter_dtype(adapter_dtype)
        if self.in_features < 2:
            raise ValueError(f"{type(self).__name__}: in_features = {self.in_features}, but a Givens adapter needs "
                             "d >= 2 features (a rotation mixes two of them)")
        self.method = method
        self.layout = _layouts.get_layout(layout, self.in_features, stack)
        self._merged = False
        self._adapters_enabled = True
        num_pairs = self.layout.num_pairs
        self.register_buffer("givens_pairs", self.layout.pairs_tensor().to(device, copy=True),
                             persistent=False)
        self.register_buffer("givens_layer_offsets", self.layout.layer_offsets_tensor().to(device, copy=True),
                             persistent=False)
        # Copy of the original base weight while merged (None otherwise).
        self.register_buffer("_unmerged_weight", None, persistent=False)
        for name in ADAPTER_PARAMETER_NAMES:
            self.register_parameter(name, None)
        for name, shape in parameter_shapes(method, num_pairs, self.in_features).items():
            param = torch.nn.Parameter(torch.empty(shape, device=device, dtype=adapter_dtype))
            self.register_parameter(name, param)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """Identity initialization: angles 0, scale 1, blocks I (paper App. B)."""
        with torch.no_grad():
            if self.givens_angles is not None:
                self.givens_angles.zero_()
            if self.givens_scale is not None:
                self.givens_scale.fill_(1.0)
            if self.givens_blocks is not None:
                self.givens_blocks.zero_()
                self.givens_blocks[:, 0, 0] = 1.0
                self.givens_blocks[:, 1, 1] = 1.0

    # ------------------------------------------------------------------------------------------------
    # Adapter state.
    # ------------------------------------------------------------------------------------------------

    def adapter_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The trainable adapter parameters (angles, scale, blocks; those the method uses)."""
        for name in ADAPTER_PARAMETER_NAMES:
            param = getattr(self, name)
            if param is not None:
                yield param

    @property
    def num_adapter_parameters(self) -> int:
        """Number of adapter scalars: ``P`` (goft), ``P + d`` (goft_scaled), ``4 P`` (qgoft)."""
        return sum(p.numel() for p in self.adapter_parameters())

    @property
    def merged(self) -> bool:
        """Whether the base weight currently holds the merged weight ``W_lin S R^T``."""
        return self._merged

    @property
    def adapters_enabled(self) -> bool:
        """Whether forward applies the adapter (see :meth:`disable_adapters`)."""
        return self._adapters_enabled

    def enable_adapters(self) -> None:
        """Apply the adapter in forward (the default)."""
        self._adapters_enabled = True

    def disable_adapters(self) -> None:
        """Make forward compute the base layer only (uses the kept original weight when merged)."""
        self._adapters_enabled = False

    # ------------------------------------------------------------------------------------------------
    # Named adapters: the active one is this module's own parameters and buffers (so forward is the same
    # code with one adapter or many); the others wait in ``qgoft_adapters`` (an nn.ModuleDict of
    # :class:`AdapterSlot`, created with the second adapter) and are swapped in by :meth:`set_adapter`.
    # ------------------------------------------------------------------------------------------------

    @property
    def active_adapter(self) -> str:
        """Name of the adapter forward applies (``"default"`` unless :meth:`set_adapter` chose another)."""
        return self.__dict__.get("_active_adapter", DEFAULT_ADAPTER)

    def adapter_names(self) -> List[str]:
        """The active adapter's name, then the others' in the order they were added."""
        slots = self._modules.get("qgoft_adapters")
        return [self.active_adapter] + (list(slots.keys()) if slots is not None else [])

    def add_adapter(self, name: str, method: str, layout: _layouts.LayoutSpec, stack: int = 1,
                    adapter_dtype: torch.dtype = torch.float32) -> None:
        """Add an identity-initialized adapter ``name`` (inactive; any method and layout) on this layer's device."""
        check_adapter_name(name)
        if name in self.adapter_names():
            raise ValueError(f"{type(self).__name__}: an adapter named {name!r} exists already")
        slot = AdapterSlot(self.in_features, method, layout, stack, adapter_dtype, self.givens_pairs.device)
        if "qgoft_adapters" not in self._modules:
            self.add_module("qgoft_adapters", torch.nn.ModuleDict())
        self.qgoft_adapters[name] = slot

    def set_adapter(self, name: str) -> None:
        """Make adapter ``name`` the active one (the previously active one waits in ``qgoft_adapters``)."""
        if name == self.active_adapter:
            return
        if name not in self.adapter_names():
            raise ValueError(f"{type(self).__name__}: no adapter named {name!r}; adapters: {self.adapter_names()}")
        if self._merged:
            raise RuntimeError(f"{type(self).__name__}.set_adapter({name!r}): the active adapter "
                               f"{self.active_adapter!r} is merged; unmerge it first")
        slot = self.qgoft_adapters[name]
        del self.qgoft_adapters[name]
        _swap_adapter_state(self, slot)
        self.qgoft_adapters[self.active_adapter] = slot
        self.__dict__["_active_adapter"] = name

    def delete_adapter(self, name: str) -> None:
        """Remove the inactive adapter ``name`` (the active one cannot be deleted)."""
        if name == self.active_adapter:
            raise ValueError(f"{type(self).__name__}: cannot delete the active adapter {name!r}; set_adapter() "
                             "another one first")
        if name not in self.adapter_names():
            raise ValueError(f"{type(self).__name__}: no adapter named {name!r}; adapters: {self.adapter_names()}")
        del self.qgoft_adapters[name]

    # ------------------------------------------------------------------------------------------------
    # Math.
    # ------------------------------------------------------------------------------------------------

    def _chain_params(self, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
        """(angles or blocks, scale or None), in float64 only when ``dtype`` is float64 (kernel contract:
        parameters are float32, or float64 with float64 activations)."""
        params = self.givens_blocks if self.method == "qgoft" else self.givens_angles
        assert params is not None, "qgoft.nn.Linear: the method's adapter parameter is missing"
        scale = self.givens_scale
        if dtype != torch.float64 and params.dtype == torch.float64:
            params = params.float()
            scale = scale.float() if scale is not None else None
        return params, scale

    def _chain(self, x: Tensor, with_scale: bool = True) -> Tensor:
        """Rows of ``x`` -> ``s * (R^T x)`` (without ``s`` if not ``with_scale``)."""
        params, scale = self._chain_params(x.dtype)
        if not with_scale:
            scale = None
        pairs, offsets = self.givens_pairs, self.givens_layer_offsets
        if torch.jit.is_scripting():
            # TorchScript: the compiled ops are TorchScript custom ops (no Python, so no reference fallback;
            # see __prepare_scriptable__). This static branch is the only one TorchScript compiles.
            if self.method == "qgoft":
                return torch.ops.qgoft.quasi_givens_chain(x, params, pairs, offsets, scale)
            return torch.ops.qgoft.givens_chain(x, params, pairs, offsets, scale)
        # Eager, tracing, torch.compile/export: the op layer picks the compiled op or the reference.
        if self.method == "qgoft":
            return _ops.quasi_givens_chain(x, params, pairs, offsets, scale)
        return _ops.givens_chain(x, params, pairs, offsets, scale)

    @torch.no_grad()
    def _adjoint_rows(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """``W S R^T`` for a dense base weight ``W`` ``(n, d)``: the adjoint chain on the rows of ``W``, computed
        and returned in ``dtype`` (float32 or float64); not differentiable."""
        params, scale = self._chain_params(dtype)
        pairs, offsets = self.givens_pairs, self.givens_layer_offsets
        rows = weight.detach().to(dtype)
        scale = None if scale is None else scale.detach()
        if self.method == "qgoft":
            return _ops.quasi_givens_chain_adjoint(rows, params.detach(), pairs, offsets, scale)
        return _ops.givens_chain_adjoint(rows, params.detach(), pairs, offsets, scale)

    def rotation_matrix(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense ``R = P_1 ... P_L`` (docs/MATH.md), ``(d, d)``, without the scale (chain applied to the
        identity's rows). ``dtype`` defaults to the adapter dtype. Differentiable; for inspection only."""
        dtype = dtype or self._adapter_dtype()
        eye = torch.eye(self.in_features, dtype=dtype, device=self.givens_pairs.device)
        return self._chain(eye, with_scale=False)

    def orthogonality_penalty(self) -> Tensor:
        """The qGOFT regularizer ``sum_p <alpha_p, beta_p>^2`` of this layer (differentiable scalar).

        Zero for ``"goft"``/``"goft_scaled"`` (their blocks are exactly orthogonal)."""
        if self.givens_blocks is None:
            return torch.zeros((), dtype=self._adapter_dtype(), device=self.givens_pairs.device)
        return orthogonality_penalty_reference(self.givens_blocks)

    def _adapter_repr(self, base: str) -> str:
        """``extra_repr`` text: ``base`` (what the host says about its base), then the adapter and its state."""
        text = (f"{base}, method={self.method!r}, layout={self.layout.name!r}, "
                f"adapter_parameters={self.num_adapter_parameters}")
        if self._merged:
            text += ", merged=True"
        if not self._adapters_enabled:
            text += ", adapters_enabled=False"
        return text

    def _adapter_dtype(self) -> torch.dtype:
        return next(self.adapter_parameters()).dtype

    # ------------------------------------------------------------------------------------------------
    # Module plumbing.
    # ------------------------------------------------------------------------------------------------

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> torch.nn.Module:
        """Like nn.Module._apply, but a float16/bfloat16 cast does not reach the adapter parameters (or their
        gradients): they keep their dtype and only follow the device (docs/MATH.md)."""
        protected: Dict[int, torch.dtype] = {}
        for param in self.adapter_parameters():
            protected[id(param)] = param.dtype
            if param.grad is not None:
                protected[id(param.grad)] = param.grad.dtype

        def keep_adapter_dtype(tensor: Tensor) -> Tensor:
            applied = fn(tensor)
            if (id(tensor) in protected and isinstance(applied, Tensor)
                    and applied.dtype in _LOW_PRECISION and protected[id(tensor)] not in _LOW_PRECISION):
                applied = tensor.detach().to(device=applied.device)
            return applied

        return super()._apply(keep_adapter_dtype, recurse)  # type: ignore[misc]


DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_adapter_name(name: Any) -> str:
    """An adapter name becomes a directory name and a module key: 1-64 characters of letters, digits, ``_``
    and ``-``, starting with a letter or digit (so no ``..``, ``/``, ``.`` or hidden names)."""
    if not isinstance(name, str) or _ADAPTER_NAME.fullmatch(name) is None:
        raise ValueError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a "
                         "letter or digit (it becomes a directory name)")
    return name


def _swap_adapter_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Exchange the adapter state (method, layout, parameters, layout buffers) of two adapter holders; the
    tensor objects move, nothing is copied."""
    for name in ADAPTER_PARAMETER_NAMES:
        a._parameters[name], b._parameters[name] = b._parameters[name], a._parameters[name]
    for name in ("givens_pairs", "givens_layer_offsets"):
        a._buffers[name], b._buffers[name] = b._buffers[name], a._buffers[name]
    for name in ("method", "layout"):
        first, second = a.__dict__[name], b.__dict__[name]
        a.__dict__[name], b.__dict__[name] = second, first


class AdapterSlot(GivensAdapterMixin, torch.nn.Module):
    """An inactive named adapter of a layer: its parameters and layout buffers (no forward)."""

    __jit_unused_properties__ = ["num_adapter_parameters", "active_adapter"]

    def __init__(self, in_features: int, method: str, layout: _layouts.LayoutSpec, stack: int,
                 adapter_dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.in_features = in_features
        self._init_adapter(method, layout, stack, adapter_dtype, device)

    def extra_repr(self) -> str:
        return self._adapter_repr(f"in_features={self.in_features}")


class Linear(GivensAdapterMixin, torch.nn.Linear):
    """A ``torch.nn.Linear`` with a frozen base and a trainable (quasi-)Givens adapter.

    Methods (docs/MATH.md), with ``P = layout.num_pairs`` (``d - 1`` for parallel/sequential):

    * ``"goft"``: strict rotations, ``givens_angles`` ``(P,)``.
    * ``"goft_scaled"`` (the paper's GOFT*): ``givens_angles`` ``(P,)`` and a per-feature ``givens_scale`` ``(d,)``.
    * ``"qgoft"``: free quasi-Givens blocks ``givens_blocks`` ``(P, 2, 2)`` = ``[[alpha1, beta1], [alpha2, beta2]]``.

    Parameters are identity-initialized (angles 0, scale 1, blocks I), stored in the canonical order of the
    layout, in ``adapter_dtype`` (float32 by default, whatever the base dtype) on the base weight's device.
    Module-wide casts to float16/bfloat16 (``.half()``, ``.to(torch.bfloat16)``) leave adapter parameters
    in their dtype; casts to other dtypes (e.g. float64) and device moves apply to them as usual.

    The base ``weight``/``bias`` are frozen (``requires_grad=False``). ``givens_pairs`` (int32 ``(P, 2)``) and
    ``givens_layer_offsets`` (int32 ``(L + 1,)``) are non-persistent buffers; ``self.layout`` is the Layout.

    Deployment (see :mod:`qgoft.export`): ``torch.jit.script`` (needs the compiled ops: the scripted forward
    calls ``torch.ops.qgoft.*``), ``torch.jit.trace``, ``torch.compile(fullgraph=True)``, ``torch.export`` and
    AOTInductor all work on unmerged and merged layers.
    """

    # Typed for TorchScript (an unused parameter is None; ``_unmerged_weight`` is None unless merged).
    givens_angles: Optional[Tensor]
    givens_scale: Optional[Tensor]
    givens_blocks: Optional[Tensor]
    givens_pairs: Tensor
    givens_layer_offsets: Tensor
    _unmerged_weight: Optional[Tensor]
    method: str
    _merged: bool
    _adapters_enabled: bool
    # Properties TorchScript must not compile (Python-only helpers).
    __jit_unused_properties__ = ["num_adapter_parameters", "active_adapter"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Optional[Union[torch.device, str]] = None, dtype: Optional[torch.dtype] = None, *,
                 method: str = "goft", layout: _layouts.LayoutSpec = "parallel", stack: int = 1,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._freeze_base()
        self._init_adapter(method, layout, stack, adapter_dtype, self.weight.device)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, method: str = "goft",
                    layout: _layouts.LayoutSpec = "parallel", stack: int = 1,
                    adapter_dtype: torch.dtype = torch.float32) -> "Linear":
        """Wrap ``linear``, sharing (not copying) its ``weight`` and ``bias`` parameters, which get frozen.

        The adapter parameters are created on ``linear.weight``'s device. The training mode is copied.
        """
        if isinstance(linear, Linear):
            raise TypeError("from_linear() got a qgoft.nn.Linear; it is already adapted")
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"from_linear() expects a torch.nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        # Build the nn.Linear skeleton on the meta device (no second weight is allocated), then share.
        torch.nn.Linear.__init__(self, linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 device="meta", dtype=linear.weight.dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self._freeze_base()
        self._init_adapter(method, layout, stack, adapter_dtype, self.weight.device)
        self.train(linear.training)
        return self

    # ------------------------------------------------------------------------------------------------
    # Construction helpers.
    # ------------------------------------------------------------------------------------------------

    def _freeze_base(self) -> None:
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------
    # Forward and merging.
    # ------------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """``y = W_lin (s * (R^T x)) + b`` for ``x`` of shape ``(..., in_features)``; base output if merged
        (the weight then already holds the adapter) or with adapters disabled."""
        self._check_input(x)
        if self._merged:
            weight = self.weight
            if not self._adapters_enabled:
                original = self._unmerged_weight
                assert original is not None, "qgoft.nn.Linear: merged without a kept original weight"
                weight = original
            return F.linear(x, weight, self.bias)
        if not self._adapters_enabled:
            return F.linear(x, self.weight, self.bias)
        return F.linear(self._chain(x), self.weight, self.bias)

    def _check_input(self, x: Tensor) -> None:
        """Clear errors for an input of the wrong width or device (instead of a matmul or kernel message)."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"qgoft.nn.Linear: x must have shape (..., in_features) = (..., {self.in_features}), "
                             f"got {x.shape}")
        if x.device != self.weight.device:
            raise ValueError(f"qgoft.nn.Linear: x must be on the device of the layer's weight "
                             f"({self.weight.device}), got {x.device}")

    def __prepare_scriptable__(self) -> "Linear":
        """Called by ``torch.jit.script``: scripted forward needs the compiled ``torch.ops.qgoft`` ops."""
        if not _extension.extension_loaded():
            raise RuntimeError(
                "torch.jit.script of a qgoft.nn.Linear needs the compiled qgoft ops, which are not loaded "
                f"({_extension.extension_error()}); build qgoft, or use torch.jit.trace (which records the "
                "pure-PyTorch reference's ops instead)")
        return self

    def _merge_compute_dtype(self) -> torch.dtype:
        wide = self.weight.dtype == torch.float64 or any(
            p.dtype == torch.float64 for p in self.adapter_parameters())
        return torch.float64 if wide else torch.float32

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """``W_lin S R^T`` of shape ``(out_features, in_features)`` from the original (unmerged) weight.

        Computed and returned in float32 (float64 when the weight or the adapter is float64); not
        differentiable. The adjoint chain runs on the rows of ``W_lin``.
        """
        base = self._unmerged_weight if self._merged else self.weight
        for name in ADAPTER_PARAMETER_NAMES:
            param = getattr(self, name)
            if param is not None and param.device != base.device:
                raise ValueError(f"qgoft.nn.Linear.merged_weight: {name} is on {param.device} but the base "
                                 f"weight is on {base.device}; move the whole module with .to(device)")
        return self._adjoint_rows(base, self._merge_compute_dtype())

    @torch.no_grad()
    def merge(self) -> None:
        """Write ``merged_weight()`` (cast to the weight dtype) into the base weight in place, keeping a copy
        of the original for :meth:`unmerge`. Warns and does nothing when already merged."""
        if self._merged:
            warnings.warn("qgoft.nn.Linear.merge(): already merged; nothing to do", UserWarning, stacklevel=2)
            return
        merged = self.merged_weight()
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.data.copy_(merged.to(self.weight.dtype))
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight bitwise. Warns and does nothing when not merged."""
        if not self._merged:
            warnings.warn("qgoft.nn.Linear.unmerge(): not merged; nothing to do", UserWarning, stacklevel=2)
            return
        self.weight.data.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self._merged = False

    def extra_repr(self) -> str:
        return self._adapter_repr(f"in_features={self.in_features}, out_features={self.out_features}, "
                                  f"bias={self.bias is not None}")
