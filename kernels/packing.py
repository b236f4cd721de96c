"""b-bit packing of codes (the reference; the Triton kernels write the same bytes).

Layout (docs/FORMAT.md, format version 1): each vector's n codes form one little-endian bit stream.
Code j occupies stream bits [j*b, (j+1)*b), its least significant bit first; stream bit k is bit
(k mod 8) of byte k // 8. A vector takes ceil(n*b / 8) bytes and starts on a byte boundary; unused
high bits of its last byte are zero.

Worked example, b = 3, codes [5, 3, 6, 1]:

    stream value = 5 | 3 << 3 | 6 << 6 | 1 << 9 = 0b0011_1001_1101 = 0x39D
    bytes        = [0x9D, 0x03]   (ceil(4 * 3 / 8) = 2 bytes, low byte first)

>>> import torch
>>> pack_codes(torch.tensor([[5, 3, 6, 1]], dtype=torch.uint8), 3).tolist()
[[157, 3]]
>>> unpack_codes(torch.tensor([[157, 3]], dtype=torch.uint8), 3, 4).tolist()
[[5, 3, 6, 1]]
"""

from __future__ import annotations

import math

import torch


def packed_bytes(n_codes: int, bits: int) -> int:
    """Bytes one vector's codes take: ceil(n_codes * bits / 8)."""
    return (n_codes * bits + 7) // 8


def _group(bits: int) -> tuple[int, int]:
    """Codes and bytes in the smallest run that ends on a byte boundary: 8/gcd(b,8) codes = b/gcd bytes.
    At most 8 codes of 7 bits = 56 bits, so one int64 holds a group without touching the sign bit."""
    divisor = math.gcd(bits, 8)
    return 8 // divisor, bits // divisor


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes uint8 [N, n] (each < 2^bits) into uint8 [N, ceil(n*bits/8)]."""
    n_vectors, n_codes = codes.shape
    per_group, group_bytes = _group(bits)
    groups = -(-n_codes // per_group)
    padded = torch.zeros(n_vectors, groups * per_group, dtype=torch.int64, device=codes.device)
    padded[:, :n_codes] = codes
    shifts = torch.arange(per_group, device=codes.device, dtype=torch.int64) * bits
    words = (padded.view(n_vectors, groups, per_group) << shifts).sum(-1)  # disjoint bits: sum == or
    byte_shifts = torch.arange(group_bytes, device=codes.device, dtype=torch.int64) * 8
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(n_vectors, groups * group_bytes)[:, : packed_bytes(n_codes, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [N, ceil(n*bits/8)] -> codes uint8 [N, n]."""
    n_vectors, n_bytes = packed.shape
    if n_bytes != packed_bytes(n_codes, bits):
        raise ValueError(f"codes must have {packed_bytes(n_codes, bits)} bytes per vector, got {n_bytes}")
    per_group, group_bytes = _group(bits)
    groups = -(-n_codes // per_group)
    padded = torch.zeros(n_vectors, groups * group_bytes, dtype=torch.int64, device=packed.device)
    padded[:, :n_bytes] = packed
    byte_shifts = torch.arange(group_bytes, device=packed.device, dtype=torch.int64) * 8
    words = (padded.view(n_vectors, groups, group_bytes) << byte_shifts).sum(-1)
    shifts = torch.arange(per_group, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(n_vectors, groups * per_group)[:, :n_codes].to(torch.uint8)
