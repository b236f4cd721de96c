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


def test_the_engine_launches_a_due_group_when_the_running_one_resolves_and_refuses_it_when_closed():
    """In the engine (one device worker): while a group's job runs, the next group's delay ends and it takes a
    later request too; it launches when the running group's answers are out, with all three, and every answer
    is the library's. Closed while a group is due: that group's requests get 503 shutting_down and give their
    queue places back."""
    from service.engine import Engine
    from service.errors import Unavailable
    from service.metrics import Metrics
    from tests.service.conftest import settings

    s = settings(batch_delay_ms=20, workers=1, warm_variants=[], warm_dims=[], warm_bits=[], warm_dtypes=[])
    engine = Engine(s, Metrics(s, "test"))
    library = Quantizer("full", 64, 3, s.default_seed)
    release, started = threading.Event(), threading.Event()
    group_job = engine._group_job

    def gated(key, members):  # the first group holds the worker until released
        started.set()
        if not release.is_set():
            release.wait(10)
        return group_job(key, members)

    engine._group_job = gated
    xs = [torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) for n in (1, 2, 3, 4)]

    async def quantize(x):
        with engine.admit() as ticket:
            return await engine.quantize("full", 3, s.default_seed, x, False, False, ticket=ticket)

    async def scenario():
        first = asyncio.create_task(quantize(xs[0]))
        await asyncio.to_thread(started.wait, 10)  # group 1 runs (and holds the worker)
        second = [asyncio.create_task(quantize(x)) for x in xs[1:3]]
        await asyncio.sleep(0.1)  # their delay is over: due, not launched
        assert engine.coalescer.open_groups() == 1 and not any(t.done() for t in second)
        third = asyncio.create_task(quantize(xs[3]))  # joins the due group
        await asyncio.sleep(0.02)
        release.set()
        results = await asyncio.gather(first, *second, third)
        for x, got in zip(xs, results, strict=True):
            want = library.quantize(x)
            assert torch.equal(got.codes, want.codes) and torch.equal(got.norms, want.norms)
        # Closing with a due group: the worker busy again, a group due behind it, then close.
        release.clear()
        started.clear()
        busy = asyncio.create_task(quantize(xs[0]))
        await asyncio.to_thread(started.wait, 10)
        due = asyncio.create_task(quantize(xs[1]))
        await asyncio.sleep(0.1)
        closing = asyncio.create_task(asyncio.to_thread(engine.close))
        await asyncio.sleep(0.05)
        release.set()
        await closing
        assert (await busy).codes.shape == (1, library.code_bytes)
        with pytest.raises(Unavailable, match="shutting down"):
            await due

    asyncio.run(scenario())
    metrics = engine.metrics.registry
    # Groups of 1, 3 and 1 ran; the last group of 1 was formed but refused at the closed workers.
    assert metrics.get_sample_value("isoquant_coalesced_requests_count", {"op": "quantize"}) == 4
    assert metrics.get_sample_value("isoquant_coalesced_requests_sum", {"op": "quantize"}) == 6
    assert metrics.get_sample_value("isoquant_queue_depth") == 0
    assert metrics.get_sample_value("isoquant_jobs_running") == 0


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
