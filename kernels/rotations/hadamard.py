"""Hadamard: random signs, then the fast Walsh-Hadamard transform over dim padded to a power of two."""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels import prng
from kernels.rotations.base import Rotation, register


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dimension (a power of two)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack([pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]], -2)
        h *= 2
    return x.reshape(*lead, n)


@register
class Hadamard(Rotation):
    """signs [n_coded] of +-1 (the top bits of the stream); y = H (signs * x) / sqrt(n_coded)."""

    name, defining, kernel = "hadamard", ("signs",), "hadamard"

    def coded_dim(self, dim: int) -> int:
        return 1 << max(1, (dim - 1).bit_length())

    def generate(self, dim: int, n_coded: int, state: int) -> dict[str, torch.Tensor]:
        top_bits = prng.splitmix64(state, n_coded) >> np.uint64(63)
        return {"signs": torch.from_numpy(1.0 - 2.0 * top_bits.astype(np.float64)).float()}

    def apply(self, x, params, inverse=False):
        scale = 1.0 / math.sqrt(x.shape[-1])
        if inverse:
            return fwht(x) * scale * params["signs"]
        return fwht(x * params["signs"]) * scale

    def mixing_matrix(self, params, dim, n_coded):
        """A[i, j] = H[i, j] * signs[j] / sqrt(P) (Sylvester H, as ``fwht``), columns j < dim only (the
        padding is zero); built in float64 from the parity of i & j."""
        idx = torch.arange(n_coded)
        parity = torch.zeros(n_coded, n_coded, dtype=torch.int64)
        bits = idx[:, None] & idx[None, :]
        while bool(bits.any()):
            parity ^= bits & 1
            bits = bits >> 1
        hadamard = 1.0 - 2.0 * parity.double()
        signs = params["signs"].detach().double().cpu()
        matrix = hadamard * signs[None, :] / math.sqrt(n_coded)
        return matrix[:, :dim].float().contiguous().to(params["signs"].device)
