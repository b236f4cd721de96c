"""Bit packing: the worked example, exact round trips, and agreement with a bit-by-bit oracle."""

import doctest

import pytest
import torch

from kernels import packing
from kernels.packing import pack_codes, packed_bytes, unpack_codes


def _pack_bit_by_bit(codes: list[int], bits: int) -> list[int]:
    """An independent oracle: write each code's bits, LSB first, into a little-endian bit stream."""
    out = [0] * packed_bytes(len(codes), bits)
    for j, code in enumerate(codes):
        for b in range(bits):
            if (code >> b) & 1:
                position = j * bits + b
                out[position // 8] |= 1 << (position % 8)
    return out


def test_docstring_worked_example():
    assert doctest.testmod(packing).failed == 0
    assert pack_codes(torch.tensor([[5, 3, 6, 1]], dtype=torch.uint8), 3).tolist() == [[0x9D, 0x03]]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n_codes", [2, 5, 127, 130])
def test_round_trip_is_exact_and_matches_the_oracle(bits, n_codes):
    g = torch.Generator().manual_seed(bits * 1000 + n_codes)
    codes = torch.randint(0, 2**bits, (7, n_codes), generator=g).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, packed_bytes(n_codes, bits))
    assert torch.equal(unpack_codes(packed, bits, n_codes), codes)
    for row in range(7):
        assert packed[row].tolist() == _pack_bit_by_bit(codes[row].tolist(), bits)


def test_unused_high_bits_of_the_last_byte_are_zero():
    codes = torch.full((1, 5), 7, dtype=torch.uint8)  # 15 bits of ones in 2 bytes
    assert pack_codes(codes, 3).tolist() == [[0xFF, 0x7F]]


def test_unpack_refuses_the_wrong_length():
    with pytest.raises(ValueError, match="must have 2 bytes per vector, got 3"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 3, 4)
