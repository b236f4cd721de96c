"""Quantizer: the error table on synthetic unit vectors, determinism, shapes, and every bad input."""

import hashlib
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import FORMAT_VERSION, VARIANTS, Packed, Quantizer
from tests.kernels.test_codebook import METHOD_TABLE


def _unit_vectors(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def unit_batches():
    return {dim: _unit_vectors(16384, dim, seed=dim) for dim in (64, 128, 256)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_mean_squared_error_matches_method_table_within_3_percent(variant, dim, unit_batches):
    x = unit_batches[dim]
    for bits in (1, 2, 3, 4):
        q = Quantizer(variant, dim, bits, seed=1)
        _, sq_err = q.roundtrip(x)
        expected = METHOD_TABLE[dim][bits - 1]
        assert sq_err.mean().item() == pytest.approx(expected, rel=0.03), (variant, dim, bits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantize_of_quantize_equals_roundtrip(variant):
    q = Quantizer(variant, 130, 3, seed=9)
    x = torch.randn(4, 3, 130) * 5
    packed = q.quantize(x)
    x_hat, sq_err = q.roundtrip(x)
    torch.testing.assert_close(q.dequantize(packed), x_hat, rtol=0, atol=0)
    torch.testing.assert_close(sq_err, (x - x_hat).square().sum(-1))
    assert packed.codes.shape == (4, 3, q.code_bytes) and packed.norms.shape == (4, 3)
    torch.testing.assert_close(packed.norms, x.norm(dim=-1))


def test_norms_are_kept_so_error_is_scale_invariant():
    q = Quantizer("full", 64, 4)
    x = _unit_vectors(2048, 64)
    _, unit_err = q.roundtrip(x)
    assert unit_err.mean().item() == pytest.approx(METHOD_TABLE[64][3], rel=0.05)
    for scale in (1e-3, 1e3):
        _, sq_err = q.roundtrip(x * scale)
        torch.testing.assert_close(sq_err / scale**2, unit_err, rtol=1e-4, atol=1e-7)


def test_zero_vectors_reconstruct_to_zero():
    q = Quantizer("full", 16, 2)
    x = torch.zeros(3, 16)
    x[1] = torch.randn(16)
    x_hat = q.dequantize(q.quantize(x))
    assert torch.isfinite(x_hat).all()
    assert torch.equal(x_hat[0], torch.zeros(16)) and torch.equal(x_hat[2], torch.zeros(16))
    assert x_hat[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_input_dtypes_give_the_codes_of_their_float32_values(dtype):
    q = Quantizer("fast", 64, 3)
    x = torch.randn(50, 64).to(dtype)
    assert torch.equal(q.quantize(x).codes, q.quantize(x.float()).codes)
    assert q.dequantize(q.quantize(x), dtype=dtype).dtype == dtype


def test_strided_rows_are_accepted_without_a_copy_changing_results():
    q = Quantizer("2d", 64, 3)
    wide = torch.randn(20, 128)
    view = wide[:, ::2]
    assert torch.equal(q.quantize(view).codes, q.quantize(view.contiguous()).codes)


def test_compression_ratio_comes_from_real_buffers():
    q = Quantizer("full", 128, 3)
    x = torch.randn(1000, 128, dtype=torch.float16)
    packed = q.quantize(x)
    assert q.code_bytes == 48
    assert packed.nbytes == 1000 * 48 + 1000 * 4
    assert x.numel() * x.element_size() / packed.nbytes == pytest.approx(256 / 52)


def test_empty_batch():
    q = Quantizer("full", 8, 2)
    packed = q.quantize(torch.empty(0, 8))
    assert packed.codes.shape == (0, q.code_bytes)
    assert q.dequantize(packed).shape == (0, 8)


# -- determinism ------------------------------------------------------------------------------------

_CODES_DIGEST = textwrap.dedent(
    """
    import hashlib, torch
    from kernels import Quantizer
    x = torch.randn(64, 100, generator=torch.Generator().manual_seed(123))
    parts = []
    for variant in {variants!r}:
        q = Quantizer(variant, 100, 3, seed=2**63 + 5)
        p = q.quantize(x)
        parts.append(q.fingerprint.encode() + p.codes.numpy().tobytes() + p.norms.numpy().tobytes())
    print(hashlib.sha256(b"".join(parts)).hexdigest())
    """
)


def test_codes_are_byte_identical_in_a_fresh_process():
    script = _CODES_DIGEST.format(variants=list(VARIANTS))
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    x = torch.randn(64, 100, generator=torch.Generator().manual_seed(123))
    parts = []
    for variant in VARIANTS:
        q = Quantizer(variant, 100, 3, seed=2**63 + 5)
        p = q.quantize(x)
        parts.append(q.fingerprint.encode() + p.codes.numpy().tobytes() + p.norms.numpy().tobytes())
    assert fresh == hashlib.sha256(b"".join(parts)).hexdigest()


def test_fingerprint_identifies_every_parameter():
    base = Quantizer("full", 64, 3, seed=0).fingerprint
    assert len(base) == 16 and int(base, 16) >= 0
    others = [Quantizer(v, d, b, seed=s).fingerprint for v, d, b, s in
              [("fast", 64, 3, 0), ("full", 68, 3, 0), ("full", 64, 4, 0), ("full", 64, 3, 1)]]
    assert base not in others and len(set(others)) == 4
    assert Quantizer("full", 64, 3, seed=0).fingerprint == base


# -- properties -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS),
    dim=st.integers(2, 40),
    bits=st.integers(1, 8),
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_any_shape_round_trips_to_finite_values(variant, dim, bits, lead, dtype):
    q = Quantizer(variant, dim, bits, seed=dim)
    x = torch.randn(*lead, dim).to(dtype)
    packed = q.quantize(x)
    assert packed.codes.shape == (*lead, q.code_bytes) and packed.codes.dtype == torch.uint8
    assert q.code_bytes == (q.n_coded * bits + 7) // 8
    x_hat = q.dequantize(packed)
    assert x_hat.shape == (*lead, dim) and x_hat.dtype == torch.float32
    assert torch.isfinite(x_hat).all()


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"variant": "rotor"},
            "variant must be one of full, fast, 2d, dense, hadamard, identity, kronecker; got 'rotor'",
        ),
        ({"dim": 1}, "dim must be an integer from 2 to 4096; got 1"),
        ({"dim": 4097}, "dim must be an integer from 2 to 4096; got 4097"),
        ({"dim": 12.0}, "dim must be an integer from 2 to 4096; got 12.0"),
        ({"bits": 0}, "bits must be an integer from 1 to 8; got 0"),
        ({"bits": 9}, "bits must be an integer from 1 to 8; got 9"),
        ({"seed": -1}, "seed must be an integer from 0 to 2^64-1; got -1"),
        ({"seed": 2**64}, "seed must be an integer from 0 to 2^64-1"),
        ({"backend": "cuda"}, "backend must be one of auto, torch, triton; got 'cuda'"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("^", r"\^").replace("(", r"\(")):
        Quantizer(**{"variant": "full", "dim": 16, "bits": 2, **kwargs})


def test_triton_backend_on_cpu_is_refused():
    with pytest.raises(ValueError, match="backend 'triton' needs a CUDA device"):
        Quantizer("full", 16, 2, device="cpu", backend="triton")


@pytest.fixture(scope="module")
def q16():
    return Quantizer("full", 16, 2, seed=0)


def test_nan_and_inf_name_the_vectors(q16):
    x = torch.randn(2, 3, 16)
    x[0, 2, 5] = float("nan")
    x[1, 1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"x holds NaN or Inf in vectors \[2, 4\]"):
        q16.quantize(x)
    with pytest.raises(ValueError, match=r"NaN or Inf in vectors \[2, 4\]"):
        q16.roundtrip(x)


def test_overflowing_norm_is_refused(q16):
    x = torch.full((2, 16), 1e30)
    x[0] = 1.0
    with pytest.raises(ValueError, match=r"norm of vectors \[1\] overflows float32"):
        q16.quantize(x)


def test_wrong_last_dimension(q16):
    with pytest.raises(ValueError, match=r"last dimension 16 \(this quantizer's dim\); got shape \[4, 15\]"):
        q16.quantize(torch.randn(4, 15))
    with pytest.raises(ValueError, match="last dimension 16"):
        q16.quantize(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_unsupported_dtype_lists_the_allowed(q16, dtype):
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32; got"):
        q16.quantize(torch.zeros(2, 16, dtype=dtype))


def test_not_a_tensor(q16):
    with pytest.raises(ValueError, match="x must be a torch.Tensor, got list"):
        q16.quantize([[0.0] * 16])


def test_dequantize_refuses_another_quantizers_codes(q16):
    packed = Quantizer("full", 16, 2, seed=1).quantize(torch.randn(3, 16))
    with pytest.raises(ValueError, match="does not match this quantizer's"):
        q16.dequantize(packed)


def test_dequantize_refuses_codes_of_the_wrong_length(q16):
    packed = q16.quantize(torch.randn(3, 16))
    truncated = Packed(**{**packed.__dict__, "codes": packed.codes[:, :-1]})
    with pytest.raises(ValueError, match=r"codes must have 4 bytes per vector \(dim=16, bits=2\); got shape \[3, 3\]"):
        q16.dequantize(truncated)
    wrong_norms = Packed(**{**packed.__dict__, "norms": packed.norms[:2]})
    with pytest.raises(ValueError, match=r"norms must be float32 of shape \[3\]"):
        q16.dequantize(wrong_norms)
    wrong_type = Packed(**{**packed.__dict__, "codes": packed.codes.to(torch.int16)})
    with pytest.raises(ValueError, match="codes must be uint8, got int16"):
        q16.dequantize(wrong_type)
    old_format = Packed(**{**packed.__dict__, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="does not match"):
        q16.dequantize(old_format)


def test_dequantize_refuses_bad_dtype_and_nan_norms(q16):
    packed = q16.quantize(torch.randn(3, 16))
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32"):
        q16.dequantize(packed, dtype=torch.float64)
    bad = Packed(**{**packed.__dict__, "norms": torch.tensor([1.0, float("nan"), 1.0])})
    with pytest.raises(ValueError, match=r"norms holds NaN or Inf in vectors \[1\]"):
        q16.dequantize(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roundtrip_output_dtype(q16, dtype):
    x = torch.randn(2, 5, 16)
    x_hat, sq_err = q16.roundtrip(x)
    low_hat, low_err = q16.roundtrip(x, dtype=dtype)
    assert low_hat.dtype == dtype and low_hat.shape == (2, 5, 16)
    torch.testing.assert_close(low_hat, x_hat.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(low_err, sq_err, rtol=0, atol=0)  # the float32 reconstruction's error
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32; got"):
        q16.roundtrip(x, dtype=torch.float64)


def test_fingerprint_follows_format_md():
    """Recompute the fingerprint as docs/FORMAT.md words it, from the stored parameters."""
    import numpy as np

    q = Quantizer("full", 12, 3, seed=42)
    message = b"isoquant\x001\x00full\x0012\x003\x0042\x00"
    for values in (q.rotation.tensors["q_left"], q.rotation.tensors["q_right"], q.plan.centroids.cpu()):
        grid = np.round(values.double().numpy().reshape(-1) * 2.0**24).astype("<i8")
        message += grid.tobytes()
    assert q.fingerprint == hashlib.sha256(message).hexdigest()[:16]
