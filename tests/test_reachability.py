"""qgoft.solvers: which layouts carry u onto v, checked against the float64 reference chain.

* gather trees (parallel, sequential, butterfly) carry every u onto |u| e_root;
* a single tree does not carry every u onto every v (d = 4 parallel: from e_2, output coordinate 1 stays 0
  for all angles), and covers at most P = d - 1 dimensions of SO(d) (Jacobian rank);
* a gather tree followed by its mirror (round_trip) carries every u onto every v, with closed-form angles;
* d - 1 rotations whose pairs are chosen for (u, v) (solve_adaptive) also do.
Errors are bounded by a small multiple of float64 epsilon per rotation.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qgoft import layouts, reference, solvers

EPS = torch.finfo(torch.float64).eps
BUILDERS = {"parallel": layouts.parallel, "sequential": layouts.sequential, "butterfly": layouts.butterfly}


def apply_chain(layout, angles, u):
    return reference.givens_chain_reference(u[None], angles, layout.pairs_tensor(),
                                            layout.layer_offsets_tensor())[0]


def tolerance(layout, u):
    return 4 * EPS * (layout.num_pairs + 2) * float(u.norm())


@st.composite
def vector(draw, d, nonzero=True):
    """A float64 vector of length d: random entries, or a (signed) basis vector, or with exact zeros."""
    kind = draw(st.sampled_from(["dense", "basis", "sparse"]))
    if kind == "basis":
        x = torch.zeros(d, dtype=torch.float64)
        x[draw(st.integers(0, d - 1))] = draw(st.sampled_from([1.0, -1.0, 2.5]))
        return x
    values = draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=64), min_size=d, max_size=d))
    x = torch.tensor(values, dtype=torch.float64)
    if kind == "sparse":
        x = x * (torch.arange(d) % draw(st.integers(2, 4)) == 0)
    if nonzero and float(x.norm()) < 1e-3:
        x[draw(st.integers(0, d - 1))] = 1.0
    return x


@st.composite
def problem(draw, max_d=48):
    d = draw(st.integers(2, max_d))
    u = draw(vector(d))
    v = draw(vector(d))
    return d, u, v * (u.norm() / v.norm())


@pytest.mark.parametrize("name", sorted(BUILDERS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_gather_trees_carry_every_vector_to_the_root(name, data):
    d = data.draw(st.integers(2, 70))
    layout = BUILDERS[name](d)
    u = data.draw(vector(d))
    angles, root = solvers.gather_angles(layout, u)
    target = torch.zeros(d, dtype=torch.float64)
    target[root] = u.norm()
    assert angles.dtype == torch.float64 and angles.shape == (layout.num_pairs,)
    assert (apply_chain(layout, angles, u) - target).abs().max() <= tolerance(layout, u)


def test_roots_and_non_trees():
    assert solvers.gather_schedule(layouts.parallel(9))[1] == 0
    assert solvers.gather_schedule(layouts.sequential(9))[1] == 7  # last pair: tie, mass kept in i
    assert solvers.gather_schedule(layouts.butterfly(9))[1] == 0
    two_blocks = layouts.custom(4, [[(0, 1)], [(2, 3)]])  # two components: nothing joins {0,1} and {2,3}
    assert not solvers.is_gather_tree(two_blocks)
    with pytest.raises(ValueError, match="not a gather tree"):
        solvers.gather_angles(two_blocks, torch.ones(4))
    with pytest.raises(ValueError, match="roots differ"):
        solvers.round_trip(layouts.parallel(5), layouts.sequential(5))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@settings(max_examples=60, deadline=None)
@given(case=problem())
def test_round_trip_carries_every_u_onto_every_v(name, case):
    d, u, v = case
    gather = BUILDERS[name](d)
    layout = solvers.round_trip(gather)
    angles = solvers.solve_round_trip(gather, u, v)
    assert angles.shape == (layout.num_pairs,)
    assert (apply_chain(layout, angles, u) - v).abs().max() <= tolerance(layout, u)


@settings(max_examples=30, deadline=None)
@given(case=problem(max_d=24))
def test_round_trip_of_two_different_trees(case):
    d, u, v = case
    gather, scatter = layouts.butterfly(d), layouts.parallel(d)  # both root 0
    layout = solvers.round_trip(gather, scatter)
    angles = solvers.solve_round_trip(gather, u, v, scatter_of=scatter)
    assert (apply_chain(layout, angles, u) - v).abs().max() <= tolerance(layout, u)


def test_round_trip_of_parallel_counts():
    for d in range(2, 70):
        layout = solvers.round_trip(layouts.parallel(d))
        levels = math.ceil(math.log2(d))
        assert layout.num_pairs == max(1, 2 * d - 3)
        assert layout.num_layers == 2 * levels - 1


@settings(max_examples=80, deadline=None)
@given(case=problem(max_d=64))
def test_adaptive_uses_d_minus_1_rotations(case):
    d, u, v = case
    layout, angles = solvers.solve_adaptive(u, v)
    assert layout.num_pairs == d - 1 and all(len(layer) == 1 for layer in layout.layers)
    assert (apply_chain(layout, angles, u) - v).abs().max() <= tolerance(layout, u)


def test_solvers_reject_bad_vectors():
    gather = layouts.parallel(4)
    with pytest.raises(ValueError, match="keep the norm"):
        solvers.solve_round_trip(gather, torch.ones(4), 2 * torch.ones(4))
    with pytest.raises(ValueError, match="non-zero"):
        solvers.solve_adaptive(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="length d=4"):
        solvers.solve_round_trip(gather, torch.ones(5), torch.ones(5))
    with pytest.raises(ValueError, match="finite"):
        solvers.gather_angles(gather, torch.tensor([1.0, float("nan"), 0.0, 0.0]))


@settings(max_examples=40, deadline=None)
@given(angles=st.lists(st.floats(-10.0, 10.0, allow_nan=False), min_size=3, max_size=3))
def test_one_tree_cannot_reach_everything(angles):
    """d = 4, parallel = layers (0,1),(2,3) then (0,2): from e_2 the output's coordinate 1 is 0 for all angles,
    so e_2 is never carried onto e_1."""
    layout = layouts.parallel(4)
    assert layout.layers == (((0, 1), (2, 3)), ((0, 2),))
    e2 = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    out = apply_chain(layout, torch.tensor(angles, dtype=torch.float64), e2)
    assert out[1] == 0.0


def test_jacobian_rank_counts_the_covered_dimensions():
    for d in (3, 4, 5, 8):
        so_d = d * (d - 1) // 2
        assert solvers.chain_jacobian_rank(layouts.parallel(d)) == d - 1 < so_d
        assert solvers.chain_jacobian_rank(layouts.sequential(d)) == d - 1
        assert solvers.chain_jacobian_rank(solvers.round_trip(layouts.parallel(d))) == min(so_d, 2 * d - 3)
    # stacking the parallel layout d // 2 + 1 times covers all of SO(d) for these d
    for d in (4, 5, 6):
        stacked = layouts.stack(layouts.parallel(d), d // 2 + 1)
        assert solvers.chain_jacobian_rank(stacked, seed=1) == d * (d - 1) // 2
