"""The device-resident state that every backend's ops read: one quantizer's parameters on one device.

A ``Plan`` is what the torch reference (``kernels.reference``) and the Triton kernels (``kernels.triton``)
share: both take the same plan and the same tensors and return the same results. It is the only thing the
ops read: the rotation's parameters, the codebook, and the forms the kernels need (block coefficients
coefficient-major, a mixing matrix, whether the symmetric code search applies), each derived once per plan
on first use and kept on the plan itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from kernels.codebook import Codebook
from kernels.packing import packed_bytes
from kernels.rotations import ROTATIONS, Rotation, RotationParams


@dataclass(frozen=True)
class Plan:
    """variant, dim, bits; n_coded (padded width) and code_bytes (ceil(n_coded * bits / 8));
    ``params``: the rotation's float32 tensors on ``device`` (see the variant's module in kernels.rotations);
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
    def build(cls, rotation: RotationParams, codebook: Codebook, device: torch.device | str) -> Plan:
        device = torch.device(device)
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

    # As a custom op's arguments (kernels.ops): the tensors, in a fixed order, and the plan rebuilt from them.

    def op_tensors(self) -> list[torch.Tensor]:
        """centroids, boundaries, the rotation's parameters (sorted by name), then the kernels' derived forms
        if this plan has built them (fused_params and lane_sign_table, or mixing_matrix): what
        ``from_op_tensors`` rebuilds from."""
        derived: list[torch.Tensor] = []
        if "fused_params" in self.__dict__:
            derived = list(self.fused_params)
            if self.__dict__.get("lane_sign_table") is not None:
                derived.append(self.lane_sign_table)
        elif "mixing_matrix" in self.__dict__:
            derived = [self.mixing_matrix]
        return [self.centroids, self.boundaries, *(self.params[n] for n in sorted(self.params)), *derived]

    @classmethod
    def code_bytes_of(cls, variant: str, dim: int, bits: int) -> int:
        return packed_bytes(ROTATIONS[variant].coded_dim(dim), bits)

    @property
    def op_names(self) -> str:
        """The parameter names of ``op_tensors``, comma-separated (a custom op takes a string)."""
        return ",".join(sorted(self.params))

    @classmethod
    def from_op_tensors(
        cls, variant: str, dim: int, bits: int, names: str, symmetric: bool, tensors: list[torch.Tensor]
    ) -> Plan:
        """The plan whose ``op_tensors`` (with ``op_names`` and ``symmetric``) these are: no copies, and the
        derived forms restored, so that an op call derives nothing (``symmetric`` would read the device)."""
        rotation = ROTATIONS[variant]
        n_coded = rotation.coded_dim(dim)
        centroids, boundaries, *rest = tensors
        names = names.split(",") if names else []
        plan = cls(
            variant=variant,
            dim=dim,
            bits=bits,
            n_coded=n_coded,
            code_bytes=packed_bytes(n_coded, bits),
            device=centroids.device,
            params=dict(zip(names, rest[: len(names)], strict=True)),
            centroids=centroids,
            boundaries=boundaries,
        )
        plan.__dict__["symmetric"] = symmetric
        derived = rest[len(names) :]
        if len(derived) in (2, 3):
            plan.__dict__["fused_params"] = (derived[0], derived[1])
            if len(derived) == 3:
                plan.__dict__["lane_sign_table"] = derived[2]
                # The lane signs lead their table: restored, kronecker's signs * mix is not recomputed (a device
                # op) on every op call.
                plan.__dict__["lane_signs"] = derived[2][:n_coded]
        elif len(derived) == 1:
            plan.__dict__["mixing_matrix"] = derived[0]
        return plan

    @property
    def rotation(self) -> Rotation:
        return ROTATIONS[self.variant]

    @cached_property
    def kernel(self) -> str:
        """The Triton kernel family of this rotation at this dim (``Rotation.kernel_for``; cached: a launch asks
        for it three times)."""
        return self.rotation.kernel_for(self.dim)

    # Forms the Triton kernels read (cached_property stores them in the instance's __dict__, which a frozen
    # dataclass allows; the torch reference never builds them).

    @cached_property
    def symmetric(self) -> bool:
        """Whether the kernels' scalar symmetric code search applies: bits <= 4 and boundaries exactly
        antisymmetric (Lloyd-Max codebooks of a symmetric law are, to the bit)."""
        if self.bits > 4:
            return False
        b = self.boundaries.detach().float().cpu()
        return bool(torch.equal(b, -b.flip(0)))

    @cached_property
    def fused_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two parameter pointers of a fused kernel: "blocks": the 4x4 block matrices coefficient-major,
        float32 [16, g] (coefficient 4 i + j of block b at [4 i + j, b]) and an unused pointer; "pairs":
        cos and sin [g]; "hadamard": the signs [n_coded]; "kronecker": the signs [dim] and the mix [m, m];
        "none": unused pointers (the centroids)."""
        kernel = self.kernel
        if kernel == "blocks":
            matrix = self.params["matrix"]
            return matrix.reshape(matrix.shape[0], 16).t().contiguous(), self.centroids
        if kernel == "pairs":
            return self.params["cos"].contiguous(), self.params["sin"].contiguous()
        if kernel == "hadamard":
            return self.params["signs"].contiguous(), self.centroids
        if kernel == "kronecker":
            return self.params["signs"].contiguous(), self.params["mix"].contiguous()
        if kernel == "none":
            return self.centroids, self.centroids
        raise ValueError(f"variant {self.variant!r} runs in the matrix kernels, not the fused ones")

    @cached_property
    def lane_signs(self) -> torch.Tensor | None:
        """The signs float32 [n_coded] of the hadamard Gluon kernels (``kernels.triton._gluon``), for the
        rotations that are signs and one Walsh-Hadamard transform: "hadamard", and "kronecker" with a single
        block (dim a power of two), whose 1 x 1 mix is +-1 and folds into the signs exactly. None otherwise."""
        if self.kernel == "hadamard":
            return self.params["signs"].contiguous()
        if self.kernel == "kronecker" and self.params["mix"].numel() == 1:
            return (self.params["signs"] * self.params["mix"].reshape(())).contiguous()
        return None

    @cached_property
    def lane_sign_table(self) -> torch.Tensor | None:
        """What the hadamard Gluon kernels read as their signs (``kernels.triton._gluon``): float32 [3 n_coded / 2],
        ``lane_signs`` followed by the sign masks of column pairs as int32 bit patterns (0x8000 where column 2k
        has sign -1, | 0x80000000 where column 2k + 1 has): the signs of two 16-bit outputs in one word, applied
        as an XOR. None where ``lane_signs`` is."""
        signs = self.lane_signs
        if signs is None:
            return None
        neg = (signs < 0).reshape(-1, 2).to(torch.int32)
        masks = neg[:, 0] * 0x8000 + neg[:, 1] * -(2**31)
        return torch.cat([signs, masks.view(torch.float32)])

    @cached_property
    def launches(self) -> dict:
        """The compiled Triton kernels of this plan's launches, by launch class (``kernels.triton._launch.launch``
        fills it: a later launch of a known class skips Triton's dispatch)."""
        return {}

    @cached_property
    def mixing_matrix(self) -> torch.Tensor:
        """float32 [n_coded, dim] A with rotate(pad(x)) = x @ A^T on ``device`` (the matrix kernels)."""
        return self.rotation.mixing_matrix(self.params, self.dim, self.n_coded).to(self.device)
