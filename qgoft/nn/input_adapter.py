"""``qgoft.nn.InputAdapter``: a (quasi-)Givens adapter in front of any module whose input is ``(..., d)``.

The transform is input-centric (docs/MATH.md): ``y = base(s * (R^T x))``. So the adapter needs nothing from the
base layer but its input width, and the base layer is called as it is: a torchao-quantized ``nn.Linear``
(weight-only int8 / int4 tensor subclasses), a bitsandbytes ``Linear8bitLt`` / ``Linear4bit``, or any module
the user names with its input width. The base is never copied, dequantized or modified in training.

Merging (``W <- W S R^T``) needs the base's weight as a dense matrix and a way back to its storage format.
:func:`base_requantizer` knows torchao's weight-only int8 (``Int8Tensor``) and intx (``IntxUnpackedToInt8Tensor``,
e.g. int4) tensors: it dequantizes, applies the adjoint chain, and requantizes with the same recipe, which is
checked first (requantizing the dequantized original must give a tensor of the same class and metadata, the
same zero-point pattern and values within one quantization step). Every other base
refuses to merge with a message saying why, and nothing is changed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import layouts as _layouts
from .linear import GivensAdapterMixin, Linear

__all__ = ["InputAdapter", "Requantizer", "base_requantizer", "base_description"]

# Rows of the fixed probe input on which merge() measures the merged forward against the unmerged one.
_PROBE_ROWS = 64


@dataclass(frozen=True)
class Requantizer:
    """How to merge into a quantized base weight: ``dequantize()`` gives the dense ``(n, d)`` weight,
    ``quantize(dense)`` a new weight tensor in the base's format (same recipe)."""

    dequantize: Callable[[], Tensor]
    quantize: Callable[[Tensor], Tensor]


def _torchao_class(weight: Tensor) -> Optional[str]:
    """The class name of a torchao tensor subclass, or None for any other tensor."""
    for cls in type(weight).__mro__:
        if cls.__module__.startswith("torchao.") and cls.__name__ == "TorchAOBaseTensor":
            return type(weight).__name__
    return None


def _is_bitsandbytes(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


def base_description(module: torch.nn.Module) -> str:
    """What the adapter sits on, as recorded in a saved adapter (``layers[path]["kind"]``): ``"torchao:<tensor
    class>[:<target dtype>]"``, ``"bitsandbytes:<module class>[:<quant type>]"`` or ``"module:<class>"``.
    Loading an adapter onto a base of another description is refused."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        name = _torchao_class(weight)
        if name is not None:
            target = getattr(weight, "target_dtype", None)
            return f"torchao:{name}" + (f":{str(target).replace('torch.', '')}" if target is not None else "")
    if _is_bitsandbytes(module):
        quant_type = getattr(getattr(weight, "quant_state", None), "quant_type", None) or getattr(
            weight, "quant_type", None)
        return f"bitsandbytes:{type(module).__name__}" + (f":{quant_type}" if quant_type else "")
    return f"module:{type(module).__name__}"


def _torchao_candidates(weight: Tensor) -> List[Callable[[Tensor], Tensor]]:
    """Ways to quantize a dense weight like ``weight`` (tried in order; the round trip picks one)."""
    name = type(weight).__name__
    if name == "Int8Tensor":
        from torchao.quantization.granularity import PerRow, PerTensor

        block = list(weight.block_size)
        if block == [1, weight.shape[-1]]:
            granularity: Any = PerRow()
        elif block == list(weight.shape):
            granularity = PerTensor()
        else:
            return []
        kwargs = dict(act_quant_kwargs=getattr(weight, "act_quant_kwargs", None))
        return [lambda w: type(weight).from_hp(w, granularity, **kwargs)]
    if name == "IntxUnpackedToInt8Tensor":
        from torchao.quantization.quant_primitives import MappingType

        block = tuple(weight.block_size)
        kwargs = dict(activation_quantization=getattr(weight, "activation_quantization", None))
        return [
            (lambda w, m=mapping: type(weight).from_hp(w, block, weight.target_dtype, mapping_type=m, **kwargs))
            for mapping in (MappingType.SYMMETRIC, MappingType.ASYMMETRIC)
        ]
    return []


def _same_recipe(weight: Tensor, again: Tensor, dense: Tensor) -> bool:
    """Whether ``again`` (``dense`` = ``weight.dequantize()`` requantized) was made with ``weight``'s recipe: same
    class and metadata (block size, target dtype, ...), zero points zero exactly where ``weight``'s are, and
    values within one quantization step of ``dense`` (requantization is not idempotent: the scales are
    recomputed from the dequantized range)."""
    if type(again) is not type(weight) or again.shape != weight.shape:
        return False
    if again.__tensor_flatten__()[1] != weight.__tensor_flatten__()[1]:
        return False
    zero, zero_again = getattr(weight, "zero_point", None), getattr(again, "zero_point", None)
    if (zero is None) != (zero_again is None):
        return False
    if zero is not None and not torch.equal(zero == 0, zero_again == 0):
        return False
    step = getattr(weight, "scale", None)
    step = step.abs().max().item() if isinstance(step, Tensor) else 0.0
    return (again.dequantize() - dense).abs().max().item() <= step * (1 + 1e-3)


def base_requantizer(module: torch.nn.Module) -> Tuple[Optional[Requantizer], str]:
    """``(requantizer, "")`` when ``module``'s weight can be dequantized and requantized with the same recipe,
    else ``(None, reason)``."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or getattr(module, "in_features", None) is None:
        return None, f"{type(module).__name__} has no linear weight qgoft knows how to merge into"
    name = _torchao_class(weight)
    if name is None:
        if _is_bitsandbytes(module):
            return None, (f"merging into a bitsandbytes {type(module).__name__} is not supported (its "
                          "requantization is not verified here); keep the adapter unmerged, or dequantize the "
                          "base model first")
        return None, f"{type(module).__name__} is not a quantized linear layer qgoft can requantize"
    with torch.no_grad():
        original = weight.dequantize()
        for quantize in _torchao_candidates(weight):
            try:
                again = quantize(original)
            except Exception:  # noqa: BLE001 - an unsupported recipe for this tensor: try the next one
                continue
            if _same_recipe(weight, again, original):
                return Requantizer(dequantize=weight.dequantize, quantize=quantize), ""
    return None, (f"the torchao weight {name} (block size {getattr(weight, 'block_size', '?')}) uses a recipe "
                  "qgoft cannot reproduce (requantizing its dequantized values does not give a tensor of the same "
                  "kind back)")


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


class InputAdapter(GivensAdapterMixin, torch.nn.Module):
    """``y = base_layer(s * (R^T x))`` for any ``base_layer`` whose forward takes ``x`` of shape
    ``(..., in_features)``.

    The base layer is kept as the submodule ``base_layer`` (frozen, not copied); the adapter parameters
    (``givens_angles`` / ``givens_scale`` / ``givens_blocks``, as in :class:`qgoft.nn.Linear`) are created in
    ``adapter_dtype`` on the base's device. ``merge()`` works where :func:`base_requantizer` finds a way back
    to the base's format and returns the relative error of the merged forward against the unmerged one on a
    fixed probe input (also kept as ``merge_error``); elsewhere it raises and changes nothing.
    """

    def __init__(self, base_layer: torch.nn.Module, in_features: int, *, method: str = "goft",
                 layout: _layouts.LayoutSpec = "parallel", stack: int = 1,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if isinstance(base_layer, (Linear, InputAdapter)):
            raise TypeError(f"InputAdapter got a {type(base_layer).__name__}; it is already adapted")
        if not isinstance(base_layer, torch.nn.Module):
            raise TypeError(f"InputAdapter expects a torch.nn.Module, got {type(base_layer).__name__}")
        if isinstance(in_features, bool) or not isinstance(in_features, int):
            raise TypeError(f"InputAdapter: in_features must be an int, got {in_features!r}")
        self.in_features = in_features
        self.out_features = getattr(base_layer, "out_features", None)
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self._init_adapter(method, layout, stack, adapter_dtype, _module_device(base_layer))
        self._original_weight: Optional[torch.nn.Parameter] = None
        self.merge_error: Optional[float] = None
        self.train(base_layer.training)

    @property
    def bias(self) -> Optional[Tensor]:
        """The base layer's bias (None if it has none)."""
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """``base_layer(s * (R^T x), *args, **kwargs)``; the base alone when merged or disabled."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"qgoft.nn.InputAdapter around {type(self.base_layer).__name__}: x must have shape "
                             f"(..., in_features) = (..., {self.in_features}), got {tuple(x.shape)}")
        if self._merged:
            if not self._adapters_enabled:
                return torch.func.functional_call(self.base_layer, {"weight": self._original_weight},
                                                  (x,) + args, kwargs)
            return self.base_layer(x, *args, **kwargs)
        if not self._adapters_enabled:
            return self.base_layer(x, *args, **kwargs)
        return self.base_layer(self._chain(x), *args, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # Merging.
    # ------------------------------------------------------------------------------------------------

    def merge_refusal(self) -> Optional[str]:
        """None when :meth:`merge` can run, else the reason it would refuse."""
        if self._merged:
            return None
        return base_requantizer(self.base_layer)[1] or None

    def _probe(self, dtype: torch.dtype) -> Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(_PROBE_ROWS, self.in_features, generator=generator).to(
            device=self.givens_pairs.device, dtype=dtype)

    @torch.no_grad()
    def merge(self) -> Optional[float]:
        """Requantize ``W S R^T`` into the base weight (the original weight object is kept for
        :meth:`unmerge`) and return the relative error ``||y_merged - y|| / ||y||`` against the unmerged
        forward on a fixed probe input. Raises RuntimeError, changing nothing, when the base cannot be
        requantized. Warns and returns None when already merged."""
        if self._merged:
            warnings.warn("qgoft.nn.InputAdapter.merge(): already merged; nothing to do", UserWarning,
                          stacklevel=2)
            return None
        requantizer, reason = base_requantizer(self.base_layer)
        if requantizer is None:
            raise RuntimeError(f"cannot merge the qgoft adapter into {type(self.base_layer).__name__}: {reason}")
        dense = requantizer.dequantize()
        wide = dense.dtype == torch.float64 or self._adapter_dtype() == torch.float64
        merged = self._adjoint_rows(dense, torch.float64 if wide else torch.float32).to(dense.dtype)
        new_weight = torch.nn.Parameter(requantizer.quantize(merged), requires_grad=False)
        probe = self._probe(dense.dtype)
        expected = self.base_layer(self._chain(probe))
        original = self.base_layer.weight
        self.base_layer.weight = new_weight
        got = self.base_layer(probe)
        self._original_weight = original
        self._merged = True
        denominator = torch.linalg.vector_norm(expected.float()).item()
        error = torch.linalg.vector_norm((got - expected).float()).item() / (denominator or 1.0)
        self.merge_error = error if math.isfinite(error) else float("inf")
        return self.merge_error

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original base weight object back (bitwise the original). Warns when not merged."""
        if not self._merged:
            warnings.warn("qgoft.nn.InputAdapter.unmerge(): not merged; nothing to do", UserWarning,
                          stacklevel=2)
            return
        self.base_layer.weight = self._original_weight
        self._original_weight = None
        self._merged = False

    def extra_repr(self) -> str:
        return self._adapter_repr(f"in_features={self.in_features}, base={type(self.base_layer).__name__}")
