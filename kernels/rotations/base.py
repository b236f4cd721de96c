"""The rotation contract: what one variant is, and the registry every list of variants is read from.

A variant is one ``Rotation`` subclass in one module of this package, registered by ``@register``. Its
class says everything the rest of the project needs: the stable id that seeds its parameters (docs/FORMAT.md
pins it), how wide its coded vector is, which parameters define it (the fingerprint hashes them in that
order), how to generate them from the seeded stream, the torch reference of the rotation and its inverse,
and which Triton kernel family runs it. The reference, the Triton launchers, the fingerprint, the service's
allowlists and ``/quantizer`` export, and the benches all iterate ``ROTATIONS``; the torch-free clients read
the names from the wire format's table (``isoquant_format.VARIANTS``), which also holds each variant's id.

Every rotation acts on the last dimension of a float32 tensor [N, n_coded] that is already zero-padded to
``coded_dim(dim)``. Parameters are generated in float64 on the CPU and stored as float32.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from isoquant_format import VARIANT_IDS

# The Triton kernel families (kernels/triton): "blocks" (a 4x4 matrix per block of 4 coordinates), "pairs"
# (a planar rotation per pair), "hadamard" (random signs and an in-register Walsh-Hadamard transform),
# "none" (no rotation) run in the fused kernels; "matrix" runs y = x A^T with
# A [n_coded, dim] from ``Rotation.mixing_matrix`` through tl.dot, which serves any orthogonal rotation.
KernelFamily = Literal["blocks", "pairs", "none", "hadamard", "kronecker", "matrix"]

ROTATIONS: dict[str, Rotation] = {}


class Rotation:
    """One variant (subclass, register with ``@register``). Subclasses set the class attributes and
    implement ``generate`` and ``apply``; ``coded_dim`` and ``mixing_matrix`` have general defaults."""

    name: ClassVar[str]  # its stable id is isoquant_format.VARIANT_IDS[name] (the wire format's table)
    defining: ClassVar[tuple[str, ...]]  # parameters the fingerprint hashes, in this order
    kernel: ClassVar[KernelFamily]
    block: ClassVar[int] = 1  # dim is zero-padded to a multiple of this

    @property
    def variant_id(self) -> int:
        """The stable id in the PRNG stream tag (docs/FORMAT.md): the wire format's table holds it."""
        return VARIANT_IDS[self.name]

    def kernel_for(self, dim: int) -> KernelFamily:
        """The kernel family that runs this rotation at ``dim`` (default: ``kernel`` at every dim)."""
        return self.kernel

    def coded_dim(self, dim: int) -> int:
        """Coordinates coded per vector: dim padded to the variant's block."""
        return -(-dim // self.block) * self.block

    def generate(self, dim: int, n_coded: int, state: int) -> dict[str, torch.Tensor]:
        """The parameters (float32, CPU) from the SplitMix64 stream that starts at ``state``: the
        ``defining`` ones and any derived ones the apply or the kernels read."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], inverse: bool = False) -> torch.Tensor:
        """The rotation (or its inverse) of float32 x [N, n_coded], params on x's device -> [N, n_coded]."""
        raise NotImplementedError

    def mixing_matrix(self, params: dict[str, torch.Tensor], dim: int, n_coded: int) -> torch.Tensor:
        """float32 [n_coded, dim] A with rotate(pad(x)) = x @ A^T, on the params' device: the form the
        "matrix" kernel family reads. Default: the rotation applied to the padded identity, in float64."""
        eye = torch.eye(dim, n_coded, dtype=torch.float64)
        cpu = {name: t.detach().double().cpu() for name, t in params.items()}
        return self.apply(eye, cpu).t().float().contiguous()

    def __repr__(self) -> str:
        return f"<rotation {self.name!r} id={self.variant_id} kernel={self.kernel}>"


def register(cls: type[Rotation]) -> type[Rotation]:
    """Class decorator: add one instance of the variant to ``ROTATIONS`` (kept sorted by variant id)."""
    rotation = cls()
    if rotation.name not in VARIANT_IDS:
        raise ValueError(f"rotation {rotation.name!r} has no id: add it to isoquant_format.VARIANT_IDS (FORMAT.md)")
    clash = [r.name for r in ROTATIONS.values() if r.variant_id == rotation.variant_id or r.name == rotation.name]
    if clash:
        raise ValueError(f"rotation {rotation.name!r} (id {rotation.variant_id}) clashes with {clash}")
    ROTATIONS[rotation.name] = rotation
    ordered = sorted(ROTATIONS.values(), key=lambda r: r.variant_id)
    ROTATIONS.clear()
    ROTATIONS.update((r.name, r) for r in ordered)
    return cls
