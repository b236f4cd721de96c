"""The SDK against a real service process: round trips (sync, async, safetensors, JSON), the codes
container, offline decoding with ``kernels``, and errors as typed exceptions."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

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
    assert packed.shape == (3, 50, 64) and packed.batch_shape == (3, 50) and len(packed) == 3
    assert (packed.variant, packed.dim, packed.bits, packed.seed, packed.format_version) == ("full", 64, 3, 0, 1)
    assert packed.dtype == np.dtype(dtype).name
    assert len(packed.fingerprint) == 16
    np.testing.assert_allclose(packed.norms, np.linalg.norm(x.astype(np.float64), axis=-1), rtol=1e-5)
    assert packed.bytes_in == x.nbytes and packed.compression_ratio == x.nbytes / (150 * 24 + 150 * 4)

    x_hat = client.dequantize(packed)  # in the input's dtype, which the codes record
    assert x_hat.shape == (3, 50, 64) and x_hat.dtype == dtype
    x_hat = client.dequantize(packed, dtype="float32")
    relative = np.linalg.norm(x_hat - x, axis=-1) / np.linalg.norm(x.astype(np.float32), axis=-1)
    assert 0.05 < relative.mean() < 0.3  # 3 bits on 64 coordinates: ~0.18

    x_hat2, stats = client.dequantize(packed, reference=x, dtype="float32")
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
    assert packed.shape == (64,) and packed.batch_shape == () and packed.codes.shape == (24,)
    assert packed.norms.shape == ()
    assert client.dequantize(packed).shape == (64,)
    from_lists = client.quantize(vectors[0, :2].tolist())
    np.testing.assert_array_equal(from_lists.codes, client.quantize(vectors[0, :2]).codes)
    from_f64 = client.quantize(vectors[0, :2].astype(np.float64))  # sent as float32
    np.testing.assert_array_equal(from_f64.codes, from_lists.codes)
    # The ratio is against what the caller holds (8 bytes a coordinate), the dtype what it was quantized in.
    assert (from_f64.bytes_in, from_f64.dtype) == (2 * 64 * 8, "float32")
    assert from_f64.compression_ratio == 2 * 64 * 8 / (2 * 24 + 2 * 4)
    from_int8 = client.quantize(np.ones((2, 64), np.int8))
    assert (from_int8.bytes_in, from_int8.dtype) == (2 * 64, "float32") and from_int8.compression_ratio < 3
    assert (from_lists.bytes_in, from_lists.dtype) == (2 * 64 * 4, "float32")  # lists: the float32 sent


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
        client.quantize(np.ones((2, 4097), np.float32))
    assert info.value.field == "vectors" and "dim 4097 is not served; allowed: 2-4096" in info.value.message

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


# ------------------------------------------------------------------------------------------------
# Issue 17: dtypes remembered, quality from quantize, PackedCodes as an array, waiting for readiness


def test_slices_and_concatenations_are_the_codes_of_those_vectors(client, vectors):
    x = vectors.reshape(150, 64)
    whole = client.quantize(x, bits=4)
    assert whole[10:20].to_bytes() == client.quantize(x[10:20], bits=4).to_bytes()
    assert whole[[3, 7]].to_bytes() == client.quantize(x[[3, 7]], bits=4).to_bytes()
    parts = [client.quantize(x[:40], bits=4), client.quantize(x[40:], bits=4)]
    assert PackedCodes.concatenate(parts).to_bytes() == whole.to_bytes()
    grid = client.quantize(vectors, bits=4)
    assert grid[1].to_bytes() == client.quantize(vectors[1], bits=4).to_bytes() and len(grid) == 3


@pytest.mark.parametrize("fmt", ["safetensors", "json"])
def test_float16_codes_come_back_float16(server, vectors, fmt):
    x = vectors.astype(np.float16)
    with IsoQuantClient(server.url, api_key=API_KEY, format=fmt) as c:
        packed = c.quantize(x, bits=3)
        assert packed.dtype == "float16" and packed.bytes_in == x.nbytes
        restored = c.dequantize(packed)
        assert restored.dtype == np.float16 and restored.nbytes == x.nbytes  # not float32 at twice the size
        np.testing.assert_array_equal(restored, c.dequantize(packed, dtype="float16"))
        assert c.dequantize(packed, dtype="float32").dtype == np.float32  # an explicit dtype still wins


def test_bfloat16_tensors_are_recorded_as_bfloat16(client, server, vectors, tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(vectors).to(torch.bfloat16)
    packed = client.quantize(t)
    assert packed.dtype == "bfloat16" and packed.bytes_in == t.numel() * 2
    assert client.dequantize(packed).dtype == np.float32  # numpy has no bfloat16: the float32 reconstruction
    path = tmp_path / "bf16.safetensors"
    packed.save(path)
    raw = httpx.post(server.url + "/dequantize", content=path.read_bytes(),
                     headers={"Content-Type": "application/x-safetensors", "Authorization": f"Bearer {API_KEY}"})
    assert raw.status_code == 200
    from isoquant_format import parse

    assert parse(raw.content)[0]["vectors"].dtype == "bfloat16"  # the service restores bfloat16 for others


def test_quantize_returns_the_round_trip_quality(server, vectors):
    with IsoQuantClient(server.url, api_key=API_KEY) as c, \
            IsoQuantClient(server.url, api_key=API_KEY, max_batch_vectors=40) as split:
        packed = c.quantize(vectors, bits=3, return_distortion=True)
        _, reference = c.dequantize(packed, reference=vectors, dtype="float32")
        chunked = split.quantize(vectors, bits=3, return_distortion=True)
        assert c.quantize(vectors, bits=3).distortion is None
    d = packed.distortion
    assert d.n_vectors == 150 and 0.1 < d.mean_relative_error < 0.3 and 0.95 < d.mean_cosine_similarity < 1
    for name in ("mse", "mean_relative_error", "max_relative_error", "mean_cosine_similarity",
                 "min_cosine_similarity"):
        assert getattr(d, name) == pytest.approx(getattr(reference, name), rel=1e-5), name
        assert getattr(chunked.distortion, name) == pytest.approx(getattr(d, name), rel=1e-9), name
    assert PackedCodes.from_bytes(packed.to_bytes()).distortion == d  # recorded in the file


def test_wait_ready_returns_when_ready_and_names_what_it_waited_for(client):
    body = client.wait_ready(timeout=5)
    assert body["status"] == "ready" and body["device"] == "cpu"
    with IsoQuantClient("http://127.0.0.1:9", timeout=2) as nobody:
        started = time.monotonic()
        with pytest.raises(TransportError, match="nothing answered at http://127.0.0.1:9 for 1 s"):
            nobody.wait_ready(timeout=1.0, interval=0.2)
        assert time.monotonic() - started < 3


@pytest.mark.integration  # starts its own service process
def test_wait_ready_waits_for_a_server_that_is_still_starting(tmp_path):
    """The server's port opens a moment after the wait began (starting, then warming up): the SDK and the CLI
    wait for it instead of failing after their retries."""
    from tests import live_service
    from tests.clients.conftest import BASE_ENV

    port = live_service.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
    env.update(BASE_ENV, PYTHONPATH=str(live_service.REPO))

    def start_later():
        time.sleep(1.5)
        return subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(start_later)
        try:
            with IsoQuantClient(f"http://127.0.0.1:{port}") as c:
                body = c.wait_ready(timeout=90)
                assert body["status"] == "ready" and c.ready() is True

            async def again():
                async with AsyncIsoQuantClient(f"http://127.0.0.1:{port}") as a:
                    return await a.wait_ready(timeout=10)
            assert asyncio.run(again())["status"] == "ready"
        finally:
            process = later.result()
            process.terminate()
            process.wait(timeout=20)
