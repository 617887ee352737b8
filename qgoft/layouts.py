"""Layouts: which index pairs each layer of a Givens chain rotates.

A layout over ``d`` features is a sequence of layers; a layer is a set of disjoint pairs ``(i, j)`` with
``0 <= i < j < d``. The canonical order (docs/MATH.md Sec. 4) is layer by layer, ascending ``i`` inside a layer;
it is the storage order of every parameter tensor (angles ``(P,)``, blocks ``(P, 2, 2)``).

Builders:

* :func:`parallel` -- the paper's default (Sec. 4.1): ``d - 1`` pairs in ``ceil(log2 d)`` layers.
* :func:`sequential` -- ``G(k-1, k)`` for ``k = 1 .. d-1``, one pair per layer.
* :func:`butterfly` -- layer ``r`` pairs ``i`` with ``i XOR 2^(r-1)``.
* :func:`stack` -- repeat a layout's layers several times.
* :func:`custom` -- any validated list of layers.
* :func:`get_layout` -- resolve a user-facing spec (name, Layout or list of layers).
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "Layout",
    "LayoutSpec",
    "parallel",
    "sequential",
    "butterfly",
    "stack",
    "custom",
    "get_layout",
    "BUILTIN_LAYOUTS",
]

Pair = Tuple[int, int]
Layer = Tuple[Pair, ...]
Layers = Tuple[Layer, ...]


def _as_int(value: Any, what: str) -> int:
    """Return ``value`` as a Python int; reject bools, floats and other non-integers."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {type(value).__name__} {value!r}") from None


def _validate_d(d: Any) -> int:
    d = _as_int(d, "d")
    if d < 2:
        raise ValueError(f"a layout needs d >= 2 features, got d={d}")
    return d


def _canonical_layers(d: int, layers: Any) -> Layers:
    """Validate ``layers`` for ``d`` features and return them in canonical form (pairs sorted by i per layer)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers must be a sequence of layers (sequences of (i, j) pairs), got {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("a layout needs at least one layer")
    out = []
    for r, layer in enumerate(layers):
        if isinstance(layer, (str, bytes)) or not isinstance(layer, Iterable):
            raise ValueError(f"layer {r} must be a sequence of (i, j) pairs, got {layer!r}")
        layer = list(layer)
        if not layer:
            raise ValueError(f"layer {r} is empty; every layer needs at least one pair")
        seen = {}
        pairs = []
        for k, pair in enumerate(layer):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable):
                raise ValueError(f"layer {r}, pair {k}: expected a pair (i, j), got {pair!r}")
            pair = tuple(pair)
            if len(pair) != 2:
                raise ValueError(f"layer {r}, pair {k}: expected a pair (i, j), got {pair!r}")
            i = _as_int(pair[0], f"layer {r}, pair {k} {pair!r}: index i")
            j = _as_int(pair[1], f"layer {r}, pair {k} {pair!r}: index j")
            if not (0 <= i < d and 0 <= j < d):
                raise ValueError(f"layer {r}, pair {k} ({i}, {j}): indices must lie in [0, {d})")
            if not i < j:
                raise ValueError(f"layer {r}, pair {k} ({i}, {j}): need i < j")
            for index in (i, j):
                if index in seen:
                    other = seen[index]
                    raise ValueError(
                        f"layer {r}, pair {k} ({i}, {j}): index {index} is already used by pair {other[0]} "
                        f"{other[1]} of the same layer; pairs inside a layer must be disjoint"
                    )
                seen[index] = (k, (i, j))
            pairs.append((i, j))
        pairs.sort()
        out.append(tuple(pairs))
    return tuple(out)


class Layout:
    """An immutable, validated layout of Givens pairs over ``d`` features.

    Attributes:
        d: number of features (the adapted layer's ``in_features``).
        layers: ``tuple`` of layers, each a ``tuple`` of ``(i, j)`` pairs, canonical order.
        name: a label (``"parallel"``, ``"butterfly*2"``, ``"custom"``...). Equality and hashing ignore it:
            two layouts are equal when they rotate the same pairs in the same order.

    The constructor validates (``d >= 2``, integer indices, ``0 <= i < j < d``, disjoint pairs inside a layer,
    no empty layer, at least one layer) and sorts pairs inside each layer by ``i``; it never swaps ``i``/``j``.
    """

    __slots__ = ("_d", "_layers", "_name", "_pairs", "_pairs_cpu", "_offsets_cpu", "_hash")

    def __init__(self, d: int, layers: Iterable[Iterable[Sequence[int]]], name: str = "custom") -> None:
        d = _validate_d(d)
        canonical = _canonical_layers(d, layers)
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, got {name!r}")
        pairs = tuple(pair for layer in canonical for pair in layer)
        offsets = [0]
        for layer in canonical:
            offsets.append(offsets[-1] + len(layer))
        pairs_cpu = torch.tensor(pairs, dtype=torch.int32).reshape(len(pairs), 2).contiguous()
        offsets_cpu = torch.tensor(offsets, dtype=torch.int32)
        object.__setattr__(self, "_d", d)
        object.__setattr__(self, "_layers", canonical)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_pairs", pairs)
        object.__setattr__(self, "_pairs_cpu", pairs_cpu)
        object.__setattr__(self, "_offsets_cpu", offsets_cpu)
        object.__setattr__(self, "_hash", hash((d, canonical)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Layout is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Layout is immutable")

    @property
    def d(self) -> int:
        """Number of features."""
        return self._d

    @property
    def layers(self) -> Layers:
        """The layers, each a tuple of ``(i, j)`` pairs in canonical order."""
        return self._layers

    @property
    def name(self) -> str:
        """A descriptive label (not part of equality)."""
        return self._name

    @property
    def pairs(self) -> Tuple[Pair, ...]:
        """All pairs flattened in canonical order (length ``num_pairs``)."""
        return self._pairs

    @property
    def num_pairs(self) -> int:
        """``P``, the number of Givens blocks (= number of angles)."""
        return len(self._pairs)

    @property
    def num_layers(self) -> int:
        """``L``, the number of layers."""
        return len(self._layers)

    def pairs_tensor(self, device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
        """Pairs as a contiguous int32 tensor of shape ``(P, 2)`` in canonical order.

        Without ``device`` (or with a CPU device) this returns a cached CPU tensor: treat it as read-only.
        """
        if device is None or torch.device(device).type == "cpu":
            return self._pairs_cpu
        return self._pairs_cpu.to(device)

    def layer_offsets_tensor(self, device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
        """Layer boundaries as an int32 tensor of shape ``(L + 1,)``: ``offsets[0] = 0``, ``offsets[L] = P``;
        layer ``r`` is ``pairs[offsets[r]:offsets[r + 1]]``. Cached on CPU like :meth:`pairs_tensor`."""
        if device is None or torch.device(device).type == "cpu":
            return self._offsets_cpu
        return self._offsets_cpu.to(device)

    def to_dict(self) -> dict:
        """A JSON-safe description: ``{"d": int, "name": str, "layers": [[[i, j], ...], ...]}``."""
        return {
            "d": self._d,
            "name": self._name,
            "layers": [[[i, j] for i, j in layer] for layer in self._layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Layout":
        """Inverse of :meth:`to_dict` (validates the content)."""
        if not isinstance(data, Mapping) or "d" not in data or "layers" not in data:
            raise ValueError("a layout dict needs the keys 'd' and 'layers'")
        return cls(data["d"], data["layers"], name=data.get("name", "custom"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layout):
            return NotImplemented
        return self._d == other._d and self._layers == other._layers

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return (
            f"Layout(name={self._name!r}, d={self._d}, num_layers={self.num_layers}, "
            f"num_pairs={self.num_pairs})"
        )

    def __reduce__(self):
        return (_layout_from_state, (self._d, self._layers, self._name))


def _layout_from_state(d: int, layers: Layers, name: str) -> Layout:
    return Layout(d, layers, name)


def _num_levels(d: int) -> int:
    """``ceil(log2 d)`` for ``d >= 2``, computed exactly on integers."""
    return (d - 1).bit_length()


def parallel(d: int) -> Layout:
    """The paper's parallel layout (Sec. 4.1, Eq. 3, Fig. 2b).

    Layer ``r = 1 .. ceil(log2 d)`` holds the pairs ``(2^r k, 2^r k + 2^(r-1))`` for every ``k >= 0`` with
    ``2^r k + 2^(r-1) < d``. For every ``d >= 2``: ``d - 1`` pairs in ``ceil(log2 d)`` layers
    (``d = 6``: ``[(0,1),(2,3),(4,5)], [(0,2)], [(0,4)]``).
    """
    d = _validate_d(d)
    layers = []
    for r in range(1, _num_levels(d) + 1):
        step, half = 1 << r, 1 << (r - 1)
        layers.append(tuple((start, start + half) for start in range(0, d - half, step)))
    return Layout(d, layers, name="parallel")


def sequential(d: int) -> Layout:
    """The paper's sequential layout (Fig. 2a): ``G(k-1, k)`` for ``k = 1 .. d-1``, one pair per layer."""
    d = _validate_d(d)
    return Layout(d, [((k - 1, k),) for k in range(1, d)], name="sequential")


def butterfly(d: int) -> Layout:
    """Butterfly layout: layer ``r = 1 .. ceil(log2 d)`` pairs ``i`` with ``i XOR 2^(r-1)``.

    For ``d`` a power of two this is ``log2 d`` layers of ``d / 2`` pairs each.
    Rule for other ``d``: build it for the next power of two and keep only the pairs whose two indices are
    ``< d`` (layers stay non-empty since ``(0, 2^(r-1))`` always survives). The unpaired indices of a layer are
    left unchanged by that layer.
    """
    d = _validate_d(d)
    layers = []
    for r in range(1, _num_levels(d) + 1):
        bit = 1 << (r - 1)
        layers.append(tuple((i, i | bit) for i in range(d) if not i & bit and (i | bit) < d))
    return Layout(d, layers, name="butterfly")


def stack(layout: Layout, times: int) -> Layout:
    """Repeat ``layout``'s layers ``times`` times (each repetition has its own parameters).

    The result is named ``"<name>*<times>"``; ``times = 1`` returns ``layout`` itself.
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"stack() expects a Layout, got {type(layout).__name__}")
    times = _as_int(times, "times")
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")
    if times == 1:
        return layout
    return Layout(layout.d, layout.layers * times, name=f"{layout.name}*{times}")


_stack_layout = stack  # get_layout's ``stack`` argument shadows the function name


def custom(d: int, layers: Iterable[Iterable[Sequence[int]]], name: str = "custom") -> Layout:
    """A validated user layout. ``layers`` is a sequence of layers, each a sequence of ``(i, j)`` pairs.

    Pairs inside a layer are sorted by ``i`` (canonical order); nothing else is normalised. Raises ValueError
    naming the offending layer/pair when ``d < 2``, an index is not an integer, not in ``[0, d)``, ``i >= j``,
    two pairs of one layer share an index, a layer is empty, or there is no layer.
    """
    return Layout(d, layers, name=name)


BUILTIN_LAYOUTS = {"parallel": parallel, "sequential": sequential, "butterfly": butterfly}

LayoutSpec = Union[str, Layout, Sequence[Sequence[Sequence[int]]]]


def get_layout(spec: LayoutSpec, d: int, stack: int = 1) -> Layout:
    """Resolve ``spec`` for ``d`` features, repeated ``stack`` times.

    ``spec`` is a builtin name (``"parallel"``, ``"sequential"``, ``"butterfly"``), a :class:`Layout`
    (its ``d`` must equal ``d``) or a list of layers (passed to :func:`custom`).
    """
    d = _validate_d(d)
    if isinstance(spec, Layout):
        if spec.d != d:
            raise ValueError(f"layout {spec!r} is for d={spec.d} features, but d={d} was requested")
        base = spec
    elif isinstance(spec, str):
        builder = BUILTIN_LAYOUTS.get(spec.lower())
        if builder is None:
            raise ValueError(
                f"unknown layout {spec!r}; expected one of {sorted(BUILTIN_LAYOUTS)}, a Layout or a list of layers"
            )
        base = builder(d)
    else:
        base = custom(d, spec)
    return _stack_layout(base, stack)
