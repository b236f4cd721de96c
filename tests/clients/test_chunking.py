"""Batches over the server's limits are split into requests within them and reassembled: the codes are
byte-identical to one call on a server whose limits take the batch whole."""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import pytest

from clients import AsyncIsoQuantClient, IsoQuantClient, PayloadTooLargeError
from tests.clients.conftest import API_KEY, start_server, stop_server

MAX_VECTORS = 100
MAX_BYTES = 16384  # 16 KiB: 48 float32 vectors of dim 64 per safetensors request, after the client's margin


@pytest.fixture(scope="module")
def small_server():
    s = start_server(max_vectors=MAX_VECTORS, max_request_bytes=MAX_BYTES)
    yield s
    stop_server(s)


class Recorder:
    """httpx event hook: the size of every POST body sent."""

    def __init__(self) -> None:
        self.bodies: list[int] = []

    def __call__(self, request: httpx.Request) -> None:
        if request.method == "POST":
            self.bodies.append(len(request.content))


async def _arecord(recorder: Recorder, request: httpx.Request) -> None:
    recorder(request)


@pytest.fixture(scope="module")
def whole(server):
    """Reference answers from the main server, one request each."""
    x = np.random.default_rng(3).standard_normal((4, 250, 64)).astype(np.float32)
    with IsoQuantClient(server.url, api_key=API_KEY) as c:
        packed = c.quantize(x, bits=3, seed=21)
        x_hat, stats = c.dequantize(packed, reference=x)
    return x, packed, x_hat, stats


def test_quantize_split_equals_one_call(small_server, whole):
    x, expected, _, _ = whole
    recorder = Recorder()
    with httpx.Client(event_hooks={"request": [recorder]}) as http, \
            IsoQuantClient(small_server.url, http_client=http) as c:
        packed = c.quantize(x, bits=3, seed=21)
    per_request = (MAX_BYTES - 4096) // (64 * 4)  # 48
    assert len(recorder.bodies) == math.ceil(1000 / per_request) == 21
    assert max(recorder.bodies) <= MAX_BYTES
    assert packed.codes.shape == (4, 250, 24) and packed.norms.shape == (4, 250)
    np.testing.assert_array_equal(packed.codes, expected.codes)
    np.testing.assert_array_equal(packed.norms, expected.norms)
    assert packed.descriptor() == expected.descriptor() and packed.bytes_in == x.nbytes


def test_dequantize_split_equals_one_call(small_server, whole):
    x, packed, expected_hat, expected_stats = whole
    recorder = Recorder()
    with httpx.Client(event_hooks={"request": [recorder]}) as http, \
            IsoQuantClient(small_server.url, http_client=http) as c:
        x_hat = c.dequantize(packed)
        n_plain = len(recorder.bodies)
        x_hat2, stats = c.dequantize(packed, reference=x)
    # 28 bytes a vector without reference: the 100-vector limit binds; with reference 284 bytes: the body limit
    assert n_plain == 10 and len(recorder.bodies) - n_plain == math.ceil(1000 / ((MAX_BYTES - 4096) // 284))
    assert max(recorder.bodies) <= MAX_BYTES
    np.testing.assert_array_equal(x_hat, expected_hat)
    np.testing.assert_array_equal(x_hat2, expected_hat)
    assert stats.n_vectors == 1000
    np.testing.assert_allclose(stats.mse, expected_stats.mse, rtol=1e-9)
    np.testing.assert_allclose(stats.mean_relative_error, expected_stats.mean_relative_error, rtol=1e-9)
    assert stats.max_relative_error == expected_stats.max_relative_error


def test_json_split_and_client_cap(small_server, whole):
    x, expected, _, _ = whole
    recorder = Recorder()
    with httpx.Client(event_hooks={"request": [recorder]}) as http, \
            IsoQuantClient(small_server.url, format="json", http_client=http) as c:
        packed = c.quantize(x[:1], bits=3, seed=21)
        assert max(recorder.bodies) <= MAX_BYTES
        recorder.bodies.clear()
    with httpx.Client(event_hooks={"request": [recorder]}) as http, \
            IsoQuantClient(small_server.url, max_batch_vectors=7, http_client=http) as c:
        capped = c.quantize(x[0, :50], bits=3, seed=21)
    np.testing.assert_array_equal(packed.codes, expected.codes[:1])
    np.testing.assert_array_equal(capped.codes, expected.codes[0, :50])
    assert len(recorder.bodies) == 8  # ceil(50 / 7)


def test_async_split_in_parallel_equals_one_call(small_server, whole):
    x, expected, expected_hat, _ = whole
    recorder = Recorder()

    async def main():
        hooks = {"request": [lambda r: _arecord(recorder, r)]}
        async with httpx.AsyncClient(event_hooks=hooks) as http, \
                AsyncIsoQuantClient(small_server.url, max_concurrency=3, http_client=http) as c:
            packed = await c.quantize(x, bits=3, seed=21)
            return packed, await c.dequantize(packed)

    packed, x_hat = asyncio.run(main())
    assert len(recorder.bodies) == 21 + 10
    np.testing.assert_array_equal(packed.codes, expected.codes)
    np.testing.assert_array_equal(packed.norms, expected.norms)
    np.testing.assert_array_equal(x_hat, expected_hat)


def test_server_limit_without_splitting_is_payload_too_large(small_server):
    """A raw request over max_vectors gets the server's 413, which the SDK types (and would have avoided)."""
    from safetensors.numpy import save

    body = save({"vectors": np.ones((MAX_VECTORS + 1, 32), np.float32)})
    response = httpx.post(small_server.url + "/quantize", content=body,
                          headers={"Content-Type": "application/x-safetensors"})
    from clients.errors import error_from_response

    error = error_from_response(response.status_code, response.content)
    assert isinstance(error, PayloadTooLargeError)
    assert (error.status, error.type, error.field) == (413, "too_many_vectors", "vectors")
