"""Constructive angle solvers for Givens chains: which layouts carry a unit vector ``u`` onto a unit vector ``v``.

Convention (docs/CONTRACT.md, :mod:`qgoft.reference`): a chain maps a row ``x`` to ``x R`` with
``R = P_1 P_2 ... P_L``, layer 1 first; a strict block on pair ``(i, j)`` with angle ``t`` updates
``x_i <- cos(t) x_i + sin(t) x_j`` and ``x_j <- -sin(t) x_i + cos(t) x_j``.

* A layout is a **gather tree** when, processing its pairs in order, every pair can zero one of its two
  coordinates for good so that at the end one coordinate, the *root*, holds the whole vector: for every ``u``
  there are angles with ``u R = |u| e_root`` (:func:`gather_angles`). ``parallel`` (root 0), ``sequential``
  (root ``max(0, d - 2)``) and ``butterfly`` (root 0) are gather trees.
* A gather tree alone does **not** carry every ``u`` onto every ``v`` (``d = 4``, parallel: from ``u = e_2``
  coordinate 1 of the output stays 0). Its **mirror** (the same layers in reverse order, :func:`mirror`) run
  with the negated gather angles of ``v`` carries ``e_root`` onto ``v``.
* Hence a gather tree followed by the mirror of a gather tree with the same root (:func:`round_trip`, e.g.
  ``parallel`` then its mirror) carries every unit ``u`` onto every unit ``v``; :func:`solve_round_trip`
  returns such angles in closed form (float64). When the gather's last layer equals the scatter's first
  (``parallel``: the single pair ``(0, 2^(L-1))``) the two are fused (rotations in one plane add up):
  ``round_trip(parallel(d))`` has ``2 d - 3`` rotations in ``2 ceil(log2 d) - 1`` layers.
* With the pairs chosen for the given ``u`` and ``v`` (not a fixed layout), ``d - 1`` rotations suffice:
  :func:`solve_adaptive` returns such a one-pair-per-layer layout and its angles.

The measurements of what the layouts reach (success rates, Jacobian ranks) are in docs/METHODS.md
(reproduced by ``bench/reachability.py``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .layouts import Layout
from .reference import givens_chain_reference

__all__ = [
    "gather_schedule",
    "is_gather_tree",
    "gather_angles",
    "mirror",
    "round_trip",
    "solve_round_trip",
    "solve_adaptive",
    "chain_jacobian_rank",
]

KEEP, ZERO_J, ZERO_I = 0, 1, 2  # per pair of a gather schedule: angle 0, zero x_j (mass to i), zero x_i


def gather_schedule(layout: Layout) -> Tuple[List[int], int]:
    """The structural plan of :func:`gather_angles`: for every pair (canonical order) ``KEEP`` (angle 0),
    ``ZERO_J`` or ``ZERO_I``, and the root coordinate. Raises ValueError if ``layout`` is not a gather tree.

    Rule: a coordinate is *live* until a pair zeroes it; a pair of two live coordinates zeroes the one whose
    next use comes later (the higher index on ties), so the survivor can merge again sooner; a pair with a
    zeroed coordinate keeps angle 0 (a zeroed coordinate never receives mass back)."""
    pairs = layout.pairs
    next_use = [math.inf] * len(pairs) * 2
    upcoming = {}
    for p in range(len(pairs) - 1, -1, -1):
        i, j = pairs[p]
        next_use[2 * p] = upcoming.get(i, math.inf)
        next_use[2 * p + 1] = upcoming.get(j, math.inf)
        upcoming[i] = upcoming[j] = p
    live = [True] * layout.d
    plan = []
    for p, (i, j) in enumerate(pairs):
        if live[i] and live[j]:
            if next_use[2 * p] < next_use[2 * p + 1] or next_use[2 * p] == next_use[2 * p + 1]:
                plan.append(ZERO_J)
                live[j] = False
            else:
                plan.append(ZERO_I)
                live[i] = False
        else:
            plan.append(KEEP)
    roots = [k for k in range(layout.d) if live[k]]
    if len(roots) != 1:
        raise ValueError(f"layout {layout!r} is not a gather tree: coordinates {roots[:8]} stay live")
    return plan, roots[0]


def is_gather_tree(layout: Layout) -> bool:
    """Whether :func:`gather_angles` works for ``layout`` (every vector can be gathered into one coordinate)."""
    try:
        gather_schedule(layout)
    except ValueError:
        return False
    return True


def _as_vector(x: Tensor, d: int, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 1 or x.shape[0] != d:
        raise ValueError(f"{name} must be a 1-D tensor of length d={d}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x.detach().to(torch.float64).cpu()


def _pair_angle(xi: float, xj: float, yi: float, yj: float) -> float:
    """The angle ``t`` whose block maps ``(x_i, x_j)`` to ``(y_i, y_j)`` (equal norms): the block rotates the
    pair's polar angle ``atan2(x_j, x_i)`` by ``-t``."""
    return math.atan2(xj, xi) - math.atan2(yj, yi)


def gather_angles(layout: Layout, u: Tensor) -> Tuple[Tensor, int]:
    """Angles ``(P,)`` (float64, canonical pair order) with ``u R = |u| e_root`` and the root coordinate.

    ``u``: ``(d,)``, any real dtype (computed in float64). The result applied by
    :func:`qgoft.reference.givens_chain_reference` to ``u`` gives ``|u| e_root`` up to float64 rounding."""
    plan, root = gather_schedule(layout)
    x = _as_vector(u, layout.d, "u").tolist()
    angles = []
    for (i, j), action in zip(layout.pairs, plan):
        if action == KEEP:
            angles.append(0.0)
            continue
        xi, xj = x[i], x[j]
        r = math.hypot(xi, xj)
        if action == ZERO_J:
            t = math.atan2(xj, xi)
            x[i], x[j] = r, 0.0
        else:
            t = math.atan2(-xi, xj)
            x[i], x[j] = 0.0, r
        angles.append(t)
    return torch.tensor(angles, dtype=torch.float64), root


def mirror(layout: Layout) -> Layout:
    """The same layers in reverse order (named ``"<name>~"``): with negated angles it is the transpose."""
    return Layout(layout.d, tuple(reversed(layout.layers)), name=f"{layout.name}~")


def _fused(gather: Layout, scatter_of: Layout) -> bool:
    """Whether the gather's last layer and the mirror's first layer (``scatter_of``'s last) are the same."""
    return gather.layers[-1] == scatter_of.layers[-1]


def round_trip(gather: Layout, scatter_of: Optional[Layout] = None) -> Layout:
    """``gather``'s layers followed by ``mirror(scatter_of)`` (default ``scatter_of = gather``), the meeting
    layer written once when both have it: a layout that carries every unit vector onto every unit vector when
    both are gather trees with the same root (checked). ``round_trip(parallel(d))`` has ``2 d - 3`` pairs in
    ``2 ceil(log2 d) - 1`` layers."""
    scatter_of = gather if scatter_of is None else scatter_of
    if scatter_of.d != gather.d:
        raise ValueError(f"layouts for different d: {gather.d} and {scatter_of.d}")
    root_in, root_out = gather_schedule(gather)[1], gather_schedule(scatter_of)[1]
    if root_in != root_out:
        raise ValueError(f"the gather roots differ ({root_in} and {root_out}); the composition would need a "
                         "rotation between them")
    back = tuple(reversed(scatter_of.layers))
    if _fused(gather, scatter_of):
        back = back[1:]
    return Layout(gather.d, gather.layers + back, name=f"{gather.name}+{scatter_of.name}~")


def solve_round_trip(gather: Layout, u: Tensor, v: Tensor, scatter_of: Optional[Layout] = None,
                     rtol: float = 1e-9) -> Tensor:
    """Angles ``(P,)`` (float64) of ``round_trip(gather, scatter_of)`` with ``u R = v``.

    ``u`` and ``v``: ``(d,)`` with equal norms (relative tolerance ``rtol``; rotations keep the norm) and not
    zero. Closed form: gather ``u`` into ``|u| e_root`` (:func:`gather_angles`), then the mirror of
    ``scatter_of`` with the negated gather angles of ``v`` (taken layer by layer in reverse), which maps
    ``|v| e_root`` to ``v`` because ``G(t)^T = G(-t)``."""
    scatter_of = gather if scatter_of is None else scatter_of
    u64, v64 = _as_vector(u, gather.d, "u"), _as_vector(v, gather.d, "v")
    nu, nv = float(u64.norm()), float(v64.norm())
    if nu == 0.0 or nv == 0.0:
        raise ValueError("u and v must be non-zero")
    if abs(nu - nv) > rtol * max(nu, nv):
        raise ValueError(f"rotations keep the norm: |u| = {nu:.17g} and |v| = {nv:.17g} differ")
    round_trip(gather, scatter_of)  # validates d and the common root
    first, _ = gather_angles(gather, u64)
    back, _ = gather_angles(scatter_of, v64)
    offsets = [0]
    for layer in scatter_of.layers:
        offsets.append(offsets[-1] + len(layer))
    second = [-back[offsets[r]:offsets[r + 1]] for r in reversed(range(scatter_of.num_layers))]
    if _fused(gather, scatter_of):  # same plane twice in a row: G(a) G(b) = G(a + b)
        meet = len(gather.layers[-1])
        first = torch.cat([first[:-meet], first[-meet:] + second[0]])
        second = second[1:]
    return torch.cat([first] + second)


def solve_adaptive(u: Tensor, v: Tensor, rtol: float = 1e-9) -> Tuple[Layout, Tensor]:
    """``d - 1`` Givens rotations, their pairs chosen for this ``u`` and ``v``, with ``u R = v``.

    Returns ``(layout, angles)``: one pair per layer, angles float64. ``u``, ``v``: ``(d,)``, equal non-zero
    norms. Construction: with ``n`` coordinates left (same remaining norm on both sides), take ``k`` with the
    smallest ``v_k^2`` and ``m != k`` with the largest current ``x_m^2``; ``v_k^2 <= |rest|^2 / n <= x_k^2 + x_m^2``,
    so the pair ``(k, m)`` can set ``x_k = v_k`` (the rest of its mass goes to ``x_m``) and ``k`` is done; the
    last pair sets its two coordinates exactly. This proves the per-vector statement with ``d - 1`` rotations;
    no fixed layout of ``d - 1`` rotations carries every ``u`` onto every ``v`` (docs/METHODS.md)."""
    if not isinstance(u, Tensor) or u.dim() != 1 or u.shape[0] < 2:
        raise ValueError("u must be a 1-D tensor with d >= 2 entries")
    d = u.shape[0]
    x, y = _as_vector(u, d, "u").tolist(), _as_vector(v, d, "v").tolist()
    nu, nv = math.hypot(*x), math.hypot(*y)
    if nu == 0.0 or nv == 0.0:
        raise ValueError("u and v must be non-zero")
    if abs(nu - nv) > rtol * max(nu, nv):
        raise ValueError(f"rotations keep the norm: |u| = {nu:.17g} and |v| = {nv:.17g} differ")
    left = list(range(d))
    layers, angles = [], []
    while len(left) >= 2:
        if len(left) == 2:
            k, m = left
            target_k, target_m = y[k], y[m]
        else:
            k = min(left, key=lambda c: (y[c] * y[c], c))
            m = max((c for c in left if c != k), key=lambda c: (x[c] * x[c], -c))
            r = math.hypot(x[k], x[m])
            target_k = y[k]
            target_m = math.sqrt(max(0.0, (r - abs(target_k)) * (r + abs(target_k))))
        i, j = min(k, m), max(k, m)
        yi, yj = (target_k, target_m) if i == k else (target_m, target_k)
        angles.append(_pair_angle(x[i], x[j], yi, yj))
        x[i], x[j] = yi, yj
        layers.append(((i, j),))
        left.remove(k)
        if len(left) == 1:
            break
    return Layout(d, layers, name="adaptive"), torch.tensor(angles, dtype=torch.float64)


def chain_jacobian_rank(layout: Layout, angles: Optional[Tensor] = None, seed: int = 0,
                        rtol: float = 1e-9) -> int:
    """Rank of the Jacobian of ``angles -> R`` (a ``d*d x P`` matrix, float64) at ``angles`` (default: uniform
    random in ``[-pi, pi)`` from ``seed``): the dimension of the part of ``SO(d)`` (dimension
    ``d (d - 1) / 2``) the strict chain covers around that point. Singular values below ``rtol`` times the
    largest count as zero."""
    if angles is None:
        generator = torch.Generator().manual_seed(seed)
        angles = (torch.rand(layout.num_pairs, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
    pairs, offsets = layout.pairs_tensor(), layout.layer_offsets_tensor()
    eye = torch.eye(layout.d, dtype=torch.float64)

    def matrix(theta: Tensor) -> Tensor:  # the rows of I R are the rows of R
        return givens_chain_reference(eye, theta, pairs, offsets).reshape(-1)

    jacobian = torch.func.jacfwd(matrix)(angles.to(torch.float64))  # forward mode: P columns, P << d * d
    singular = torch.linalg.svdvals(jacobian)
    return int((singular > rtol * singular.max()).sum()) if singular.numel() else 0
