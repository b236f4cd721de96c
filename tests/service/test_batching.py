"""Dynamic batching (service/batching.py): concurrent small requests of one kind share one device launch,
and every request gets exactly the bytes, or the error, it gets alone."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from clients import IsoQuantClient
from clients.errors import IsoQuantError
from kernels import Packed, Quantizer
from service.batching import Coalescer
from tests.live_service import SMALL_CPU_ENV, start_server, stop_server

BATCHED = {**SMALL_CPU_ENV, "ISOQUANT_BATCH_DELAY_MS": "150", "ISOQUANT_BATCH_MAX_VECTORS": "256"}
CLIENTS = 12


@pytest.fixture(scope="module")
def server():
    server = start_server(BATCHED)
    yield server
    stop_server(server)


def _coalesced(server, op: str) -> tuple[float, float]:
    """(groups launched, requests in them) of op, from /metrics."""
    text = server.metrics_text()
    count = re.search(rf'^isoquant_coalesced_requests_count{{op="{op}"}} (\S+)$', text, re.M)
    total = re.search(rf'^isoquant_coalesced_requests_sum{{op="{op}"}} (\S+)$', text, re.M)
    return (float(count.group(1)), float(total.group(1))) if count and total else (0.0, 0.0)


def _at_once(fn, args: list) -> list:
    """fn(arg) for every arg on its own thread, released together (so that they fall in one batching window);
    each result or the exception it raised."""
    start = threading.Barrier(len(args))

    def call(arg):
        start.wait()
        try:
            return fn(arg)
        except IsoQuantError as exc:
            return exc

    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(call, args))


def test_concurrent_requests_share_launches_and_get_their_own_bytes(server):
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((1 + i % 7, 64)).astype(np.float32) for i in range(CLIENTS)]
    library = Quantizer("full", 64, 3)
    groups0, requests0 = _coalesced(server, "quantize")
    with IsoQuantClient(server.url) as client:
        packed = _at_once(lambda x: client.quantize(x, variant="full", bits=3), batches)
        groups, requests = _coalesced(server, "quantize")
        assert requests - requests0 == CLIENTS
        assert groups - groups0 < CLIENTS  # at least two requests shared a launch
        for x, got in zip(batches, packed, strict=True):
            want = library.quantize(torch.from_numpy(x))
            assert np.array_equal(got.codes, want.codes.numpy()) and np.array_equal(got.norms, want.norms.numpy())

        d_groups0, _ = _coalesced(server, "dequantize")
        vectors = _at_once(lambda p: client.dequantize(p), packed)
        d_groups, d_requests = _coalesced(server, "dequantize")
        assert d_groups - d_groups0 < CLIENTS
        for p, got in zip(packed, vectors, strict=True):
            want = library.dequantize(_packed(library, p))
            assert got.dtype == np.float32 and np.array_equal(got, want.numpy())


def _packed(library: Quantizer, p):
    return Packed(codes=torch.from_numpy(np.asarray(p.codes)), norms=torch.from_numpy(np.asarray(p.norms)),
                  **library.descriptor())


def test_a_bad_request_in_a_group_gets_its_own_error_and_the_others_their_answers(server):
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((3, 64)).astype(np.float32) for _ in range(6)]
    batches[2][1, 5] = np.nan
    library = Quantizer("full", 64, 3)
    with IsoQuantClient(server.url) as client:
        results = _at_once(lambda x: client.quantize(x, variant="full", bits=3), batches)
    for i, (x, got) in enumerate(zip(batches, results, strict=True)):
        if i == 2:
            assert isinstance(got, IsoQuantError) and got.status == 422
            assert "NaN or Inf in vectors [1]" in str(got)
        else:
            want = library.quantize(torch.from_numpy(x))
            assert np.array_equal(got.codes, want.codes.numpy()) and np.array_equal(got.norms, want.norms.numpy())


def test_a_group_launches_on_its_timer_or_when_full_and_never_mixes_keys():
    # The engine puts quantizer, op and dtype in the key (and lets no request with a reconstruction,
    # distortion or reference join at all).
    launched: list[tuple[str, list[int]]] = []

    async def scenario():
        # Three workers: none of these launches waits for a free one (the next test has those).
        coalescer = Coalescer(
            0.05, 10, lambda key, members: launched.append((key, [m.rows for m in members])), capacity=3
        )
        a = coalescer.join("a", (), 4)
        b = coalescer.join("b", (), 3)
        coalescer.join("a", (), 6)  # a reaches 10 rows: launched at once
        assert [key for key, _ in launched] == ["a"] and coalescer.open_groups() == 1
        coalescer.join("a", (), 1)  # a new group of a, on its own timer
        await asyncio.sleep(0.15)
        assert not a.done() and not b.done()  # nobody resolved them: the launch callback owns that

    asyncio.run(scenario())
    assert launched == [("a", [4, 6]), ("b", [3]), ("a", [1])]


def test_a_group_whose_delay_is_over_waits_open_for_a_free_worker():
    """With its one worker running a group, a group whose delay is over is not launched: it stays open and
    takes later arrivals, and is launched when the running group finishes; groups that became due meanwhile go
    in the order their delays ended. A group that fills up is launched at once, worker free or not."""
    launched: list[tuple[str, list[int]]] = []

    async def scenario():
        coalescer = Coalescer(
            0.02, 10, lambda key, members: launched.append((key, [m.rows for m in members])), capacity=1
        )
        coalescer.join("a", (), 1)
        await asyncio.sleep(0.05)
        assert launched == [("a", [1])]  # the worker was free: launched on its timer
        coalescer.join("b", (), 2)
        await asyncio.sleep(0.01)
        coalescer.join("c", (), 3)
        await asyncio.sleep(0.05)  # both delays over, the worker still busy with a
        coalescer.join("b", (), 4)  # joins the open (due) group b
        assert launched == [("a", [1])] and coalescer.open_groups() == 2
        coalescer.finished()  # a ends: b, the first due, starts; c waits for b
        assert launched[1:] == [("b", [2, 4])] and coalescer.open_groups() == 1
        coalescer.join("c", (), 7)  # c reaches 10 rows: launched at once, though b still runs
        assert launched[2:] == [("c", [3, 7])]
        coalescer.finished()
        coalescer.finished()
        coalescer.join("d", (), 1)
        await asyncio.sleep(0.05)
        assert launched[3:] == [("d", [1])]  # nothing running: on its timer again

    asyncio.run(scenario())


def test_requests_that_time_out_waiting_for_their_group_get_503_and_give_their_places_back():
    # The group's delay (200 ms) is longer than the job timeout (50 ms): every member times out waiting.
    server = start_server({**BATCHED, "ISOQUANT_BATCH_DELAY_MS": "200", "ISOQUANT_JOB_TIMEOUT_S": "0.05"})
    try:
        rng = np.random.default_rng(5)
        with IsoQuantClient(server.url, max_retries=0) as client:
            results = _at_once(lambda x: client.quantize(x, variant="full", bits=3),
                               [rng.standard_normal((2, 64)).astype(np.float32) for _ in range(4)])
        assert all(isinstance(r, IsoQuantError) and r.status == 503 and r.type == "timeout" for r in results)
        time.sleep(0.5)  # the group still runs after its members stopped waiting, then releases their places
        text = server.metrics_text()
        assert re.search(r"^isoquant_queue_depth 0\.0$", text, re.M) and re.search(r"^isoquant_jobs_running 0\.0$",
                                                                                   text, re.M)
        _, requests = _coalesced(server, "quantize")
        assert requests == 4
    finally:
        log = server.log_text()
        stop_server(server)
    assert "never retrieved" not in log and "Traceback" not in log, log[-2000:]
