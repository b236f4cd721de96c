"""Retries on 429/503: against a real server with a one-request queue, concurrent callers are refused
(429, Retry-After) and retried until they get through, with no vector lost or processed twice. The
backoff policy itself (Retry-After floor, HTTP dates, the bound) is checked on a mock transport."""

from __future__ import annotations

import asyncio
import email.utils
import re
import threading
import time

import httpx
import numpy as np
import pytest

from clients import AsyncIsoQuantClient, IsoQuantClient, OverloadedError, ServerError
from clients.client import parse_retry_after
from tests.clients.conftest import API_KEY

THREADS, PER_THREAD, BATCH = 6, 2, 2048


@pytest.fixture(scope="module")
def batches(server):
    """THREADS x PER_THREAD distinct float32 batches [BATCH, 64] and their codes from the main server."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((THREADS, PER_THREAD, BATCH, 64)).astype(np.float32)
    with IsoQuantClient(server.url, api_key=API_KEY) as c:
        expected = c.quantize(x, bits=3)
    return x, expected


def _metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of a Prometheus counter whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_callers_retry_429_without_loss_or_duplicates(busy_server, batches):
    x, expected = batches
    vectors_before = _metric(busy_server.url, "isoquant_vectors_total", op="quantize")
    rejected_before = _metric(busy_server.url, "isoquant_rejected_requests_total", reason="queue_full")
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    with IsoQuantClient(busy_server.url, max_retries=40, backoff=0.05, max_backoff=0.5) as client:
        barrier = threading.Barrier(THREADS)

        def work(t: int) -> None:
            try:
                barrier.wait()
                for r in range(PER_THREAD):
                    results[t, r] = client.quantize(x[t, r], bits=3)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        retries = client.retries
    assert not errors, errors
    assert len(results) == THREADS * PER_THREAD
    for (t, r), packed in results.items():
        np.testing.assert_array_equal(packed.codes, expected.codes[t, r])
        np.testing.assert_array_equal(packed.norms, expected.norms[t, r])
    rejected = _metric(busy_server.url, "isoquant_rejected_requests_total", reason="queue_full") - rejected_before
    assert retries >= 1 and rejected == retries  # every 429 was retried, nothing else was
    # the server quantized each vector exactly once: refused requests did no work, none was lost
    assert _metric(busy_server.url, "isoquant_vectors_total", op="quantize") - vectors_before == x[..., 0].size


def test_async_split_batch_under_429_reassembles_in_order(busy_server, batches):
    x, expected = batches
    flat = x.reshape(-1, 64)[:6000]

    async def main():
        async with AsyncIsoQuantClient(busy_server.url, max_batch_vectors=500, max_concurrency=6, max_retries=40,
                                       backoff=0.05, max_backoff=0.5) as c:
            return await c.quantize(flat, bits=3), c.retries

    packed, retries = asyncio.run(main())
    assert retries >= 1
    np.testing.assert_array_equal(packed.codes, expected.codes.reshape(-1, 24)[:6000])
    np.testing.assert_array_equal(packed.norms, expected.norms.reshape(-1)[:6000])


def test_retries_run_out_as_overloaded(busy_server, batches):
    x, _ = batches
    outcomes: list[object] = []
    with IsoQuantClient(busy_server.url, max_retries=0) as client:
        client.info()
        barrier = threading.Barrier(THREADS)

        def work(t: int) -> None:
            barrier.wait()
            try:
                outcomes.append(client.quantize(x[t, 0], bits=3))
            except OverloadedError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    failures = [o for o in outcomes if isinstance(o, OverloadedError)]
    assert len(outcomes) == THREADS and failures
    e = failures[0]
    assert (e.status, e.type, e.field, e.attempts) == (429, "queue_full", None, 1)
    assert "max_queue=1" in e.message


# -- the policy, on a mock transport ---------------------------------------------------------------


def _mock(answers: list[httpx.Response], seen: list[float]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(time.monotonic())
        return answers.pop(0)

    return httpx.Client(transport=httpx.MockTransport(handler))


def _busy(status: int = 429, retry_after: str | None = "1") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, headers=headers, json={"error": {"type": "queue_full", "message": "busy",
                                                                   "field": None}})


def test_retry_after_is_a_floor_and_the_count_is_bounded():
    seen: list[float] = []
    info = httpx.Response(200, json={"limits": {"max_vectors": 10, "max_request_bytes": 1 << 20}})
    with _mock([_busy(503, "1"), _busy(429, "0"), info], seen) as http:
        client = IsoQuantClient("http://mock", http_client=http, backoff=0.01, max_backoff=0.02)
        assert client.info()["limits"]["max_vectors"] == 10
    assert client.retries == 2 and len(seen) == 3
    assert seen[1] - seen[0] >= 0.99  # Retry-After: 1 honoured although the backoff is 10 ms
    assert seen[2] - seen[1] < 0.5

    seen.clear()
    with _mock([_busy(429, "0") for _ in range(3)], seen) as http:
        client = IsoQuantClient("http://mock", http_client=http, max_retries=2, backoff=0.01, max_backoff=0.02)
        with pytest.raises(OverloadedError) as exc:
            client.info()
    assert len(seen) == 3 and exc.value.attempts == 3 and exc.value.type == "queue_full"
    assert "after 3 attempts" in str(exc.value)


def test_long_retry_after_and_other_errors_are_not_retried():
    seen: list[float] = []
    with _mock([_busy(503, "600")], seen) as http:
        client = IsoQuantClient("http://mock", http_client=http, max_retry_wait=30)
        with pytest.raises(OverloadedError):
            client.info()
    assert len(seen) == 1
    seen.clear()
    boom = httpx.Response(500, json={"error": {"type": "internal_error", "message": "boom", "field": None}})
    with _mock([boom], seen) as http:
        with pytest.raises(ServerError) as exc:
            IsoQuantClient("http://mock", http_client=http).info()
    assert len(seen) == 1 and (exc.value.status, exc.value.type, exc.value.message) == (500, "internal_error", "boom")
    seen.clear()
    with _mock([httpx.Response(502, text="<html>bad gateway</html>")], seen) as http:
        with pytest.raises(ServerError) as exc:
            IsoQuantClient("http://mock", http_client=http).info()
    assert exc.value.type == "http_error" and "bad gateway" in exc.value.message


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5 and parse_retry_after("-1") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.5 < parse_retry_after(date) <= 5.0


def test_not_ready_503_is_retried_until_warm(vectors):
    """A server still warming up answers 503 not_ready with Retry-After; the client waits it out."""
    from tests.clients.conftest import start_server, stop_server

    # a slow warm-up (two quantizers of dim 512, 4096-vector batches): seconds of 503 not_ready
    server = start_server(wait_for="live", warm_variants="full,fast", warm_dims="512", warm_bits="2,3",
                          warm_batch=4096)
    try:
        with IsoQuantClient(server.url, max_retries=60, backoff=0.05, max_backoff=0.5) as client:
            if client.ready():
                pytest.skip("the warm-up finished before the first request; nothing to retry")
            packed = client.quantize(vectors, bits=3)
            assert client.retries >= 1 and client.ready()
            assert packed.codes.shape == (3, 50, 24)
    finally:
        stop_server(server)


class _DroppingProxy:
    """A TCP proxy in front of a real server that, for its first ``drops`` connections, reads the request and
    closes without an answer (what a client sees from a server process that is stopping), then forwards."""

    def __init__(self, target_port: int, drops: int):
        import socket

        self.target_port, self.drops, self.dropped = target_port, drops, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import socket

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.dropped < self.drops:
                self.dropped += 1
                conn.recv(65536)
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_a_connection_closed_before_the_answer_is_retried(server, vectors):
    from clients.errors import TransportError

    with IsoQuantClient(server.url, api_key=API_KEY) as direct:
        limits = direct.info()
        want = direct.quantize(vectors, bits=3)
    proxy = _DroppingProxy(server.port, drops=2)
    try:
        with IsoQuantClient(f"http://127.0.0.1:{proxy.port}", api_key=API_KEY, backoff=0.01) as client:
            client._core.set_limits(limits)  # so that the dropped connections are the /quantize request's own
            got = client.quantize(vectors, bits=3)
            assert proxy.dropped == 2 and client.retries == 2
            assert np.array_equal(got.codes, want.codes) and np.array_equal(got.norms, want.norms)
        # With no retries left the drop is an error naming the transport failure, never a wrong answer.
        proxy.dropped, proxy.drops = 0, 1
        with IsoQuantClient(f"http://127.0.0.1:{proxy.port}", api_key=API_KEY, max_retries=0) as client:
            client._core.set_limits(limits)
            with pytest.raises(TransportError) as info:
                client.quantize(vectors, bits=3)
            assert info.value.type == "connect_error" and proxy.dropped == 1
    finally:
        proxy.close()
