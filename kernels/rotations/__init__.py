"""Rotations as torch ops (the reference), one variant a module, all read through one registry.

    ROTATIONS["full"]            the Rotation object of a variant (kernels.rotations.base.Rotation)
    VARIANTS                     their names, in variant-id order
    make_rotation(v, dim, seed)  its parameters (RotationParams), exactly as docs/FORMAT.md specifies
    rotate(x, params, v)         the torch reference of the rotation or its inverse

Adding a variant is one new module here with a ``@register`` class (modules are discovered, not listed),
plus its tests and its docs/FORMAT.md section.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import torch

from kernels import prng
from kernels.rotations.base import ROTATIONS, Rotation, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

# Re-exported for callers of the former single module.
from kernels.rotations.hadamard import fwht  # noqa: E402
from kernels.rotations.quaternion import (  # noqa: E402
    left_matrix,
    quaternion_conjugate,
    quaternion_multiply,
    right_matrix,
    sandwich,
)

VARIANTS: tuple[str, ...] = tuple(ROTATIONS)
DEFINING_PARAMS: dict[str, tuple[str, ...]] = {name: r.defining for name, r in ROTATIONS.items()}

__all__ = [
    "DEFINING_PARAMS", "ROTATIONS", "VARIANTS", "Rotation", "RotationParams", "coded_dim", "fwht", "get",
    "left_matrix", "make_rotation", "quaternion_conjugate", "quaternion_multiply", "register", "right_matrix",
    "rotate", "sandwich",
]


def get(variant: str) -> Rotation:
    """The registered rotation of ``variant`` (ValueError naming the allowed ones otherwise)."""
    try:
        return ROTATIONS[variant]
    except (KeyError, TypeError):
        raise ValueError(f"variant must be one of {', '.join(ROTATIONS)}; got {variant!r}") from None


def coded_dim(variant: str, dim: int) -> int:
    """How many coordinates are coded per vector: dim padded to the variant's block (4 for full/fast,
    2 for 2d, the next power of two for hadamard, none for dense and identity)."""
    return get(variant).coded_dim(dim)


@dataclass(frozen=True)
class RotationParams:
    """The parameters of one rotation, float32 on the CPU (each variant's module says which)."""

    variant: str
    dim: int
    seed: int
    tensors: dict[str, torch.Tensor]

    @property
    def rotation(self) -> Rotation:
        return get(self.variant)

    @property
    def n_coded(self) -> int:
        return coded_dim(self.variant, self.dim)

    def hashed_values(self) -> list[torch.Tensor]:
        """The tensors that define the rotation, in the order the fingerprint hashes them."""
        return [self.tensors[name] for name in self.rotation.defining]


def make_rotation(variant: str, dim: int, seed: int) -> RotationParams:
    """Generate the rotation parameters of (variant, dim, seed) exactly as docs/FORMAT.md specifies."""
    rotation = get(variant)
    state = prng.stream_state(rotation.variant_id, dim, seed)
    tensors = rotation.generate(dim, rotation.coded_dim(dim), state)
    return RotationParams(variant=variant, dim=dim, seed=seed, tensors=tensors)


def rotate(x: torch.Tensor, params: dict[str, torch.Tensor], variant: str, inverse: bool = False) -> torch.Tensor:
    """Apply the rotation (or its inverse) to float32 x [N, n_coded]; returns float32 [N, n_coded].

    ``params`` holds the variant's tensors already on x's device.
    """
    return get(variant).apply(x, params, inverse)
