"""The pure-PyTorch reference against dense matrices built block by block (float64)."""

import math

import pytest
import torch

from qgoft import layouts
from qgoft import reference as ref

DS = [2, 3, 5, 8, 13, 64, 100]
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The many small dense matmuls here gain nothing from threads and slow down a lot on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_custom(d, generator):
    """Two layers of random disjoint pairs (a layout no builder produces)."""
    result = []
    for _ in range(2):
        perm = torch.randperm(d, generator=generator).tolist()
        count = max(1, d // 3)
        result.append([tuple(sorted(perm[2 * k:2 * k + 2])) for k in range(count)])
    return layouts.custom(d, result)


def make_layout(kind, d):
    if kind == "parallel":
        return layouts.parallel(d)
    if kind == "sequential":
        return layouts.sequential(d)
    if kind == "butterfly":
        return layouts.butterfly(d)
    if kind == "parallel*2":
        return layouts.stack(layouts.parallel(d), 2)
    if kind == "custom":
        return random_custom(d, torch.Generator().manual_seed(d))
    raise AssertionError(kind)


LAYOUT_KINDS = ["parallel", "sequential", "butterfly", "parallel*2", "custom"]


def random_params(method, num_pairs, generator, dtype=F64):
    if method == "goft":
        return torch.randn(num_pairs, generator=generator, dtype=dtype) * 2.0
    return torch.eye(2, dtype=dtype) + 0.5 * torch.randn(num_pairs, 2, 2, generator=generator, dtype=dtype)


def chain(method, x, params, layout, scale=None, **kwargs):
    pairs, offsets = layout.pairs_tensor(), layout.layer_offsets_tensor()
    if method == "goft":
        return ref.givens_chain_reference(x, params, pairs, offsets, scale, **kwargs)
    return ref.quasi_givens_chain_reference(x, params, pairs, offsets, scale, **kwargs)


def adjoint(method, g, params, layout, scale=None, **kwargs):
    pairs, offsets = layout.pairs_tensor(), layout.layer_offsets_tensor()
    if method == "goft":
        return ref.givens_chain_adjoint_reference(g, params, pairs, offsets, scale, **kwargs)
    return ref.quasi_givens_chain_adjoint_reference(g, params, pairs, offsets, scale, **kwargs)


def dense(method, params, layout):
    blocks = ref.blocks_from_angles(params) if method == "goft" else params
    return ref.dense_chain_matrix(blocks, layout.pairs_tensor(), layout.layer_offsets_tensor(), layout.d)


def givens_matrix(d, i, j, theta):
    """G(i, j; theta) of docs/MATH.md Sec. 2, written out entry by entry."""
    g = torch.eye(d, dtype=F64)
    g[i, i] = math.cos(theta)
    g[i, j] = -math.sin(theta)
    g[j, i] = math.sin(theta)
    g[j, j] = math.cos(theta)
    return g


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------

def test_blocks_from_angles():
    angles = torch.tensor([0.0, 0.3, -1.2, math.pi], dtype=F64)
    blocks = ref.blocks_from_angles(angles)
    assert blocks.shape == (4, 2, 2)
    for p, theta in enumerate(angles.tolist()):
        expected = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=F64)
        torch.testing.assert_close(blocks[p], expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        ref.blocks_from_angles(torch.zeros(2, 2))


def test_dense_matrix_matches_paper_product():
    # sequential(4): R = G(0,1) G(1,2) G(2,3), explicit matrices, product in layer order.
    thetas = [0.3, -0.7, 1.1]
    layout = layouts.sequential(4)
    expected = givens_matrix(4, 0, 1, thetas[0]) @ givens_matrix(4, 1, 2, thetas[1]) @ givens_matrix(4, 2, 3, thetas[2])
    got = dense("goft", torch.tensor(thetas, dtype=F64), layout)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    # parallel(4): layer 1 = G(0,1) G(2,3), layer 2 = G(0,2)
    layout = layouts.parallel(4)
    expected = givens_matrix(4, 0, 1, thetas[0]) @ givens_matrix(4, 2, 3, thetas[1]) @ givens_matrix(4, 0, 2, thetas[2])
    torch.testing.assert_close(dense("goft", torch.tensor(thetas, dtype=F64), layout), expected, rtol=0, atol=1e-15)


def test_single_rotation_convention():
    # x' = R^T x: with R = G(0, 1; theta), e_0 maps to (cos, -sin) and e_1 to (sin, cos).
    theta = 0.4
    layout = layouts.parallel(2)
    out = chain("goft", torch.eye(2, dtype=F64), torch.tensor([theta], dtype=F64), layout)
    expected = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    # quasi-Givens block [[a1, b1], [a2, b2]]: x_i <- a1 x_i + a2 x_j, x_j <- b1 x_i + b2 x_j
    blocks = torch.tensor([[[2.0, 3.0], [5.0, 7.0]]], dtype=F64)
    out = chain("qgoft", torch.tensor([[1.0, 10.0]], dtype=F64), blocks, layout)
    torch.testing.assert_close(out, torch.tensor([[2.0 + 50.0, 3.0 + 70.0]], dtype=F64), rtol=0, atol=0)


def test_dense_matrix_rejects_overlapping_pairs():
    pairs = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    offsets = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="overlaps"):
        ref.dense_chain_matrix(torch.eye(2).expand(2, 2, 2), pairs, offsets, 3)


# ------------------------------------------------------------------------------------------------
# vectorised chain == dense product
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("method", ["goft", "qgoft"])
@pytest.mark.parametrize("with_scale", [False, True])
def test_chain_matches_dense(d, kind, method, with_scale):
    gen = torch.Generator().manual_seed(1000 * d + 7 * len(kind) + with_scale)
    layout = make_layout(kind, d)
    params = random_params(method, layout.num_pairs, gen)
    scale = (0.5 + torch.rand(d, generator=gen, dtype=F64)) if with_scale else None
    x = torch.randn(3, 4, d, generator=gen, dtype=F64)
    R = dense(method, params, layout)
    expected = x @ R
    if scale is not None:
        expected = expected * scale
    out = chain(method, x, params, layout, scale)
    assert out.shape == x.shape and out.dtype == F64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # column form: x' = S R^T x
    col = x.reshape(-1, d).T
    col_expected = R.T @ col
    if scale is not None:
        col_expected = scale[:, None] * col_expected
    torch.testing.assert_close(out.reshape(-1, d).T, col_expected, rtol=1e-10, atol=1e-10)
    # adjoint: g -> g S R^T, and <chain(x), g> == <x, adjoint(g)>
    g = torch.randn(3, 4, d, generator=gen, dtype=F64)
    adj = adjoint(method, g, params, layout, scale)
    RS = R if scale is None else R * scale
    torch.testing.assert_close(adj, g @ RS.T, rtol=1e-10, atol=1e-10)
    lhs, rhs = (out * g).sum(), (x * adj).sum()
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs.item()))


@pytest.mark.parametrize("shape", [(7,), (1, 7), (5, 7), (2, 3, 7), (2, 1, 3, 7), (0, 7), (3, 0, 7)])
@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_leading_dims(shape, method):
    gen = torch.Generator().manual_seed(3)
    layout = layouts.parallel(7)
    params = random_params(method, layout.num_pairs, gen)
    x = torch.randn(*shape, generator=gen, dtype=F64)
    out = chain(method, x, params, layout)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x @ dense(method, params, layout), rtol=1e-12, atol=1e-12)


def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(4)
    layout = layouts.butterfly(8)
    params = random_params("qgoft", layout.num_pairs, gen)
    x = torch.randn(8, 6, generator=gen, dtype=F64).T  # (6, 8), non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(chain("qgoft", x, params, layout), x @ dense("qgoft", params, layout),
                               rtol=1e-12, atol=1e-12)


def test_input_is_not_modified():
    gen = torch.Generator().manual_seed(5)
    layout = layouts.parallel(9)
    x = torch.randn(4, 9, generator=gen, dtype=F64)
    before = x.clone()
    chain("goft", x, random_params("goft", 8, gen), layout)
    adjoint("qgoft", x, random_params("qgoft", 8, gen), layout)
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["parallel", "butterfly", "custom"])
@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_gradients_match_dense(kind, method):
    gen = torch.Generator().manual_seed(11)
    d = 13
    layout = make_layout(kind, d)
    params = random_params(method, layout.num_pairs, gen).requires_grad_()
    scale = (0.5 + torch.rand(d, generator=gen, dtype=F64)).requires_grad_()
    x = torch.randn(6, d, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(6, d, generator=gen, dtype=F64)

    loss = (chain(method, x, params, layout, scale) * weight).sum()
    grads = torch.autograd.grad(loss, (x, params, scale))
    loss_dense = ((x @ dense(method, params, layout) * scale) * weight).sum()
    grads_dense = torch.autograd.grad(loss_dense, (x, params, scale))
    for got, expected in zip(grads, grads_dense):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_gradcheck(method):
    gen = torch.Generator().manual_seed(12)
    layout = layouts.stack(layouts.parallel(5), 2)
    params = random_params(method, layout.num_pairs, gen).requires_grad_()
    scale = (0.5 + torch.rand(5, generator=gen, dtype=F64)).requires_grad_()
    x = torch.randn(3, 5, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: chain(method, a, b, layout, c), (x, params, scale))
    assert torch.autograd.gradcheck(lambda a, b, c: adjoint(method, a, b, layout, c), (x, params, scale))


# ------------------------------------------------------------------------------------------------
# orthogonality (docs/MATH.md Sec. 4-6)
# ------------------------------------------------------------------------------------------------

ORTHO_LAYOUTS = ["parallel", "sequential", "butterfly", "parallel*2", "custom"]


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", ORTHO_LAYOUTS)
def test_goft_is_orthogonal(d, kind):
    gen = torch.Generator().manual_seed(d)
    layout = make_layout(kind, d)
    angles = torch.randn(layout.num_pairs, generator=gen, dtype=F64) * 3.0
    eye = torch.eye(d, dtype=F64)
    R = chain("goft", eye, angles, layout)  # chain applied to the identity rows = R
    assert (R.T @ R - eye).abs().max() < 1e-12
    assert (R @ R.T - eye).abs().max() < 1e-12
    assert abs(torch.linalg.det(R).item() - 1.0) < 1e-10  # a product of rotations lies in SO(d)
    torch.testing.assert_close(R, dense("goft", angles, layout), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", ORTHO_LAYOUTS)
def test_qgoft_with_orthogonal_blocks_is_orthogonal(d, kind):
    gen = torch.Generator().manual_seed(100 + d)
    layout = make_layout(kind, d)
    theta = torch.randn(layout.num_pairs, generator=gen, dtype=F64) * 3.0
    c, s = torch.cos(theta), torch.sin(theta)
    rotations = torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)
    reflections = torch.stack((torch.stack((c, s), -1), torch.stack((s, -c), -1)), -2)
    use_reflection = torch.rand(layout.num_pairs, generator=gen) < 0.5
    blocks = torch.where(use_reflection[:, None, None], reflections, rotations)
    eye = torch.eye(d, dtype=F64)
    R = chain("qgoft", eye, blocks, layout)
    assert (R.T @ R - eye).abs().max() < 1e-12
    assert ref.orthogonality_penalty_reference(blocks) < 1e-24
    # and free blocks are not orthogonal: the check above can fail
    free = blocks + 0.2 * torch.randn(blocks.shape, generator=gen, dtype=F64)
    R_free = chain("qgoft", eye, free, layout)
    assert (R_free.T @ R_free - eye).abs().max() > 1e-3


@pytest.mark.parametrize("d", [4, 6, 8, 13, 16, 33])
def test_true_pairing_at_stride(d):
    """docs/MATH.md Sec. 9: each angle of layer r rotates exactly its pair (2^r k, 2^r k + 2^(r-1)) and nothing
    else (the original code paired p with p+1 in every layer: a shear for r >= 2)."""
    layout = layouts.parallel(d)
    eye = torch.eye(d, dtype=F64)
    p = 0
    for r, layer in enumerate(layout.layers, start=1):
        for i, j in layer:
            assert j - i == 2 ** (r - 1)
            angles = torch.zeros(layout.num_pairs, dtype=F64)
            angles[p] = 0.7
            R = chain("goft", eye, angles, layout)
            torch.testing.assert_close(R, givens_matrix(d, i, j, 0.7), rtol=0, atol=1e-15)
            p += 1
    assert p == d - 1


def test_d8_random_angles_each_layer_is_a_product_of_true_rotations():
    """docs/MATH.md Sec. 9 at d = 8 (where the original shear had |A^T A - I| ~ 2.8): with all angles random, the
    whole chain is orthogonal and each layer equals the product of G(i, i + 2^(r-1); theta) over its pairs."""
    gen = torch.Generator().manual_seed(8)
    layout = layouts.parallel(8)
    angles = torch.randn(7, generator=gen, dtype=F64) * 2.0
    eye = torch.eye(8, dtype=F64)
    R = chain("goft", eye, angles, layout)
    assert (R.T @ R - eye).abs().max() < 1e-12
    offsets = layout.layer_offsets_tensor().tolist()
    product = eye
    for r, layer in enumerate(layout.layers, start=1):
        single = layouts.custom(8, [layer])
        layer_angles = angles[offsets[r - 1]:offsets[r]]
        got = chain("goft", eye, layer_angles, single)
        expected = eye
        for (i, j), theta in zip(layer, layer_angles.tolist()):
            assert j == i + 2 ** (r - 1)
            expected = expected @ givens_matrix(8, i, j, theta)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
        product = product @ expected
    torch.testing.assert_close(R, product, rtol=0, atol=1e-14)


@pytest.mark.parametrize("d", [3, 5, 7, 9, 13, 99, 101])
@pytest.mark.parametrize("kind", ["parallel", "sequential", "butterfly"])
def test_odd_d(d, kind):
    gen = torch.Generator().manual_seed(d)
    layout = make_layout(kind, d)
    angles = torch.randn(layout.num_pairs, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(4, d, generator=gen, dtype=F64, requires_grad=True)
    out = chain("goft", x, angles, layout)
    out.square().sum().backward()
    # a rotation preserves row norms; the last index d-1 is rotated too (no feature left out)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    assert any(d - 1 in pair for pair in layout.pairs)
    assert angles.grad is not None and x.grad is not None


# ------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_low_precision_computes_in_float32(dtype, method):
    gen = torch.Generator().manual_seed(21)
    layout = layouts.parallel(16)
    params = random_params(method, layout.num_pairs, gen, dtype=torch.float32)
    scale = 0.5 + torch.rand(16, generator=gen)
    x = torch.randn(5, 16, generator=gen).to(dtype)
    out = chain(method, x, params, layout, scale)
    assert out.dtype == dtype
    expected = chain(method, x.float(), params, layout, scale).to(dtype)
    assert torch.equal(out, expected)
    exact = chain(method, x.double(), params.double(), layout, scale.double())
    tol = 4 * torch.finfo(dtype).eps * exact.abs().max()
    assert (out.double() - exact).abs().max() <= tol
    back = adjoint(method, x, params, layout, scale)
    assert back.dtype == dtype
    assert torch.equal(back, adjoint(method, x.float(), params, layout, scale).to(dtype))


def test_float32_params_with_float64_x_compute_in_float64():
    gen = torch.Generator().manual_seed(22)
    layout = layouts.parallel(10)
    angles = torch.randn(9, generator=gen)
    x = torch.randn(3, 10, generator=gen, dtype=F64)
    out = chain("goft", x, angles, layout)
    assert out.dtype == F64
    assert torch.equal(out, chain("goft", x, angles.double(), layout))


def test_explicit_compute_dtype():
    gen = torch.Generator().manual_seed(23)
    layout = layouts.parallel(10)
    blocks = random_params("qgoft", 9, gen)
    x = torch.randn(3, 10, generator=gen, dtype=torch.float32)
    out = chain("qgoft", x, blocks, layout, compute_dtype=F64)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (x.double() @ dense("qgoft", blocks, layout)).float(), rtol=2e-7, atol=1e-7)
    out32 = chain("qgoft", x, blocks, layout)  # params cast to float32
    torch.testing.assert_close(out32, out, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------

def test_input_validation():
    layout = layouts.parallel(6)
    pairs, offsets = layout.pairs_tensor(), layout.layer_offsets_tensor()
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="blocks"):
        ref.quasi_givens_chain_reference(x, torch.zeros(4, 2, 2), pairs, offsets)
    with pytest.raises(ValueError, match="scale"):
        ref.givens_chain_reference(x, torch.zeros(5), pairs, offsets, torch.ones(5))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ref.givens_chain_reference(torch.randn(2, 4), torch.zeros(5), pairs, offsets)
    with pytest.raises(ValueError, match="layer_offsets"):
        ref.givens_chain_reference(x, torch.zeros(5), pairs, torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="pairs"):
        ref.givens_chain_reference(x, torch.zeros(5), pairs.flatten(), offsets)


# ------------------------------------------------------------------------------------------------
# orthogonality penalty
# ------------------------------------------------------------------------------------------------

def test_orthogonality_penalty_reference():
    gen = torch.Generator().manual_seed(31)
    blocks = torch.randn(7, 2, 2, generator=gen, dtype=F64, requires_grad=True)
    penalty = ref.orthogonality_penalty_reference(blocks)
    expected = sum(
        (blocks[p, 0, 0] * blocks[p, 0, 1] + blocks[p, 1, 0] * blocks[p, 1, 1]) ** 2 for p in range(7))
    torch.testing.assert_close(penalty, expected, rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad(penalty, blocks)
    with torch.no_grad():
        inner = (blocks[:, :, 0] * blocks[:, :, 1]).sum(-1)
        expected_grad = torch.stack((2 * inner[:, None] * blocks[:, :, 1], 2 * inner[:, None] * blocks[:, :, 0]), -1)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-14, atol=1e-14)
    assert ref.orthogonality_penalty_reference(ref.blocks_from_angles(torch.randn(9, dtype=F64))) < 1e-28
    assert ref.orthogonality_penalty_reference(torch.eye(2).expand(3, 2, 2)) == 0
