"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector in R^n.

The law of such a coordinate z is f_n(z) proportional to (1 - z^2)^((n - 3) / 2) on [-1, 1] (close to
N(0, 1/n) for large n). With z = sin(phi) it becomes cos(phi)^(n - 2) d(phi) on [-pi/2, pi/2], which is
smooth for every n >= 2 (for n = 2 the arcsine law's endpoint singularities disappear), so the CDF and
the partial first moment are cumulative sums on a uniform phi grid. Lloyd's iteration then alternates
"boundaries = midpoints of centroids" and "centroid = conditional mean of its cell" until nothing moves.

n is the number of coded coordinates (the padded dimension), since that is the dimension of the unit
vector whose coordinates are quantized. Codebooks are computed once per (n, bits) in float64 and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

_GRID_POINTS = 1 << 18  # phi grid; the table's 4 significant digits need far fewer (checked at 2^16)
_MAX_ITERATIONS = 20_000
_TOLERANCE = 1e-13


@dataclass(frozen=True)
class Codebook:
    """Sorted centroids c_0 < ... < c_{K-1} (float64 [K], K = 2^bits), boundaries (float64 [K-1],
    t_k = (c_k + c_{k+1}) / 2) and the expected squared error per coordinate (float64)."""

    n: int
    bits: int
    centroids: np.ndarray
    boundaries: np.ndarray
    distortion: float

    @property
    def vector_distortion(self) -> float:
        """Expected ||x - x_hat||^2 of a unit vector: n coordinates times the per-coordinate error."""
        return self.n * self.distortion


@cache
def _law_tables(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z grid (ascending), CDF F(z) and partial first moment M(z) = int_{-1}^{z} t f(t) dt."""
    phi = np.linspace(-np.pi / 2, np.pi / 2, _GRID_POINTS)
    with np.errstate(divide="ignore"):
        log_density = (n - 2) * np.log(np.cos(phi))  # -inf at the ends for n > 2: exp() gives 0
    density = np.exp(log_density - log_density.max())
    z = np.sin(phi)
    # Trapezoid cumulative integrals over phi of the density and of z * density.
    step = phi[1] - phi[0]
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) * step / 2)])
    weighted = z * density
    moment = np.concatenate([[0.0], np.cumsum((weighted[1:] + weighted[:-1]) * step / 2)])
    total = cdf[-1]
    return z, cdf / total, moment / total


@cache
def lloyd_max(n: int, bits: int) -> Codebook:
    """The Lloyd-Max codebook of 2^bits levels for the coordinate law in dimension n (n >= 2)."""
    if n < 2:
        raise ValueError(f"codebook dimension must be >= 2, got {n}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    z, cdf, moment = _law_tables(n)
    levels = 1 << bits
    # Start from the law's quantiles: cell k holds probability 1/levels.
    quantile_edges = np.interp(np.linspace(0, 1, levels + 1), cdf, z)
    centroids = _cell_means(quantile_edges, z, cdf, moment)
    for _ in range(_MAX_ITERATIONS):
        edges = np.concatenate([[-1.0], (centroids[1:] + centroids[:-1]) / 2, [1.0]])
        updated = _cell_means(edges, z, cdf, moment)
        updated = (updated - updated[::-1]) / 2  # the law is symmetric: keep the codebook exactly so
        moved = np.max(np.abs(updated - centroids))
        centroids = updated
        if moved < _TOLERANCE:
            break
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    edges = np.concatenate([[-1.0], boundaries, [1.0]])
    mass = np.diff(np.interp(edges, z, cdf))
    # For centroid-condition codebooks E(z - c)^2 = E z^2 - sum_k p_k c_k^2, and E z^2 = 1/n exactly.
    distortion = 1.0 / n - float(np.sum(mass * centroids**2))
    return Codebook(n=n, bits=bits, centroids=centroids, boundaries=boundaries, distortion=distortion)


def _cell_means(edges: np.ndarray, z: np.ndarray, cdf: np.ndarray, moment: np.ndarray) -> np.ndarray:
    mass = np.diff(np.interp(edges, z, cdf))
    first = np.diff(np.interp(edges, z, moment))
    midpoints = (edges[1:] + edges[:-1]) / 2
    safe = mass > 1e-300
    return np.where(safe, first / np.where(safe, mass, 1.0), midpoints)
