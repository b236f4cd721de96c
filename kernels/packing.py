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


def _group(bits: int) -> tuple[int, int, torch.dtype]:
    """Codes and bytes in the smallest run that ends on a byte boundary (8/gcd(b,8) codes = b/gcd bytes)
    and the narrowest integer that holds it: at most 8 codes of 7 bits = 56 bits, so int64 always
    suffices without touching the sign bit, and int32 when the run is at most 24 bits (b = 1, 2, 3, 4, 6, 8)."""
    divisor = math.gcd(bits, 8)
    per_group, group_bytes = 8 // divisor, bits // divisor
    return per_group, group_bytes, torch.int32 if group_bytes <= 3 else torch.int64


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes uint8 [N, n] (each < 2^bits) into uint8 [N, ceil(n*bits/8)]."""
    n_vectors, n_codes = codes.shape
    per_group, group_bytes, word_dtype = _group(bits)
    groups = -(-n_codes // per_group)
    padded = torch.zeros(n_vectors, groups, per_group, dtype=torch.uint8, device=codes.device)
    padded.view(n_vectors, groups * per_group)[:, :n_codes] = codes
    # One OR per code position in the group (<= 8), each over all vectors at once: on 65,536 x 128
    # 3-bit codes this took ~90 ms where a [N, groups, per_group] int64 shift-and-sum took ~250 ms
    # (2-core AMD EPYC).
    words = padded[..., 0].to(word_dtype)
    for position in range(1, per_group):
        words |= padded[..., position].to(word_dtype) << (position * bits)
    out = torch.empty(n_vectors, groups, group_bytes, dtype=torch.uint8, device=codes.device)
    for byte in range(group_bytes):
        out[..., byte] = ((words >> (8 * byte)) & 0xFF).to(torch.uint8)
    return out.view(n_vectors, groups * group_bytes)[:, : packed_bytes(n_codes, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [N, ceil(n*bits/8)] -> codes uint8 [N, n]."""
    n_vectors, n_bytes = packed.shape
    if n_bytes != packed_bytes(n_codes, bits):
        raise ValueError(f"codes must have {packed_bytes(n_codes, bits)} bytes per vector, got {n_bytes}")
    per_group, group_bytes, word_dtype = _group(bits)
    groups = -(-n_codes // per_group)
    padded = torch.zeros(n_vectors, groups, group_bytes, dtype=torch.uint8, device=packed.device)
    padded.view(n_vectors, groups * group_bytes)[:, :n_bytes] = packed
    words = padded[..., 0].to(word_dtype)
    for byte in range(1, group_bytes):
        words |= padded[..., byte].to(word_dtype) << (8 * byte)
    codes = torch.empty(n_vectors, groups, per_group, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for position in range(per_group):
        codes[..., position] = ((words >> (position * bits)) & mask).to(torch.uint8)
    return codes.view(n_vectors, groups * per_group)[:, :n_codes]
