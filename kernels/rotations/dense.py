"""Dense: a Haar-random d x d rotation (TurboQuant's stage 1), the quality baseline."""

from __future__ import annotations

import torch

from kernels import prng
from kernels.rotations.base import Rotation, register


@register
class Dense(Rotation):
    """matrix [dim, dim] orthogonal (Haar); y = matrix @ x."""

    name, defining, kernel = "dense", ("matrix",), "matrix"

    def generate(self, dim: int, n_coded: int, state: int) -> dict[str, torch.Tensor]:
        gaussian = torch.from_numpy(prng.normals(state, dim * dim).reshape(dim, dim))
        q, r = torch.linalg.qr(gaussian)
        # Sign fix so that Q is Haar-distributed (Mezzadri 2007): Q * sign(diag R) column-wise.
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1.0
        return {"matrix": (q * signs).float()}

    def apply(self, x, params, inverse=False):
        matrix = params["matrix"]
        return x @ matrix if inverse else x @ matrix.T

    def mixing_matrix(self, params, dim, n_coded):
        # LAPACK's QR leaves the matrix column-major: one contiguous copy here, not one per kernel call.
        return params["matrix"].contiguous()
