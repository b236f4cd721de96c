"""Exact-law Lloyd-Max codebooks against METHOD.md's table."""

import numpy as np
import pytest

from kernels.codebook import lloyd_max

# METHOD.md: expected per-vector squared error E||x - x_hat||^2 of unit vectors, by d and bits.
METHOD_TABLE = {
    64: (0.3584, 0.1145, 0.03339, 0.00913),
    128: (0.3609, 0.1160, 0.03397, 0.00931),
    256: (0.3621, 0.1167, 0.03426, 0.00941),
    512: (0.3628, 0.1171, 0.03440, 0.00945),
}


@pytest.mark.parametrize("dim", sorted(METHOD_TABLE))
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_matches_method_table_within_half_a_percent(dim, bits):
    expected = METHOD_TABLE[dim][bits - 1]
    assert lloyd_max(dim, bits).vector_distortion == pytest.approx(expected, rel=0.005)


@pytest.mark.parametrize("dim", [2, 3, 5, 130, 4096])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_codebook_is_sorted_symmetric_with_midpoint_boundaries(dim, bits):
    book = lloyd_max(dim, bits)
    c = book.centroids
    assert len(c) == 2**bits and np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-15)
    np.testing.assert_allclose(book.boundaries, (c[1:] + c[:-1]) / 2)
    assert -1 < c[0] and c[-1] < 1
    # The distortion is positive and below the variance of a coordinate (1/dim): the codebook helps.
    assert 0 < book.distortion < 1.0 / dim


def test_one_bit_codebook_is_the_conditional_mean_in_closed_form():
    # For 1 bit the centroid is E[|z|], which for d = 3 (uniform law on [-1, 1]) is 1/2.
    np.testing.assert_allclose(lloyd_max(3, 1).centroids, [-0.5, 0.5], atol=1e-6)


def test_monte_carlo_distortion_of_the_codebook_agrees():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 64))
    z = (x / np.linalg.norm(x, axis=1, keepdims=True)).reshape(-1)
    book = lloyd_max(64, 2)
    nearest = book.centroids[np.searchsorted(book.boundaries, z)]
    assert np.mean((z - nearest) ** 2) == pytest.approx(book.distortion, rel=0.01)


def test_codebooks_are_cached():
    assert lloyd_max(128, 3) is lloyd_max(128, 3)
