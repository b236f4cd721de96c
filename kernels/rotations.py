"""Rotations as torch ops (the reference): quaternion algebra, parameter generation and the six variants.

Every rotation acts on the last dimension of a float32 tensor [..., n_coded] that is already zero-padded
to the variant's coded width (see ``coded_dim``). Parameters are a pure function of (variant, dim, seed)
through ``kernels.prng`` and are generated in float64 on the CPU, then stored as float32.

Quaternion w + xi + yj + zk is the 4-vector (w, x, y, z) in the last dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kernels import prng

VARIANTS = ("full", "fast", "2d", "dense", "hadamard", "identity")
BLOCKED_VARIANTS = ("full", "fast", "2d")


def coded_dim(variant: str, dim: int) -> int:
    """How many coordinates are coded per vector: dim padded to the variant's block (4 for full/fast,
    2 for 2d, the next power of two for hadamard, none for dense and identity)."""
    if variant in ("full", "fast"):
        return -(-dim // 4) * 4
    if variant == "2d":
        return -(-dim // 2) * 2
    if variant == "hadamard":
        return 1 << max(1, (dim - 1).bit_length())
    return dim


# ---------------------------------------------------------------------------------------------------
# Quaternion algebra


def quaternion_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a * b of quaternions [..., 4] (broadcasting)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quaternion_conjugate(q: torch.Tensor) -> torch.Tensor:
    """conj(w, x, y, z) = (w, -x, -y, -z), shape [..., 4]."""
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def left_matrix(q: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] matrix L(q) with L(q) v = q * v for column 4-vectors v."""
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([w, -x, -y, -z], -1),
        torch.stack([x, w, -z, y], -1),
        torch.stack([y, z, w, -x], -1),
        torch.stack([z, -y, x, w], -1),
    ]
    return torch.stack(rows, -2)


def right_matrix(q: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] matrix R(q) with R(q) v = v * q for column 4-vectors v."""
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([w, -x, -y, -z], -1),
        torch.stack([x, w, z, -y], -1),
        torch.stack([y, -z, w, x], -1),
        torch.stack([z, y, -x, w], -1),
    ]
    return torch.stack(rows, -2)


def sandwich(q_left: torch.Tensor, v: torch.Tensor, q_right: torch.Tensor) -> torch.Tensor:
    """The Full rotation as the paper writes it, q_L * v * conj(q_R) (32 multiply-adds a block).
    Kept as the oracle for the 4x4 matrix form that the quantizer applies."""
    return quaternion_multiply(quaternion_multiply(q_left, v), quaternion_conjugate(q_right))


# ---------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class RotationParams:
    """The parameters of one rotation, float32 on the CPU.

    full:     q_left [g, 4], q_right [g, 4] (unit quaternions), matrix [g, 4, 4] = L(q_L) R(conj q_R)
    fast:     q_left [g, 4], matrix [g, 4, 4] = L(q_L)
    2d:       theta [g] in [0, 2 pi), cos/sin [g]
    dense:    matrix [dim, dim], orthogonal (Haar); y = matrix @ x
    hadamard: signs [n_coded] of +-1; y = H (signs * x) / sqrt(n_coded)
    identity: nothing
    """

    variant: str
    dim: int
    seed: int
    tensors: dict[str, torch.Tensor]

    @property
    def n_coded(self) -> int:
        return coded_dim(self.variant, self.dim)

    def hashed_values(self) -> list[torch.Tensor]:
        """The tensors that define the rotation, in the order the fingerprint hashes them."""
        return [self.tensors[name] for name in DEFINING_PARAMS[self.variant]]


# The parameters that define each variant's rotation, in FORMAT.md's order (the fingerprint hashes
# them; the service publishes them). The others (matrix of full/fast, cos/sin) are derived from these.
DEFINING_PARAMS = {
    "full": ("q_left", "q_right"),
    "fast": ("q_left",),
    "2d": ("theta",),
    "dense": ("matrix",),
    "hadamard": ("signs",),
    "identity": (),
}


def make_rotation(variant: str, dim: int, seed: int) -> RotationParams:
    """Generate the rotation parameters of (variant, dim, seed) exactly as docs/FORMAT.md specifies."""
    state = prng.stream_state(variant, dim, seed)
    n_coded = coded_dim(variant, dim)
    tensors: dict[str, torch.Tensor] = {}
    if variant in ("full", "fast"):
        blocks = n_coded // 4
        count = 2 if variant == "full" else 1
        raw = prng.normals(state, count * blocks * 4).reshape(count, blocks, 4)
        quats = torch.from_numpy(raw / np.linalg.norm(raw, axis=-1, keepdims=True))
        q_left = quats[0]
        if variant == "full":
            q_right = quats[1]
            matrix = left_matrix(q_left) @ right_matrix(quaternion_conjugate(q_right))
            tensors["q_right"] = q_right.float()
        else:
            matrix = left_matrix(q_left)
        tensors["q_left"] = q_left.float()
        tensors["matrix"] = matrix.float()
    elif variant == "2d":
        theta = torch.from_numpy(2.0 * math.pi * prng.uniforms(state, n_coded // 2))
        tensors.update(theta=theta.float(), cos=torch.cos(theta).float(), sin=torch.sin(theta).float())
    elif variant == "dense":
        gaussian = torch.from_numpy(prng.normals(state, dim * dim).reshape(dim, dim))
        q, r = torch.linalg.qr(gaussian)
        # Sign fix so that Q is Haar-distributed (Mezzadri 2007): Q * sign(diag R) column-wise.
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1.0
        tensors["matrix"] = (q * signs).float()
    elif variant == "hadamard":
        top_bits = prng.splitmix64(state, n_coded) >> np.uint64(63)
        tensors["signs"] = torch.from_numpy(1.0 - 2.0 * top_bits.astype(np.float64)).float()
    elif variant != "identity":
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    return RotationParams(variant=variant, dim=dim, seed=seed, tensors=tensors)


# ---------------------------------------------------------------------------------------------------
# Application (torch reference, vectorised over all leading dimensions and blocks)


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


def rotate(x: torch.Tensor, params: dict[str, torch.Tensor], variant: str, inverse: bool = False) -> torch.Tensor:
    """Apply the rotation (or its inverse) to float32 x [N, n_coded]; returns float32 [N, n_coded].

    ``params`` holds the variant's tensors already on x's device.
    """
    n, width = x.shape
    if variant in ("full", "fast"):
        blocks = x.reshape(n, width // 4, 4)
        matrix = params["matrix"]
        # y_g = M_g v_g, inverse M_g^T y_g: 16 multiply-adds a block for both Full and Fast.
        equation = "gji,ngj->ngi" if inverse else "gij,ngj->ngi"
        return torch.einsum(equation, matrix, blocks).reshape(n, width)
    if variant == "2d":
        pairs = x.reshape(n, width // 2, 2)
        cos, sin = params["cos"], params["sin"]
        if inverse:
            sin = -sin
        first = cos * pairs[..., 0] - sin * pairs[..., 1]
        second = sin * pairs[..., 0] + cos * pairs[..., 1]
        return torch.stack([first, second], -1).reshape(n, width)
    if variant == "dense":
        matrix = params["matrix"]
        return x @ matrix if inverse else x @ matrix.T
    if variant == "hadamard":
        scale = 1.0 / math.sqrt(x.shape[-1])
        if inverse:
            return fwht(x) * scale * params["signs"]
        return fwht(x * params["signs"]) * scale
    return x
