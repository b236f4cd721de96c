"""The rotation registry: a new variant is one Rotation class (plus its id in the wire format's table), and the
reference, the fingerprint and the Triton matrix kernels serve it with no other change."""

from __future__ import annotations

import pytest
import torch

import isoquant_format
from kernels import Quantizer
from kernels.rotations import ROTATIONS, Rotation, register
from kernels.rotations import base as rotations_base
from tests.conftest import INTERPRETED
from tests.kernels.test_codebook import METHOD_TABLE


class Reverse(Rotation):
    """A toy orthogonal rotation for the test: coordinates in reverse order (its own inverse)."""

    name, defining, kernel = "reverse", (), "matrix"

    def generate(self, dim, n_coded, state):
        return {}

    def apply(self, x, params, inverse=False):
        return x.flip(-1)


@pytest.fixture
def reverse_variant(monkeypatch):
    monkeypatch.setattr(rotations_base, "VARIANT_IDS", {**isoquant_format.VARIANT_IDS, "reverse": 99})
    register(Reverse)
    yield ROTATIONS["reverse"]
    del ROTATIONS["reverse"]


def test_registry_is_ordered_by_id_and_every_variant_is_complete():
    assert list(ROTATIONS) == list(isoquant_format.VARIANTS)
    for name, rotation in ROTATIONS.items():
        assert rotation.name == name and rotation.variant_id == isoquant_format.VARIANT_IDS[name]
        assert rotation.kernel in ("blocks", "pairs", "none", "hadamard", "kronecker", "matrix")
        params = rotation.generate(10, rotation.coded_dim(10), 12345)
        assert set(rotation.defining) <= set(params)
        x = torch.randn(7, rotation.coded_dim(10))
        y = rotation.apply(x, params)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # orthogonal
        torch.testing.assert_close(rotation.apply(y, params, inverse=True), x, rtol=1e-5, atol=1e-5)
        if rotation.kernel != "none":  # the generic matrix form agrees with the rotation
            matrix = Rotation.mixing_matrix(rotation, params, 10, rotation.coded_dim(10))
            torch.testing.assert_close(x[:, :10] @ matrix.T, rotation.apply(_pad(x[:, :10], x.shape[1]), params))


def _pad(x, width):
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def test_a_variant_without_an_id_is_refused():
    class Nameless(Reverse):
        name = "nameless"

    with pytest.raises(ValueError, match="add it to isoquant_format.VARIANT_IDS"):
        register(Nameless)


def test_a_new_variant_is_served_by_the_reference_and_the_fingerprint(reverse_variant):
    q = Quantizer("reverse", 64, 3, seed=1)
    assert q.n_coded == 64 and len(q.fingerprint) == 16
    x = torch.randn(4096, 64)
    x = x / x.norm(dim=-1, keepdim=True)
    _, sq_err = q.roundtrip(x)
    assert sq_err.mean().item() == pytest.approx(METHOD_TABLE[64][2], rel=0.03)
    assert Quantizer("reverse", 64, 3, seed=2).fingerprint != Quantizer("identity", 64, 3, seed=2).fingerprint


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED, reason="needs triton under TRITON_INTERPRET=1 (CPU machine)")
def test_a_new_variant_runs_in_the_triton_matrix_kernels(reverse_variant):
    import kernels.triton as kt
    from kernels import reference

    plan = Quantizer("reverse", 24, 3, seed=1, backend="torch").plan
    x = torch.randn(19, 24)
    codes, norms = kt.quantize(x, plan)
    ref_codes, ref_norms = reference.quantize(x, plan)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(
        kt.dequantize(codes, norms, plan, torch.float32), reference.dequantize(codes, norms, plan, torch.float32)
    )


def test_kronecker_parameters_and_rotation_follow_format_md():
    """docs/FORMAT.md's kronecker row, recomputed from the generator: dim 96 = 3 * 32."""
    import numpy as np

    from kernels import prng
    from kernels.rotations import make_rotation

    dim, m, block, seed = 96, 3, 32, 11
    state0 = prng.stream_state(7, dim, seed)
    signs = 1.0 - 2.0 * (prng.splitmix64(state0, dim) >> np.uint64(63)).astype(np.float64)
    gaussian = torch.from_numpy(prng.normals((state0 + dim * prng.GOLDEN) % 2**64, m * m).reshape(m, m))
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    params = make_rotation("kronecker", dim, seed).tensors
    torch.testing.assert_close(params["signs"], torch.from_numpy(signs).float(), rtol=0, atol=0)
    torch.testing.assert_close(params["mix"], q.float())
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < block:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    matrix = torch.kron(params["mix"].double().contiguous(), sylvester) * torch.from_numpy(signs)[None, :] / block**0.5
    x = torch.randn(5, dim, dtype=torch.float64)
    rotation = ROTATIONS["kronecker"]
    torch.testing.assert_close(rotation.apply(x.float(), params), (x @ matrix.T).float(), rtol=1e-5, atol=1e-5)
    assert Quantizer("kronecker", 384, 3).code_bytes == 144  # no padding: 384 coordinates at 3 bits


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED, reason="needs triton under TRITON_INTERPRET=1 (CPU machine)")
@pytest.mark.parametrize("dim,kernel", [(6, "kronecker"), (96, "kronecker"), (384, "kronecker"), (100, "matrix")])
def test_kronecker_kernels_match_the_reference(dim, kernel):
    """Fused for up to 4 blocks (the mix across blocks as a broadcast product), the matrix kernels beyond."""
    from tests.kernels.test_triton_ops import check_ops

    assert Quantizer("kronecker", dim, 3, backend="torch").plan.kernel == kernel
    for bits in (2, 3, 4):
        check_ops("kronecker", dim, bits, torch.float32, n=7, device="cpu", seed=dim)
    check_ops("kronecker", dim, 3, torch.bfloat16, n=5, device="cpu", seed=dim + 1, strided=True)
