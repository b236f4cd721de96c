"""Codes and fingerprints are those of the code before the rotation registry and the Plan refactor.

tests/kernels/data/golden_codes.safetensors was written by the library at commit 7860f1d: 16 vectors of dims 5,
64 and 130 (stored with it), every variant at bits 1, 3 and 8, seed 2^63 + 5; its metadata holds the
fingerprints. Fingerprints must be bit-identical (FORMAT.md makes them machine-independent). Codes must be
identical too, except where a coordinate lies within float rounding of a codebook boundary, which a different
CPU's summation order may move (the kernel tests' boundary tolerance): at most one code in 1,000 may differ.
"""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, safe_open

from kernels import VARIANTS, Quantizer
from kernels.packing import unpack_codes

GOLDEN = Path(__file__).parent / "data" / "golden_codes.safetensors"


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN, "pt") as f:
        fingerprints = json.loads(f.metadata()["fingerprints"])
    return load_file(GOLDEN), fingerprints


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "kronecker"])  # the variants of 7860f1d
def test_fingerprints_and_codes_are_unchanged(golden, variant):
    tensors, fingerprints = golden
    differing = total = 0
    for dim in (5, 64, 130):
        for bits in (1, 3, 8):
            q = Quantizer(variant, dim, bits, seed=2**63 + 5)
            assert q.fingerprint == fingerprints[f"{variant}_{dim}_{bits}"], (variant, dim, bits)
            codes = q.quantize(tensors[f"x_{dim}"]).codes
            want = tensors[f"codes_{variant}_{dim}_{bits}"]
            got, expected = unpack_codes(codes, bits, q.n_coded), unpack_codes(want, bits, q.n_coded)
            differing += int((got != expected).sum())
            total += expected.numel()
    assert differing <= total // 1000, f"{differing} of {total} codes differ"
