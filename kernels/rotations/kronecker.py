"""Kronecker: global mixing for any dim without padding. For dim = m * 2^k with m odd, random signs, then a
Walsh-Hadamard transform within each of the m contiguous blocks of 2^k coordinates and a Haar-random m x m
rotation Q across the blocks: y = (Q kron H) (signs * x) / sqrt(2^k). Every output coordinate mixes every
input coordinate, as with a dense rotation, for log2(2^k) + m operations a coordinate instead of dim, and
the coded width is dim itself (hadamard pads 384 to 512)."""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels import prng
from kernels.rotations.base import Rotation, register
from kernels.rotations.hadamard import fwht

_MASK64 = (1 << 64) - 1


def split_dim(dim: int) -> tuple[int, int]:
    """(m, 2^k) with dim = m * 2^k and m odd."""
    power = dim & -dim
    return dim // power, power


@register
class Kronecker(Rotation):
    """signs [dim] of +-1 (the top bits of the first dim outputs of the stream), mix [m, m] orthogonal (Haar,
    from normals continuing the stream after those outputs)."""

    name, defining, kernel = "kronecker", ("signs", "mix"), "kronecker"

    def kernel_for(self, dim: int) -> str:
        """The fused kernels while the across-block mix is small: it is computed as a broadcast product of
        (tile width / block)^2 x block values a row, so 4 blocks (dim 2^k or 3 x 2^k) or tiles of <= 64
        columns; other dims (m = 5, 7, ...) run in the matrix kernels."""
        width = 1 << max(3, (dim - 1).bit_length())
        _, block = split_dim(dim)
        return "kronecker" if width // block <= 4 or width <= 64 else "matrix"

    def generate(self, dim: int, n_coded: int, state: int) -> dict[str, torch.Tensor]:
        m, _ = split_dim(dim)
        top_bits = prng.splitmix64(state, dim) >> np.uint64(63)
        signs = torch.from_numpy(1.0 - 2.0 * top_bits.astype(np.float64))
        # Outputs dim, dim + 1, ... of the stream are those of a stream whose state is dim steps further.
        gaussian = torch.from_numpy(prng.normals((state + dim * prng.GOLDEN) & _MASK64, m * m).reshape(m, m))
        q, r = torch.linalg.qr(gaussian)
        diagonal = torch.sign(torch.diagonal(r))
        diagonal[diagonal == 0] = 1.0
        return {"signs": signs.float(), "mix": (q * diagonal).float()}

    def apply(self, x, params, inverse=False):
        n, dim = x.shape
        m, block = split_dim(dim)
        scale = 1.0 / math.sqrt(block)
        mix = params["mix"].to(x.dtype)
        if inverse:
            z = torch.einsum("kj,nkb->njb", mix, x.reshape(n, m, block))
            return (fwht(z) * scale).reshape(n, dim) * params["signs"].to(x.dtype)
        z = fwht((x * params["signs"].to(x.dtype)).reshape(n, m, block)) * scale
        return torch.einsum("jk,nkb->njb", mix, z).reshape(n, dim)
