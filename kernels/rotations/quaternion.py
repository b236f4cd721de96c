"""Quaternion algebra, and the two quaternion block rotations: Full (q_L v conj(q_R), all of SO(4) per block)
and Fast (q_L v). Quaternion w + xi + yj + zk is the 4-vector (w, x, y, z) in the last dimension.

Both apply a 4x4 matrix per block (``matrix`` [g, 4, 4], derived from the unit quaternions): 16 multiply-adds
a block for the rotation and for its inverse (the transpose)."""

from __future__ import annotations

import numpy as np
import torch

from kernels import prng
from kernels.rotations.base import Rotation, register


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


def _unit_quaternions(state: int, count: int, blocks: int) -> torch.Tensor:
    """float64 [count, blocks, 4]: normalized Gaussian 4-vectors from the stream, in FORMAT.md's order."""
    raw = prng.normals(state, count * blocks * 4).reshape(count, blocks, 4)
    return torch.from_numpy(raw / np.linalg.norm(raw, axis=-1, keepdims=True))


def _apply_blocks(x: torch.Tensor, matrix: torch.Tensor, inverse: bool) -> torch.Tensor:
    n, width = x.shape
    blocks = x.reshape(n, width // 4, 4)
    # y_g = M_g v_g, inverse M_g^T y_g
    equation = "gji,ngj->ngi" if inverse else "gij,ngj->ngi"
    return torch.einsum(equation, matrix, blocks).reshape(n, width)


@register
class Full(Rotation):
    """q_L v conj(q_R) per 4-D block: q_left, q_right [g, 4] unit quaternions; matrix = L(q_L) R(conj q_R)."""

    name, defining, kernel, block = "full", ("q_left", "q_right"), "blocks", 4

    def generate(self, dim: int, n_coded: int, state: int) -> dict[str, torch.Tensor]:
        q_left, q_right = _unit_quaternions(state, 2, n_coded // 4)
        matrix = left_matrix(q_left) @ right_matrix(quaternion_conjugate(q_right))
        return {"q_right": q_right.float(), "q_left": q_left.float(), "matrix": matrix.float()}

    def apply(self, x, params, inverse=False):
        return _apply_blocks(x, params["matrix"], inverse)


@register
class Fast(Rotation):
    """q_L v per 4-D block: q_left [g, 4] unit quaternions; matrix = L(q_L)."""

    name, defining, kernel, block = "fast", ("q_left",), "blocks", 4

    def generate(self, dim: int, n_coded: int, state: int) -> dict[str, torch.Tensor]:
        (q_left,) = _unit_quaternions(state, 1, n_coded // 4)
        return {"q_left": q_left.float(), "matrix": left_matrix(q_left).float()}

    def apply(self, x, params, inverse=False):
        return _apply_blocks(x, params["matrix"], inverse)
