"""``isoquant bench``: a load generator for the service, after perf_analyzer's two modes.

Closed loop (the default): ``concurrency`` workers each keep one request in flight, the same pre-built body
(random vectors, or their codes for ``op="dequantize"``). Fixed rate (``rate``): a request is started every
1/rate seconds whatever the answers, at most ``concurrency`` in flight; a request that had to wait for a free
place counts as delayed, and its latency runs from its scheduled start (so a server that falls behind shows
in the percentiles, not as a quietly lower rate).

A run stops at the first of: ``requests`` sent, ``duration`` seconds, or ``max_connection_failures``
consecutive requests without an HTTP answer (the server stopped or is unreachable: sending on into a dead
server measured nothing). The report says which. Requests in flight when the bound is reached are awaited
and counted; after connection failures they are abandoned. Nothing is retried: a 429 or 503 is counted
under its status, so the report shows how the server sheds load.

The report leads with the failure share. Throughput counts successful (2xx) requests only, over the run
(first send to last answer): requests/s, vectors/s, and MB/s = 10^6 bytes of float vectors quantized (or
reconstructed); the wire rates count the bytes of requests that were answered and of their answers.
Latency percentiles (p50, p90, p95, p99, p99.9) are of successful requests, client-side wall clock.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TextIO

import httpx
import numpy as np

from clients._codec import PackedCodes
from clients.client import AsyncIsoQuantClient, _Core
from clients.errors import error_from_response

_DTYPES = {"float32": np.float32, "float16": np.float16}
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0), ("p99.9", 99.9))
# Why a run ended (BenchReport.stopped_by).
STOP_REQUESTS, STOP_DURATION, STOP_CONNECTION = "requests", "duration", "connection_failures"
# Rate mode: a request started this much after its scheduled time counts as delayed.
LATE_S = 0.010


@dataclass
class BenchConfig:
    url: str
    api_key: str | None = None
    op: str = "quantize"  # quantize | dequantize
    variant: str = "full"
    dim: int = 128
    bits: int = 3
    seed: int | None = None
    batch: int = 256
    dtype: str = "float32"
    concurrency: int = 4  # closed loop: workers; rate mode: most requests in flight
    requests: int | None = None  # bound on requests sent
    duration: float | None = None  # bound on seconds
    format: str = "safetensors"
    timeout: float = 60.0
    rate: float | None = None  # requests/s of the fixed-rate mode; None: closed loop
    max_connection_failures: int = 10  # consecutive requests without an answer that end the run; 0: never

    def validate(self) -> None:
        if self.op not in ("quantize", "dequantize"):
            raise ValueError(f"op must be quantize or dequantize; got {self.op!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        for name in ("dim", "batch", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.requests is None and self.duration is None:
            raise ValueError("give a bound: requests, duration or both")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1; got {self.requests}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"duration must be > 0; got {self.duration}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s; got {self.rate}")
        if self.max_connection_failures < 0:
            raise ValueError(f"max_connection_failures must be >= 0; got {self.max_connection_failures}")

    def public(self) -> dict:
        """The configuration for the report: the API key is never shown, only whether one was sent."""
        return {**asdict(self), "api_key": "<redacted>" if self.api_key else None}


@dataclass
class BenchReport:
    """The outcome of one run. Latencies in milliseconds; MB = 10^6 bytes; rates over ``elapsed_s``."""

    config: dict
    requests: int  # finished: answered, or failed without an answer
    ok: int
    failed: int
    failed_share: float  # failed / requests
    stopped_by: str  # requests | duration | connection_failures
    stop_detail: str
    by_status: dict[str, int]
    elapsed_s: float
    requests_per_s: float  # successful requests only
    vectors_per_s: float
    mb_per_s: float
    upload_mb_per_s: float
    download_mb_per_s: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    mode: str = "closed"  # closed | rate
    delayed: int = 0  # rate mode: requests started more than 10 ms after their scheduled time
    abandoned: int = 0  # in flight when the run stopped for connection failures: not counted above

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        c = self.config
        lat = self.latency_ms
        statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(self.by_status.items())) or "none"
        load = (f"rate {c['rate']:g} requests/s (at most {c['concurrency']} in flight)" if self.mode == "rate"
                else f"concurrency {c['concurrency']}")
        lines = [
            f"isoquant bench: {c['op']} {c['variant']}/{c['bits']} bits, dim {c['dim']}, batch {c['batch']} "
            f"{c['dtype']}, {load}, {c['format']} -> {c['url']}",
            f"server       {self.server.get('device')} (backend {self.server.get('backend')}), "
            f"max_queue {self.server.get('max_queue')}, workers {self.server.get('workers')}, "
            f"torch_threads {self.server.get('torch_threads')}",
            f"failed       {self.failed_share:.1%} ({self.failed:,} of {self.requests:,} requests; {self.ok:,} ok)",
            f"stopped      {self.stop_detail}",
            f"by status    {statuses}",
            f"throughput   {self.requests_per_s:,.1f} successful requests/s, {self.vectors_per_s:,.0f} vectors/s, "
            f"{self.mb_per_s:,.2f} MB/s of vectors (wire: up {self.upload_mb_per_s:,.2f} MB/s, "
            f"down {self.download_mb_per_s:,.2f} MB/s), over {self.elapsed_s:.2f} s",
        ]
        if self.mode == "rate":
            lines.append(f"schedule     {self.delayed:,} of {self.requests + self.abandoned:,} requests started more "
                         f"than {LATE_S * 1000:.0f} ms late (all {c['concurrency']} places taken); latency counts "
                         "from the scheduled start")
        if lat:
            cells = "  ".join(f"{name} {lat[name]:.1f}" for name, _ in PERCENTILES)
            lines.append(f"latency ms   {cells}  mean {lat['mean']:.1f}  max {lat['max']:.1f}")
        else:
            lines.append("latency ms   (no successful request)")
        return "\n".join(lines)


class Progress:
    """A one-line progress bar on a text stream (stderr), redrawn by the caller (10 times a second): done and
    failed so far, the rate over the last second and the average."""

    def __init__(self, stream: TextIO, total: int | None, duration: float | None, width: int = 28) -> None:
        self.stream, self.total, self.duration, self.width = stream, total, duration, width
        self.start = time.perf_counter()
        self.recent: collections.deque[tuple[float, int]] = collections.deque([(self.start, 0)])
        self.drawn = False

    def draw(self, done: int, ok: int, final: bool = False) -> None:
        now = time.perf_counter()
        elapsed = now - self.start
        self.recent.append((now, done))
        while len(self.recent) > 2 and now - self.recent[1][0] >= 1.0:
            self.recent.popleft()  # keep about one second of samples
        fractions = []
        if self.total:
            fractions.append(done / self.total)
        if self.duration:
            fractions.append(elapsed / self.duration)
        fraction = 1.0 if final else min(1.0, max(fractions or [0.0]))
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        of = f"/{self.total}" if self.total else ""
        (t_old, done_old) = self.recent[0]
        now_rate = (done - done_old) / (now - t_old) if now > t_old else 0.0
        average = done / elapsed if elapsed > 0 else 0.0
        self.stream.write(f"\r[{bar}] {fraction * 100:5.1f}% {done}{of} req  ok {ok}  failed {done - ok}  "
                          f"now {now_rate:,.1f} req/s  avg {average:,.1f} req/s  {elapsed:.1f}s ")
        if final:
            self.stream.write("\n")
        self.stream.flush()
        self.drawn = True


def _percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    ms = np.asarray(latencies) * 1000.0
    values = np.percentile(ms, [q for _, q in PERCENTILES])
    out = {name: float(v) for (name, _), v in zip(PERCENTILES, values, strict=True)}
    out.update(mean=float(ms.mean()), max=float(ms.max()))
    return out


class _Run:
    """The counters of one run and the stop decision, shared by the request tasks (one event loop: no locks)."""

    def __init__(self, cfg: BenchConfig, http: httpx.AsyncClient, url: str, body: bytes, headers: dict) -> None:
        self.cfg, self.http, self.url, self.body, self.headers = cfg, http, url, body, headers
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.sent = self.done = self.ok = self.up = self.down = self.delayed = 0
        self.consecutive_failures = 0
        self.stopped_by: str | None = None
        self.stop = asyncio.Event()
        self.start = time.perf_counter()
        self.last = self.start
        self.deadline = self.start + cfg.duration if cfg.duration else None

    def finish(self, reason: str) -> None:
        if self.stopped_by is None:
            self.stopped_by = reason
        self.stop.set()

    def may_send(self, at: float) -> bool:
        """Whether another request may start at time ``at`` (sets the stop reason when a bound is reached)."""
        if self.stop.is_set():
            return False
        if self.cfg.requests is not None and self.sent >= self.cfg.requests:
            self.finish(STOP_REQUESTS)
            return False
        if self.deadline is not None and at >= self.deadline:
            self.finish(STOP_DURATION)
            return False
        return True

    async def one(self, t0: float) -> None:
        """Send the body once; latency from ``t0`` (the send, or the scheduled start in rate mode)."""
        try:
            response = await self.http.post(self.url, content=self.body, headers=self.headers)
        except httpx.TransportError as exc:  # no HTTP answer: refused, reset, timed out
            key = "timeout" if isinstance(exc, httpx.TimeoutException) else type(exc).__name__
            self.statuses[key] += 1
            self.done += 1
            self.last = max(self.last, time.perf_counter())
            self.consecutive_failures += 1
            limit = self.cfg.max_connection_failures
            if limit and self.consecutive_failures >= limit:
                self.finish(STOP_CONNECTION)
            return
        t1 = time.perf_counter()
        self.consecutive_failures = 0
        self.statuses[str(response.status_code)] += 1
        self.done += 1
        self.up += len(self.body)
        self.down += len(response.content)
        self.last = max(self.last, t1)
        if response.status_code < 400:
            self.ok += 1
            self.latencies.append(t1 - t0)


async def _closed_loop(run: _Run) -> list[asyncio.Task]:
    async def worker() -> None:
        while run.may_send(time.perf_counter()):
            run.sent += 1
            await run.one(time.perf_counter())

    return [asyncio.ensure_future(worker()) for _ in range(run.cfg.concurrency)]


async def _fixed_rate(run: _Run) -> list[asyncio.Task]:
    places = asyncio.Semaphore(run.cfg.concurrency)
    tasks: list[asyncio.Task] = []
    interval = 1.0 / run.cfg.rate

    async def send(scheduled: float) -> None:
        try:
            await run.one(scheduled)
        finally:
            places.release()

    i = 0
    while True:
        scheduled = run.start + i * interval
        if not run.may_send(scheduled):
            break
        wait = scheduled - time.perf_counter()
        if wait > 0:
            try:  # a stop (connection failures) ends the wait at once
                await asyncio.wait_for(run.stop.wait(), wait)
                break
            except TimeoutError:
                pass
        await places.acquire()
        if run.stop.is_set():
            places.release()
            break
        if time.perf_counter() - scheduled > LATE_S:
            run.delayed += 1
        run.sent += 1
        i += 1
        tasks.append(asyncio.ensure_future(send(scheduled)))
    return tasks


async def run_bench(cfg: BenchConfig, progress: TextIO | None = None) -> BenchReport:
    """Run the load described by ``cfg`` and return its report. The set-up (GET /info, one warm-up
    request, and for dequantize the codes to send) raises clients.errors exceptions; the timed requests
    never raise, their failures are counted."""
    cfg.validate()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((cfg.batch, cfg.dim)).astype(_DTYPES[cfg.dtype])
    core = _Core(cfg.url, cfg.api_key, cfg.timeout, cfg.format, 0, 0.0, 0.0, 0.0, None)
    limits = httpx.Limits(max_connections=cfg.concurrency + 1, max_keepalive_connections=cfg.concurrency + 1)
    async with httpx.AsyncClient(timeout=cfg.timeout, limits=limits) as http:
        async with AsyncIsoQuantClient(cfg.url, cfg.api_key, cfg.timeout, format=cfg.format, http_client=http) as sdk:
            info = await sdk.info()
            max_vectors = info["limits"]["max_vectors"]
            if cfg.batch > max_vectors:
                raise ValueError(f"batch {cfg.batch} exceeds the server's max_vectors {max_vectors}")
            if cfg.op == "quantize":
                path = "/quantize"
                body, headers = core.quantize_body(vectors, cfg.variant, cfg.bits, cfg.seed)
                vector_bytes = vectors.nbytes
            else:
                path = "/dequantize"
                packed: PackedCodes = await sdk.quantize(vectors, variant=cfg.variant, bits=cfg.bits, seed=cfg.seed)
                codes, norms = packed.rows()
                body, headers = core.dequantize_body(packed, slice(None), codes, norms, None, "float32")
                vector_bytes = cfg.batch * cfg.dim * 4
        url = core.base_url + path
        warm = await http.post(url, content=body, headers=headers)  # builds the quantizer server-side
        if warm.status_code >= 400:
            raise error_from_response(warm.status_code, warm.content)

        run = _Run(cfg, http, url, body, headers)
        bar = Progress(progress, cfg.requests, cfg.duration) if progress is not None else None

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.1)
                bar.draw(run.done, run.ok)

        tick = asyncio.ensure_future(ticker()) if bar else None
        try:
            tasks = await (_fixed_rate(run) if cfg.rate else _closed_loop(run))
            # Until every request has finished, or at once when the run stops for connection failures.
            while not run.stop.is_set():
                stop = asyncio.ensure_future(run.stop.wait())
                await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
            if run.stopped_by != STOP_CONNECTION:  # a bound was reached: what is in flight is awaited and counted
                await asyncio.gather(*tasks)
            abandoned = 0
            if run.stopped_by == STOP_CONNECTION:
                abandoned = run.sent - run.done
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if tick:
                tick.cancel()
                await asyncio.gather(tick, return_exceptions=True)
        if bar:
            bar.draw(run.done, run.ok, final=True)

    elapsed = max(run.last - run.start, 1e-9)
    reason = run.stopped_by or STOP_REQUESTS
    if reason == STOP_REQUESTS:
        detail = f"after {run.sent:,} requests (--requests)"
        if cfg.duration is not None:
            detail += f", before --duration {cfg.duration:g} s ended"
    elif reason == STOP_DURATION:
        detail = f"after {cfg.duration:g} s (--duration), {run.sent:,} requests sent"
        if cfg.requests is not None:
            detail += f" of --requests {cfg.requests}"
    else:
        detail = (f"after {cfg.max_connection_failures} consecutive requests without an answer (the server stopped or "
                  f"is unreachable), {elapsed:.2f} s into the run; {abandoned} in flight abandoned")
    failed = run.done - run.ok
    return BenchReport(
        config={**cfg.public(), "url": core.base_url},
        requests=run.done,
        ok=run.ok,
        failed=failed,
        failed_share=failed / run.done if run.done else 0.0,
        stopped_by=reason,
        stop_detail=detail,
        by_status=dict(run.statuses),
        elapsed_s=elapsed,
        requests_per_s=run.ok / elapsed,
        vectors_per_s=run.ok * cfg.batch / elapsed,
        mb_per_s=run.ok * vector_bytes / elapsed / 1e6,
        upload_mb_per_s=run.up / elapsed / 1e6,
        download_mb_per_s=run.down / elapsed / 1e6,
        latency_ms=_percentiles(run.latencies),
        server={"device": info.get("device"), "backend": info.get("backend"),
                "max_queue": info["limits"].get("max_queue"), "workers": info["limits"].get("workers"),
                "torch_threads": info["limits"].get("torch_threads")},
        mode="rate" if cfg.rate else "closed",
        delayed=run.delayed,
        abandoned=abandoned,
    )


def main_sync(cfg: BenchConfig, progress: bool) -> BenchReport:
    return asyncio.run(run_bench(cfg, sys.stderr if progress else None))
