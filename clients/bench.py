"""``isoquant bench``: a closed-loop load generator for the service.

``concurrency`` workers each send one request at a time, the same pre-built body (random vectors, or
their codes for ``op="dequantize"``), until ``requests`` have been sent or ``duration`` seconds have
passed (whichever comes first); requests in flight at the end are awaited and counted. Nothing is
retried: a 429 or 503 is counted under its status, so the report shows how the server sheds load.

Throughput is over the whole run (first send to last answer): requests/s counts every answer,
vectors/s and MB/s count successful (2xx) requests only, MB = 10^6 bytes of float vectors quantized
(or reconstructed). Latency percentiles are of successful requests, client-side wall clock.
"""

from __future__ import annotations

import asyncio
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
    concurrency: int = 4
    requests: int | None = None  # bound on requests sent
    duration: float | None = None  # bound on seconds
    format: str = "safetensors"
    timeout: float = 60.0

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


@dataclass
class BenchReport:
    """The outcome of one run. Latencies in milliseconds; MB = 10^6 bytes."""

    config: dict
    requests: int
    ok: int
    failed: int
    by_status: dict[str, int]
    elapsed_s: float
    requests_per_s: float
    vectors_per_s: float
    mb_per_s: float
    upload_mb_per_s: float
    download_mb_per_s: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    server: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        c = self.config
        lat = self.latency_ms
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items())) or "none"
        lines = [
            f"isoquant bench: {c['op']} {c['variant']}/{c['bits']} bits, dim {c['dim']}, batch {c['batch']} "
            f"{c['dtype']}, concurrency {c['concurrency']}, {c['format']} -> {c['url']}",
            f"server       {self.server.get('device')} (backend {self.server.get('backend')}), "
            f"max_queue {self.server.get('max_queue')}, workers {self.server.get('workers')}",
            f"requests     {self.requests} in {self.elapsed_s:.2f} s: {self.ok} ok, {self.failed} failed",
            f"by status    {statuses}",
            f"throughput   {self.requests_per_s:,.1f} requests/s, {self.vectors_per_s:,.0f} vectors/s, "
            f"{self.mb_per_s:,.2f} MB/s of vectors (wire: up {self.upload_mb_per_s:,.2f} MB/s, "
            f"down {self.download_mb_per_s:,.2f} MB/s)",
        ]
        if lat:
            lines.append(f"latency ms   p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}  "
                         f"mean {lat['mean']:.1f}  max {lat['max']:.1f}")
        else:
            lines.append("latency ms   (no successful request)")
        return "\n".join(lines)


class Progress:
    """A one-line progress bar on a text stream (stderr), redrawn at most 10 times a second."""

    def __init__(self, stream: TextIO, total: int | None, duration: float | None, width: int = 28) -> None:
        self.stream, self.total, self.duration, self.width = stream, total, duration, width
        self.start = time.perf_counter()
        self.drawn = False

    def draw(self, done: int, ok: int, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        fractions = []
        if self.total:
            fractions.append(done / self.total)
        if self.duration:
            fractions.append(elapsed / self.duration)
        fraction = 1.0 if final else min(1.0, max(fractions or [0.0]))
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        of = f"/{self.total}" if self.total else ""
        rate = done / elapsed if elapsed > 0 else 0.0
        self.stream.write(f"\r[{bar}] {fraction * 100:5.1f}% {done}{of} req  ok {ok}  failed {done - ok}  "
                          f"{rate:,.1f} req/s  {elapsed:.1f}s")
        if final:
            self.stream.write("\n")
        self.stream.flush()
        self.drawn = True


def _percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    ms = np.asarray(latencies) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean()), "max": float(ms.max())}


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

        statuses: Counter[str] = Counter()
        latencies: list[float] = []
        sent = done = ok = 0
        down = 0
        start = time.perf_counter()
        deadline = start + cfg.duration if cfg.duration else None
        bar = Progress(progress, cfg.requests, cfg.duration) if progress is not None else None
        last = start

        async def worker() -> None:
            nonlocal sent, done, ok, down, last
            while True:
                if cfg.requests is not None and sent >= cfg.requests:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                sent += 1
                t0 = time.perf_counter()
                try:
                    response = await http.post(url, content=body, headers=headers)
                    key = str(response.status_code)
                    down += len(response.content)
                    success = response.status_code < 400
                except httpx.TimeoutException:
                    key, success = "timeout", False
                except httpx.TransportError as exc:
                    key, success = type(exc).__name__, False
                t1 = time.perf_counter()
                statuses[key] += 1
                done += 1
                last = max(last, t1)
                if success:
                    ok += 1
                    latencies.append(t1 - t0)

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.1)
                bar.draw(done, ok)

        tick = asyncio.ensure_future(ticker()) if bar else None
        try:
            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        finally:
            if tick:
                tick.cancel()
                await asyncio.gather(tick, return_exceptions=True)
        if bar:
            bar.draw(done, ok, final=True)

    elapsed = max(last - start, 1e-9)
    return BenchReport(
        config={**asdict(cfg), "api_key": None, "url": core.base_url},
        requests=done,
        ok=ok,
        failed=done - ok,
        by_status=dict(statuses),
        elapsed_s=elapsed,
        requests_per_s=done / elapsed,
        vectors_per_s=ok * cfg.batch / elapsed,
        mb_per_s=ok * vector_bytes / elapsed / 1e6,
        upload_mb_per_s=done * len(body) / elapsed / 1e6,
        download_mb_per_s=down / elapsed / 1e6,
        latency_ms=_percentiles(latencies),
        server={"device": info.get("device"), "backend": info.get("backend"),
                "max_queue": info["limits"].get("max_queue"), "workers": info["limits"].get("workers")},
    )


def main_sync(cfg: BenchConfig, progress: bool) -> BenchReport:
    return asyncio.run(run_bench(cfg, sys.stderr if progress else None))
