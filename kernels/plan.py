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

import numpy as np
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
        if this plan has built them (fused_params and lane_sign_table, or mixing_matrix; then search_grid):
        what ``from_op_tensors`` rebuilds from."""
        derived: list[torch.Tensor] = []
        if "fused_params" in self.__dict__:
            derived = list(self.fused_params)
            if self.__dict__.get("lane_sign_table") is not None:
                derived.append(self.lane_sign_table)
        elif "mixing_matrix" in self.__dict__:
            derived = [self.mixing_matrix]
        if self.__dict__.get("search_grid") is not None:
            derived.append(self.search_grid)  # the only int64 one: from_op_tensors tells it by its dtype
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
        # The grid search's table, or None: where the plan had none built, no kernel of its backend reads it.
        plan.__dict__["search_grid"] = derived.pop() if derived and derived[-1].dtype == torch.int64 else None
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
    def search_grid(self) -> torch.Tensor | None:
        """The Gluon quantize's code search table (``kernels.triton._jit._grid_magnitude``) for symmetric
        codebooks at bits 4, int64 [G + 2] on ``device``; None elsewhere (the select tree). H200, N = 2^20,
        time against the tree's, same run, dims 128 and 256, all dtypes: bits 4 0.95-0.99x (full), 0.90-0.98x
        (hadamard), and 2d and identity through the Gluon quantize 0.63-0.82x their plain kernel's; bits 3
        0.99-1.30x (full, hadamard: not used). The plain kernels keep the tree: with the table they took
        2.4-3.3x its time at bits 4 (2.9-4.2x at bits 3)."""
        if self.bits != 4 or not self.symmetric:
            return None
        return torch.from_numpy(search_grid(self.boundaries.detach().double().cpu().numpy())).to(self.device)

    @property
    def search_table(self) -> torch.Tensor:
        """What the Gluon quantize searches: ``search_grid`` where there is one, else the boundaries."""
        grid = self.search_grid
        return self.boundaries if grid is None else grid

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


# Magic numbers of ``search_grid``: the kernels' own (kernels.triton._jit), repeated here because that module
# imports Triton.
_GRID_MAGIC_BITS = 0x4B000000  # the float32 bits of 2^23
_GRID_MARGIN = 1e-3  # in cells: a cell's boundary may sit this far outside it (w rounds, the cell index too)
_GRID_MAX_CELLS = 1 << 12


def search_grid(boundaries: np.ndarray) -> np.ndarray:
    """The uniform-grid search table of a symmetric codebook's boundaries (float64 [K - 1], K >= 8), int64
    [G + 2] as ``kernels.triton._jit._grid_magnitude`` reads it (each entry: low word, high word, little-endian).

    The K/2 - 1 positive boundaries P_k map to T_k = P_k * G / U on a grid of cells j = [j - 1/2, j + 1/2),
    j = 0 .. G, with U = P_max * G / (G - 1) (so T_max = G - 1) and G the smallest power of two >= 4 for
    which every cell, widened by _GRID_MARGIN on both sides, holds at most one T_k. Entry 0: G / U (float32
    bits), G + 2^23's bits. Entry 1 + j: the T_k in cell j (float32 bits; +inf if none), the number of T_k
    below the widened cell.

    >>> table = search_grid(np.array([-1.5, -0.5, 0.0, 0.5, 1.5]))  # bits 3: P = 0.5, 1.5 (and 2.0 is U)
    >>> [hex(int(v)) for v in table]  # G = 4, U = 2: T = 1.0, 3.0
    ['0x4b00000440000000', '0x7f800000', '0x3f800000', '0x17f800000', '0x140400000', '0x27f800000']
    """
    positive = boundaries[len(boundaries) // 2 + 1 :]
    cells = 4
    while True:
        scale = (cells - 1) / positive[-1]  # G / U
        t = positive * scale
        widened_lo = np.arange(cells + 1) - 0.5 - _GRID_MARGIN
        inside = (t[None, :] >= widened_lo[:, None]) & (t[None, :] <= widened_lo[:, None] + 1 + 2 * _GRID_MARGIN)
        if inside.sum(axis=1).max() <= 1:
            break
        cells *= 2
        if cells > _GRID_MAX_CELLS:
            raise ValueError("the boundaries are too close together for a search grid")
    threshold = np.full(cells + 1, np.inf, dtype=np.float32)
    rows, cols = np.nonzero(inside)
    threshold[rows] = t[cols].astype(np.float32)
    below = (t[None, :] < widened_lo[:, None]).sum(axis=1)
    low = threshold.view(np.uint32).astype(np.int64)
    head = np.array([np.float32(scale)]).view(np.uint32).astype(np.int64) | (_GRID_MAGIC_BITS + cells) << 32
    return np.concatenate([head, low | below.astype(np.int64) << 32])
