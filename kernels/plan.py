"""The device-resident state that every backend's ops read: one quantizer's parameters on one device.

A ``Plan`` is what the torch reference (``kernels.reference``) and the Triton kernels
(``kernels.triton``) share: both take the same plan and the same tensors and return the same results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.codebook import Codebook
from kernels.packing import packed_bytes
from kernels.rotations import RotationParams


@dataclass(frozen=True)
class Plan:
    """variant, dim, bits; n_coded (padded width) and code_bytes (ceil(n_coded * bits / 8));
    ``params``: the rotation's float32 tensors on ``device`` (see ``RotationParams``);
    ``centroids`` float32 [2^bits] and ``boundaries`` float32 [2^bits - 1] on ``device``."""

    variant: str
    dim: int
    bits: int
    n_coded: int
    code_bytes: int
    device: torch.device
    params: dict[str, torch.Tensor]
    centroids: torch.Tensor
    boundaries: torch.Tensor

    @classmethod
    def build(cls, rotation: RotationParams, codebook: Codebook, device: torch.device) -> Plan:
        n_coded = rotation.n_coded
        return cls(
            variant=rotation.variant,
            dim=rotation.dim,
            bits=codebook.bits,
            n_coded=n_coded,
            code_bytes=packed_bytes(n_coded, codebook.bits),
            device=device,
            params={name: t.to(device) for name, t in rotation.tensors.items()},
            centroids=torch.from_numpy(codebook.centroids).float().to(device),
            boundaries=torch.from_numpy(codebook.boundaries).float().to(device),
        )
