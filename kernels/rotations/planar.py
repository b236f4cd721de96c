"""2D: a planar rotation by theta_p per pair of coordinates (the paper's cheapest variant)."""

from __future__ import annotations

import math

import torch

from kernels import prng
from kernels.rotations.base import Rotation, register


@register
class Planar(Rotation):
    """theta [g] uniform in [0, 2 pi); cos / sin [g] derived."""

    name, defining, kernel, block = "2d", ("theta",), "pairs", 2

    def generate(self, dim: int, n_coded: int, state: int) -> dict[str, torch.Tensor]:
        theta = torch.from_numpy(2.0 * math.pi * prng.uniforms(state, n_coded // 2))
        return {"theta": theta.float(), "cos": torch.cos(theta).float(), "sin": torch.sin(theta).float()}

    def apply(self, x, params, inverse=False):
        n, width = x.shape
        pairs = x.reshape(n, width // 2, 2)
        cos, sin = params["cos"], params["sin"]
        if inverse:
            sin = -sin
        first = cos * pairs[..., 0] - sin * pairs[..., 1]
        second = sin * pairs[..., 0] + cos * pairs[..., 1]
        return torch.stack([first, second], -1).reshape(n, width)
