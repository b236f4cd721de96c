"""Identity: no rotation (the floor every rotation is measured against)."""

from __future__ import annotations

from kernels.rotations.base import Rotation, register


@register
class Identity(Rotation):
    name, defining, kernel = "identity", (), "none"

    def generate(self, dim, n_coded, state):
        return {}

    def apply(self, x, params, inverse=False):
        return x
