"""Tests of qgoft.layouts against docs/MATH.md Sec. 4, using independent formulas."""

import json
import math
import pickle

import pytest
import torch

from qgoft import layouts
from qgoft.layouts import Layout

SMALL_DS = list(range(2, 71))
LARGE_DS = [128, 256, 1000, 1024, 4096, 65536]


def expected_parallel(d):
    """docs/MATH.md Sec. 4, written differently from the builder: scan every index."""
    result = []
    num_layers = math.ceil(math.log2(d))
    for r in range(1, num_layers + 1):
        layer = [(i, i + 2 ** (r - 1)) for i in range(d) if i % 2 ** r == 0 and i + 2 ** (r - 1) < d]
        result.append(tuple(layer))
    return tuple(result)


def assert_well_formed(layout):
    assert layout.num_layers == len(layout.layers) >= 1
    assert layout.num_pairs == sum(len(layer) for layer in layout.layers)
    for layer in layout.layers:
        assert len(layer) >= 1
        used = [index for pair in layer for index in pair]
        assert len(used) == len(set(used)), "pairs inside a layer must be disjoint"
        assert list(layer) == sorted(layer), "canonical order: ascending i inside a layer"
        for i, j in layer:
            assert isinstance(i, int) and isinstance(j, int)
            assert 0 <= i < j < layout.d


# ------------------------------------------------------------------------------------------------
# parallel
# ------------------------------------------------------------------------------------------------

def test_parallel_d6_example_of_docs_math():
    """The worked example `parallel(6)` of docs/MATH.md."""
    layout = layouts.parallel(6)
    assert layout.layers == (((0, 1), (2, 3), (4, 5)), ((0, 2),), ((0, 4),))
    assert layout.name == "parallel"


@pytest.mark.parametrize("d", SMALL_DS + LARGE_DS)
def test_parallel_matches_formula(d):
    layout = layouts.parallel(d)
    assert_well_formed(layout)
    assert layout.d == d
    assert layout.num_pairs == d - 1
    assert layout.num_layers == math.ceil(math.log2(d))
    assert layout.layers == expected_parallel(d)
    for r, layer in enumerate(layout.layers, start=1):
        for i, j in layer:
            assert j - i == 2 ** (r - 1), "layer r pairs at stride 2^(r-1) (docs/MATH.md Sec. 9 defect)"
            assert i % 2 ** r == 0


@pytest.mark.parametrize("d", [2, 3, 5, 6, 8, 13, 64, 100])
def test_parallel_is_a_spanning_tree(d):
    # d - 1 edges connecting all d indices: every index is reachable from 0.
    parent = list(range(d))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for i, j in layouts.parallel(d).pairs:
        ri, rj = find(i), find(j)
        assert ri != rj, "a tree has no cycle"
        parent[rj] = ri
    assert len({find(a) for a in range(d)}) == 1


# ------------------------------------------------------------------------------------------------
# sequential
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", SMALL_DS + [1000])
def test_sequential(d):
    layout = layouts.sequential(d)
    assert_well_formed(layout)
    assert layout.num_pairs == d - 1
    assert layout.num_layers == d - 1
    assert layout.layers == tuple(((k - 1, k),) for k in range(1, d))
    assert layout.name == "sequential"


# ------------------------------------------------------------------------------------------------
# butterfly
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [2, 4, 8, 16, 32, 64, 128, 1024, 4096])
def test_butterfly_powers_of_two(d):
    layout = layouts.butterfly(d)
    assert_well_formed(layout)
    log2d = d.bit_length() - 1
    assert layout.num_layers == log2d
    assert layout.num_pairs == (d // 2) * log2d
    for r, layer in enumerate(layout.layers, start=1):
        assert len(layer) == d // 2
        for i, j in layer:
            assert j == i ^ 2 ** (r - 1)
        # every index is touched exactly once per layer
        assert sorted(index for pair in layer for index in pair) == list(range(d))


@pytest.mark.parametrize("d", SMALL_DS)
def test_butterfly_any_d_rule(d):
    layout = layouts.butterfly(d)
    assert_well_formed(layout)
    assert layout.num_layers == math.ceil(math.log2(d))
    for r, layer in enumerate(layout.layers, start=1):
        bit = 2 ** (r - 1)
        expected = tuple((i, i ^ bit) for i in range(d) if i < i ^ bit < d)
        assert layer == expected


def test_butterfly_d6():
    assert layouts.butterfly(6).layers == (
        ((0, 1), (2, 3), (4, 5)),
        ((0, 2), (1, 3)),
        ((0, 4), (1, 5)),
    )


# ------------------------------------------------------------------------------------------------
# stack
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("builder", [layouts.parallel, layouts.sequential, layouts.butterfly])
@pytest.mark.parametrize("times", [1, 2, 3])
def test_stack(builder, times):
    base = builder(10)
    stacked = layouts.stack(base, times)
    assert stacked.d == 10
    assert stacked.layers == base.layers * times
    assert stacked.num_pairs == base.num_pairs * times
    assert stacked.num_layers == base.num_layers * times
    assert stacked.name == (base.name if times == 1 else f"{base.name}*{times}")
    offsets = stacked.layer_offsets_tensor().tolist()
    assert offsets[-1] == stacked.num_pairs


@pytest.mark.parametrize("times", [0, -1])
def test_stack_rejects_bad_times(times):
    with pytest.raises(ValueError, match="times"):
        layouts.stack(layouts.parallel(4), times)


def test_stack_rejects_non_layout():
    with pytest.raises(TypeError):
        layouts.stack([[(0, 1)]], 2)


# ------------------------------------------------------------------------------------------------
# custom and validation
# ------------------------------------------------------------------------------------------------

def test_custom_sorts_pairs_inside_layers_only():
    layout = layouts.custom(5, [[(3, 4), (0, 2)], [(1, 2)], [(0, 1), (2, 4)]], name="mine")
    assert layout.layers == (((0, 2), (3, 4)), ((1, 2),), ((0, 1), (2, 4)))
    assert layout.name == "mine"
    assert layout.num_pairs == 5 and layout.num_layers == 3


def test_custom_accepts_integer_like_values():
    np = pytest.importorskip("numpy")
    layout = layouts.custom(np.int64(4), [[(torch.tensor(0), np.int32(3))], [[1, 2]]])
    assert layout.layers == (((0, 3),), ((1, 2),))
    assert all(isinstance(index, int) for layer in layout.layers for pair in layer for index in pair)
    assert isinstance(layout.d, int)


@pytest.mark.parametrize(
    "d, layers, message",
    [
        (4, [[(1, 1)]], r"layer 0, pair 0 \(1, 1\): need i < j"),
        (4, [[(0, 1)], [(2, 1)]], r"layer 1, pair 0 \(2, 1\): need i < j"),
        (4, [[(0, 4)]], r"layer 0, pair 0 \(0, 4\): indices must lie in \[0, 4\)"),
        (4, [[(-1, 2)]], r"layer 0, pair 0 \(-1, 2\): indices must lie"),
        (4, [[(0, 1), (1, 2)]], r"layer 0, pair 1 \(1, 2\): index 1 is already used"),
        (6, [[(0, 1)], [(0, 5), (2, 3), (3, 5)]], r"layer 1, pair 1 \(2, 3\)|layer 1, pair 2 \(3, 5\)"),
        (4, [[(0, 1)], []], r"layer 1 is empty"),
        (4, [], r"at least one layer"),
        (1, [[(0, 1)]], r"d >= 2"),
        (4, [[(0.0, 1)]], r"layer 0, pair 0 .*must be an integer"),
        (4, [[(True, 2)]], r"layer 0, pair 0 .*must be an integer"),
        (4, [[("0", 2)]], r"layer 0, pair 0 .*must be an integer"),
        (4, [[(0, 1, 2)]], r"layer 0, pair 0: expected a pair"),
        (4, [[0, 1]], r"layer 0, pair 0: expected a pair"),
        (4, "01", r"layers must be a sequence"),
        (4.0, [[(0, 1)]], r"d must be an integer"),
    ],
)
def test_custom_validation_errors(d, layers, message):
    with pytest.raises(ValueError, match=message):
        layouts.custom(d, layers)


def test_validation_message_names_the_overlapping_pairs():
    with pytest.raises(ValueError) as info:
        layouts.custom(6, [[(0, 5), (2, 3), (3, 5)]])
    text = str(info.value)
    assert "layer 0" in text and "(3, 5)" in text and "index 3" in text


# ------------------------------------------------------------------------------------------------
# Layout object
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [layouts.parallel(13), layouts.sequential(5), layouts.butterfly(6),
                                    layouts.stack(layouts.parallel(7), 2),
                                    layouts.custom(5, [[(2, 4), (0, 1)], [(1, 3)]])])
def test_tensors(layout):
    pairs = layout.pairs_tensor()
    offsets = layout.layer_offsets_tensor()
    assert pairs.dtype == torch.int32 and offsets.dtype == torch.int32
    assert pairs.shape == (layout.num_pairs, 2) and pairs.is_contiguous()
    assert offsets.shape == (layout.num_layers + 1,)
    assert pairs.device.type == "cpu" and offsets.device.type == "cpu"
    flat = [pair for layer in layout.layers for pair in layer]
    assert [tuple(p) for p in pairs.tolist()] == flat
    assert list(layout.pairs) == flat
    expected_offsets = [0]
    for layer in layout.layers:
        expected_offsets.append(expected_offsets[-1] + len(layer))
    assert offsets.tolist() == expected_offsets
    for r, layer in enumerate(layout.layers):
        chunk = pairs[offsets[r]:offsets[r + 1]]
        assert [tuple(p) for p in chunk.tolist()] == list(layer)
    # cached on CPU
    assert layout.pairs_tensor() is pairs and layout.layer_offsets_tensor("cpu") is offsets
    moved = layout.pairs_tensor(torch.device("meta"))
    assert moved.device.type == "meta" and moved.dtype == torch.int32


@pytest.mark.parametrize("layout", [layouts.parallel(13), layouts.butterfly(6),
                                    layouts.stack(layouts.sequential(4), 3),
                                    layouts.custom(5, [[(2, 4), (0, 1)], [(1, 3)]], name="x")])
def test_to_dict_round_trip(layout):
    data = layout.to_dict()
    text = json.dumps(data)
    restored = Layout.from_dict(json.loads(text))
    assert restored == layout
    assert restored.name == layout.name
    assert restored.layers == layout.layers
    assert hash(restored) == hash(layout)


def test_from_dict_validates():
    with pytest.raises(ValueError):
        Layout.from_dict({"d": 3, "layers": [[[0, 3]]]})
    with pytest.raises(ValueError):
        Layout.from_dict({"layers": [[[0, 1]]]})


def test_pickle_round_trip():
    layout = layouts.stack(layouts.butterfly(8), 2)
    restored = pickle.loads(pickle.dumps(layout))
    assert restored == layout and restored.name == layout.name


def test_equality_hash_repr_immutability():
    a = layouts.parallel(6)
    b = layouts.custom(6, [[(4, 5), (0, 1), (2, 3)], [(0, 2)], [(0, 4)]])
    assert a == b and hash(a) == hash(b)  # names are labels, not identity
    assert a != layouts.butterfly(6)
    assert a != layouts.parallel(7)
    assert layouts.parallel(2) == layouts.sequential(2) == layouts.butterfly(2)
    assert len({a, b, layouts.butterfly(6)}) == 2
    assert a != "parallel"
    text = repr(a)
    assert "parallel" in text and "d=6" in text and "num_pairs=5" in text and "num_layers=3" in text
    with pytest.raises(AttributeError):
        a.d = 7
    with pytest.raises(AttributeError):
        a.anything = 1
    with pytest.raises(TypeError):
        a.layers[0][0] = (1, 2)


# ------------------------------------------------------------------------------------------------
# get_layout
# ------------------------------------------------------------------------------------------------

def test_get_layout():
    assert layouts.get_layout("parallel", 9) == layouts.parallel(9)
    assert layouts.get_layout("sequential", 9).name == "sequential"
    assert layouts.get_layout("butterfly", 8) == layouts.butterfly(8)
    assert layouts.get_layout("parallel", 9, stack=2) == layouts.stack(layouts.parallel(9), 2)
    assert layouts.get_layout("parallel", 9, stack=2).name == "parallel*2"
    given = layouts.butterfly(8)
    assert layouts.get_layout(given, 8) is given
    assert layouts.get_layout([[(0, 1)], [(1, 2)]], 3) == layouts.sequential(3)
    assert layouts.get_layout([[(0, 1)], [(1, 2)]], 3, stack=2).num_pairs == 4


def test_get_layout_errors():
    with pytest.raises(ValueError, match="d=8"):
        layouts.get_layout(layouts.parallel(8), 9)
    with pytest.raises(ValueError, match="unknown layout"):
        layouts.get_layout("diagonal", 8)
    with pytest.raises(ValueError, match="need i < j"):
        layouts.get_layout([[(1, 0)]], 3)
    with pytest.raises(ValueError, match="times"):
        layouts.get_layout("parallel", 8, stack=0)
