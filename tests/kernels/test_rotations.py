"""Rotations are orthogonal, invert exactly, and Full's 4x4 matrix equals the quaternion sandwich."""

import pytest
import torch

from kernels.rotations import (
    VARIANTS,
    coded_dim,
    fwht,
    left_matrix,
    make_rotation,
    quaternion_conjugate,
    quaternion_multiply,
    right_matrix,
    rotate,
    sandwich,
)


def _unit(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, 4, generator=g, dtype=torch.float64)
    return q / q.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dim", [2, 5, 127, 130])
def test_rotation_preserves_norms_and_inverts(variant, dim):
    params = make_rotation(variant, dim, seed=11)
    n = coded_dim(variant, dim)
    x = torch.randn(257, n)
    y = rotate(x, params.tensors, variant)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-6)
    back = rotate(y, params.tensors, variant, inverse=True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["full", "fast", "2d", "dense", "hadamard"])
def test_rotation_is_not_the_identity(variant):
    params = make_rotation(variant, 64, seed=1)
    x = torch.randn(8, coded_dim(variant, 64))
    assert (rotate(x, params.tensors, variant) - x).abs().max() > 0.1


def test_full_matrix_equals_quaternion_sandwich():
    params = make_rotation("full", 128, seed=5).tensors
    v = torch.randn(10, 32, 4, dtype=torch.float64)
    expected = sandwich(params["q_left"].double(), v, params["q_right"].double())
    got = rotate(v.reshape(10, 128).float(), params, "full").reshape(10, 32, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_fast_is_left_multiplication():
    params = make_rotation("fast", 64, seed=5).tensors
    v = torch.randn(3, 16, 4, dtype=torch.float64)
    expected = quaternion_multiply(params["q_left"].double(), v)
    got = rotate(v.reshape(3, 64).float(), params, "fast").reshape(3, 16, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_left_and_right_matrices_are_the_hamilton_product():
    a, b = _unit((50,), 1), _unit((50,), 2)
    torch.testing.assert_close((left_matrix(a) @ b.unsqueeze(-1)).squeeze(-1), quaternion_multiply(a, b))
    torch.testing.assert_close((right_matrix(b) @ a.unsqueeze(-1)).squeeze(-1), quaternion_multiply(a, b))


def test_quaternion_inverse_rotations_from_method():
    q_l, q_r, v = _unit((20,), 3), _unit((20,), 4), torch.randn(20, 4, dtype=torch.float64)
    rotated = sandwich(q_l, v, q_r)
    undone = quaternion_multiply(quaternion_multiply(quaternion_conjugate(q_l), rotated), q_r)
    torch.testing.assert_close(undone, v)


def test_fwht_matches_the_sylvester_matrix():
    n = 16
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ h.T)


def test_dense_matrix_is_orthogonal():
    m = make_rotation("dense", 96, seed=2).tensors["matrix"].double()
    torch.testing.assert_close(m @ m.T, torch.eye(96, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "variant,dim,expected",
    [("full", 5, 8), ("fast", 128, 128), ("2d", 5, 6), ("hadamard", 384, 512), ("hadamard", 2, 2),
     ("hadamard", 3, 4), ("dense", 5, 5), ("identity", 7, 7)],
)
def test_coded_dim(variant, dim, expected):
    assert coded_dim(variant, dim) == expected
