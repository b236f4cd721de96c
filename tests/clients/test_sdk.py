"""The SDK against a real service process: round trips (sync, async, safetensors, JSON), the codes
container, offline decoding with ``kernels``, and errors as typed exceptions."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from clients import (
    AsyncIsoQuantClient,
    BadRequestError,
    Distortion,
    IsoQuantClient,
    IsoQuantError,
    PackedCodes,
    TransportError,
    UnauthorizedError,
    ValidationError,
)
from tests.clients.conftest import API_KEY


@pytest.fixture(scope="module")
def client(server):
    with IsoQuantClient(server.url, api_key=API_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def json_client(server):
    with IsoQuantClient(server.url, api_key=API_KEY, format="json") as c:
        yield c


def test_info_and_ready(client):
    info = client.info()
    assert info["service"] == "isoquant"
    assert info["limits"]["max_vectors"] == 65536
    assert info["auth"] == "bearer"
    assert client.ready() is True


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_shapes_norms_and_error(client, vectors, dtype):
    x = vectors.astype(dtype)
    packed = client.quantize(x, variant="full", bits=3)
    assert isinstance(packed, PackedCodes)
    # full: dim 64 -> 64 coded coordinates at 3 bits = 24 bytes a vector
    assert packed.codes.shape == (3, 50, 24) and packed.codes.dtype == np.uint8
    assert packed.norms.shape == (3, 50) and packed.norms.dtype == np.float32
    assert (packed.variant, packed.dim, packed.bits, packed.seed, packed.format_version) == ("full", 64, 3, 0, 1)
    assert len(packed.fingerprint) == 16
    np.testing.assert_allclose(packed.norms, np.linalg.norm(x.astype(np.float64), axis=-1), rtol=1e-5)
    assert packed.bytes_in == x.nbytes and packed.compression_ratio == x.nbytes / (150 * 24 + 150 * 4)

    x_hat = client.dequantize(packed)
    assert x_hat.shape == (3, 50, 64) and x_hat.dtype == np.float32
    relative = np.linalg.norm(x_hat - x, axis=-1) / np.linalg.norm(x.astype(np.float32), axis=-1)
    assert 0.05 < relative.mean() < 0.3  # 3 bits on 64 coordinates: ~0.18

    x_hat2, stats = client.dequantize(packed, reference=x)
    np.testing.assert_array_equal(x_hat2, x_hat)
    assert isinstance(stats, Distortion) and stats.n_vectors == 150
    err = x.astype(np.float64) - x_hat.astype(np.float64)
    np.testing.assert_allclose(stats.mse, np.mean(err**2), rtol=1e-5)
    np.testing.assert_allclose(stats.mean_relative_error, relative.mean(), rtol=1e-4)
    np.testing.assert_allclose(stats.max_relative_error, relative.max(), rtol=1e-4)

    half = client.dequantize(packed, dtype="float16")
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, x_hat, rtol=2e-3, atol=2e-3)


def test_json_and_safetensors_agree(client, json_client, vectors):
    a = client.quantize(vectors, bits=4, seed=11)
    b = json_client.quantize(vectors, bits=4, seed=11)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.norms, b.norms)
    assert a.descriptor() == b.descriptor()
    ra, sa = client.dequantize(a, reference=vectors)
    rb, sb = json_client.dequantize(b, reference=vectors)
    np.testing.assert_array_equal(ra, rb)
    assert sa == sb


def test_seeds_and_variants(client, vectors):
    default = client.quantize(vectors)
    again = client.quantize(vectors, seed=0)
    other = client.quantize(vectors, seed=12345)
    np.testing.assert_array_equal(default.codes, again.codes)
    assert default.fingerprint == again.fingerprint != other.fingerprint
    assert other.seed == 12345 and not np.array_equal(default.codes, other.codes)
    for variant, code_bytes in (("fast", 24), ("2d", 24), ("hadamard", 24), ("identity", 24)):
        packed = client.quantize(vectors[0], variant=variant, bits=3)
        assert packed.variant == variant and packed.codes.shape == (50, code_bytes)
        assert client.dequantize(packed).shape == (50, 64)


def test_single_vector_and_lists(client, vectors):
    packed = client.quantize(vectors[0, 0])  # shape [dim]: leading shape ()
    assert packed.shape == () and packed.codes.shape == (24,) and packed.norms.shape == ()
    assert client.dequantize(packed).shape == (64,)
    from_lists = client.quantize(vectors[0, :2].tolist())
    np.testing.assert_array_equal(from_lists.codes, client.quantize(vectors[0, :2]).codes)
    from_f64 = client.quantize(vectors[0, :2].astype(np.float64))  # sent as float32
    np.testing.assert_array_equal(from_f64.codes, from_lists.codes)


def test_torch_tensors_duck_typed(client, vectors):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(vectors.copy()).requires_grad_(True)
    np.testing.assert_array_equal(client.quantize(t).codes, client.quantize(vectors).codes)
    bf16 = t.detach().to(torch.bfloat16)
    widened = bf16.float().numpy()
    np.testing.assert_array_equal(client.quantize(bf16).codes, client.quantize(widened).codes)
    half = t.detach().half()
    np.testing.assert_array_equal(client.quantize(half).codes, client.quantize(vectors.astype(np.float16)).codes)


def test_container_is_the_service_binary_answer(client, server, vectors, tmp_path):
    packed = client.quantize(vectors, bits=3)
    # The service's own binary /quantize answer reads as the same PackedCodes ...
    from safetensors.numpy import save

    raw = httpx.post(server.url + "/quantize", content=save({"vectors": vectors}, metadata={"bits": "3"}),
                     headers={"Content-Type": "application/x-safetensors", "Authorization": f"Bearer {API_KEY}"})
    assert raw.status_code == 200
    answer = PackedCodes.from_bytes(raw.content)
    np.testing.assert_array_equal(answer.codes, packed.codes)
    np.testing.assert_array_equal(answer.norms, packed.norms)
    assert answer.descriptor() == packed.descriptor() and answer.bytes_in == packed.bytes_in
    # ... and the file the SDK writes is a valid /dequantize body as it is.
    path = tmp_path / "codes.safetensors"
    packed.save(path)
    loaded = PackedCodes.load(path)
    np.testing.assert_array_equal(loaded.codes, packed.codes)
    assert loaded.descriptor() == packed.descriptor() and loaded.bytes_in == packed.bytes_in
    reply = httpx.post(server.url + "/dequantize", content=path.read_bytes(),
                       headers={"Content-Type": "application/x-safetensors", "Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200, reply.text
    from safetensors.numpy import load

    np.testing.assert_array_equal(load(reply.content)["vectors"], client.dequantize(packed))


def test_kernels_decode_sdk_codes_offline(client, vectors):
    """The SDK's PackedCodes -> kernels.Packed; the library decodes it as the server does, and encodes the
    same bytes (the code format is the contract)."""
    torch = pytest.importorskip("torch")
    from kernels import Packed, Quantizer

    for variant, bits, seed in (("full", 3, 0), ("fast", 2, 99), ("2d", 4, 5)):
        packed = client.quantize(vectors, variant=variant, bits=bits, seed=seed)
        q = Quantizer(variant, 64, bits, seed)
        assert q.fingerprint == packed.fingerprint
        local = Packed(codes=torch.from_numpy(packed.codes.copy()), norms=torch.from_numpy(packed.norms.copy()),
                       **packed.descriptor())
        offline = q.dequantize(local).numpy()
        np.testing.assert_allclose(offline, client.dequantize(packed), rtol=1e-6, atol=1e-6)
        mine = q.quantize(torch.from_numpy(vectors))
        np.testing.assert_array_equal(mine.codes.numpy(), packed.codes)


def test_server_errors_are_typed(client, server, vectors):
    with pytest.raises(ValidationError) as info:
        client.quantize(vectors, bits=9)
    e = info.value
    assert (e.status, e.type, e.field) == (422, "unsupported_value", "bits")
    assert "allowed: 1, 2, 3, 4, 5, 6, 7, 8" in e.message and e.attempts == 1
    assert isinstance(e, BadRequestError) and isinstance(e, IsoQuantError)
    assert str(e).startswith("HTTP 422 unsupported_value (field bits): bits 9 is not served")

    with pytest.raises(ValidationError) as info:
        client.quantize(vectors, variant="nope")
    assert (info.value.type, info.value.field) == ("unsupported_value", "variant")

    with pytest.raises(ValidationError) as info:
        client.quantize(np.ones((2, 65), np.float32))
    assert info.value.field == "vectors" and "dim 65 is not served" in info.value.message

    bad = np.ones((2, 64), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(ValidationError) as info:
        client.quantize(bad)
    assert info.value.type == "non_finite"

    packed = client.quantize(vectors[0])
    forged = PackedCodes(packed.codes, packed.norms, packed.variant, packed.dim, packed.bits, packed.seed,
                         fingerprint="0" * 16)
    with pytest.raises(ValidationError) as info:
        client.dequantize(forged)
    assert (info.value.type, info.value.field) == ("fingerprint_mismatch", "quantizer.fingerprint")
    assert packed.fingerprint in info.value.message

    with IsoQuantClient(server.url, api_key="wrong") as stranger, pytest.raises(UnauthorizedError) as info:
        stranger.quantize(vectors)
    assert (info.value.status, info.value.type, info.value.field) == (401, "unauthorized", "authorization")
    assert info.value.message == "invalid API key"


def test_empty_batch_is_refused_by_the_server(client, json_client):
    for c in (client, json_client):
        with pytest.raises(ValidationError) as info:
            c.quantize(np.zeros((0, 64), np.float32))
        assert (info.value.status, info.value.field) == (422, "vectors") and "no vectors" in info.value.message


def test_results_are_writable_arrays(client, json_client, vectors):
    for c in (client, json_client):
        packed = c.quantize(vectors[0])
        x_hat = c.dequantize(packed)
        assert packed.codes.flags.writeable and packed.norms.flags.writeable and x_hat.flags.writeable


def test_local_input_errors(client, vectors):
    with pytest.raises(TypeError, match="real numbers"):
        client.quantize(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="scalar"):
        client.quantize(np.float32(1.0))
    packed = client.quantize(vectors)
    with pytest.raises(ValueError, match="reference must have shape"):
        client.dequantize(packed, reference=vectors[:2])
    with pytest.raises(ValueError, match="bfloat16"):
        client.dequantize(packed, dtype="bfloat16")


def test_unreachable_server_is_a_transport_error():
    with IsoQuantClient("http://127.0.0.1:9", timeout=2) as c, pytest.raises(TransportError) as info:
        c.info()
    assert info.value.status is None and info.value.type == "connect_error"


def test_async_round_trip_matches_sync(client, server, vectors):
    expected = client.quantize(vectors, bits=2, seed=3)
    expected_hat = client.dequantize(expected)

    async def main():
        async with AsyncIsoQuantClient(server.url, api_key=API_KEY) as a, \
                AsyncIsoQuantClient(server.url, api_key=API_KEY, format="json") as j:
            assert await a.ready() is True
            assert (await a.info())["limits"]["max_vectors"] == 65536
            results = await asyncio.gather(a.quantize(vectors, bits=2, seed=3), j.quantize(vectors, bits=2, seed=3),
                                           *(a.quantize(vectors[i], bits=2, seed=3) for i in range(3)))
            hat, stats = await a.dequantize(results[0], reference=vectors)
            with pytest.raises(ValidationError) as info:
                await a.quantize(vectors, bits=0)
            assert info.value.field == "bits"
            return results, hat, stats

    results, hat, stats = asyncio.run(main())
    for packed in results[:2]:
        np.testing.assert_array_equal(packed.codes, expected.codes)
        assert packed.descriptor() == expected.descriptor()
    for i, packed in enumerate(results[2:]):
        np.testing.assert_array_equal(packed.codes, expected.codes[i])
    np.testing.assert_array_equal(hat, expected_hat)
    assert stats.n_vectors == 150
