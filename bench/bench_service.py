"""Service throughput: /quantize and /dequantize over HTTP, JSON and safetensors, next to the in-process
library call on the same machine and device.

For each batch size (default 1, 128, 8,192 and 65,536 vectors of dim 128, float16, full, 3 bits) it
sends the same body ``repeats`` times over one keep-alive connection (httpx for JSON; for safetensors
``LoadClient``, a minimal client that reads each answer into one buffer) in sequence (latency and the
throughput of one client; the paths are interleaved round by round so that all see the same load) and
reports requests/s, vectors/s, MB/s and
p50/p99 latency. MB/s counts the uncompressed vectors (N * dim * 2 bytes for float16) for both ops, so
every row is comparable.

"library" rows: ``Quantizer.quantize`` / ``dequantize`` in this process on the service's device, in a
worker thread like the service's engine, host tensors in and host tensors out (the service receives
and returns host bytes too, so on a GPU the transfers are counted on both sides). "vs library" is the
row's vectors/s over the library's at that size.

"http safetensors xN" rows (``--concurrency N``): N client processes at once, each with one keep-alive
connection sending binary bodies (throughput over the wall time of all of them); stderr says how those
connections spread over the server's processes (a keep-alive connection stays with the process that
accepted it; the supervisor deals new connections to the processes in turn). ``--new-connections`` adds
"xN new connections" rows: every request opens its own connection. With
``--processes P`` the service runs P server processes on its port (ISOQUANT_PROCESSES): one process
receives bodies at about 1 GB/s on the H200 host, so the GPU target needs several.

    python bench/bench_service.py                       # starts `python -m service` on a free port
    python bench/bench_service.py --processes 8 --concurrency 8 --batches 65536  # the GPU target
    python bench/bench_service.py --url http://host:8000  # an already running service (same settings)
    python bench/bench_service.py --batches 1,128 --quick

The service it starts warms only what the benchmark uses, allows 65,536 vectors and 256 MiB bodies.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as st_save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.host import process_tree_cpu  # noqa: E402
from bench.loadgen import SAFETENSORS, LoadClient, concurrent_requests, connections_per_process  # noqa: E402,F401
from kernels import Packed, Quantizer  # noqa: E402

JSON = "application/json"
# Requests per (batch size, op, format): enough for a p99 at small sizes, bounded at 65,536 on a CPU.
REPEATS = {1: 300, 128: 200, 8192: 30, 65536: 8}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def start_server(args) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkstemp(prefix="isoquant-bench-", suffix=".log")[1])
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "ISOQUANT_DEVICE": args.device,
        "ISOQUANT_WARM_VARIANTS": args.variant,
        "ISOQUANT_WARM_DIMS": str(args.dim),
        "ISOQUANT_WARM_BITS": str(args.bits),
        "ISOQUANT_WARM_DTYPES": args.dtype,
        "ISOQUANT_MAX_VECTORS": str(max(args.batches)),
        "ISOQUANT_MAX_REQUEST_BYTES": str(256 << 20),
        "ISOQUANT_LOG_LEVEL": "info",
    }
    if args.torch_threads:
        env["ISOQUANT_TORCH_THREADS"] = str(args.torch_threads)
    if args.processes:
        env["ISOQUANT_PROCESSES"] = str(args.processes)
    if args.batch_delay_ms:
        env["ISOQUANT_BATCH_DELAY_MS"] = str(args.batch_delay_ms)
    with open(log, "wb") as out:
        # Port 0: the OS picks a free port; uvicorn's "Uvicorn running on" line (info level) names it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    while True:
        match = re.search(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_bytes())
        if match:
            return proc, f"http://127.0.0.1:{match.group(1).decode()}", log
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"service did not start:\n{log.read_text()}")
        time.sleep(0.05)


def wait_ready(client: httpx.Client) -> dict:
    deadline = time.monotonic() + 300
    while True:
        r = client.get("/health/ready")
        if r.status_code == 200:
            return r.json()
        if time.monotonic() > deadline:
            raise SystemExit(f"service not ready: {r.text}")
        time.sleep(0.1)


def b64(t: torch.Tensor) -> dict:
    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    dtype = str(t.dtype).removeprefix("torch.")
    return {"data": base64.b64encode(raw).decode(), "dtype": dtype, "shape": list(t.shape)}


def request_once(client: httpx.Client, path: str, body: bytes, content_type: str) -> float:
    t0 = time.perf_counter()
    r = client.post(path, content=body, headers={"content-type": content_type})
    r.read()
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"{path} answered {r.status_code}: {r.text[:500]}")
    return elapsed


def binary_request_once(client: LoadClient, path: str, body: bytes) -> float:
    """One safetensors request on the load client's keep-alive connection (the single-client binary rows
    use the same client as the concurrent ones)."""
    t0 = time.perf_counter()
    status, answer = client.post(path, body)
    elapsed = time.perf_counter() - t0
    if status != 200:
        raise SystemExit(f"{path} answered {status}: {bytes(answer[:500])!r}")
    return elapsed


def coalesced(client: httpx.Client, op: str) -> tuple[float, float]:
    """(groups launched, requests in them) so far for ``op``, from the service's isoquant_coalesced_requests
    histogram (with several server processes: /metrics sums them). (0, 0) with batching off."""
    counts = {"isoquant_coalesced_requests_count": 0.0, "isoquant_coalesced_requests_sum": 0.0}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in counts and sample.labels.get("op") == op:
                counts[sample.name] += sample.value
    return counts["isoquant_coalesced_requests_count"], counts["isoquant_coalesced_requests_sum"]


def library_once(fn, sync) -> float:
    """Runs in the library's worker thread; times itself, so the thread hop is not counted."""
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def row(
    kind: str, op: str, n: int, dim: int, itemsize: int, times: list[float], base: float | None, wall: float = 0.0
) -> dict:
    """``wall``: elapsed time of concurrent requests (throughput = requests / wall, not / sum of latencies)."""
    total = wall or sum(times)
    vps = n * len(times) / total
    return {
        "path": kind,
        "op": op,
        "batch": n,
        "requests_per_s": len(times) / total,
        "vectors_per_s": vps,
        "mb_per_s": vps * dim * itemsize / 1e6,
        "p50_ms": percentile(times, 50) * 1e3,
        "p99_ms": percentile(times, 99) * 1e3,
        "ratio": vps / base if base else None,
        "repeats": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="benchmark a running service instead of starting one")
    parser.add_argument("--device", default="auto", help="service and library device (auto | cpu | cuda)")
    parser.add_argument("--batches", default="1,128,8192,65536")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--variant", default="full")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--torch-threads", type=int, help="intra-op threads for the service's and the library's worker")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="also N concurrent binary client processes (rows xN)"
    )
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="with --concurrency: also rows where every request opens its own connection",
    )
    parser.add_argument("--processes", type=int, help="server processes of the service it starts (ISOQUANT_PROCESSES)")
    parser.add_argument(
        "--batch-delay-ms",
        type=float,
        default=0.0,
        help="dynamic batching window of the service it starts (ISOQUANT_BATCH_DELAY_MS; 0: off)",
    )
    parser.add_argument("--quick", action="store_true", help="a quarter of the repeats")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--metrics-out", help="save the service's /metrics exposition after the run here")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]

    proc = log = None
    url = args.url
    if url is None:
        proc, url, log = start_server(args)
    args.server_pid = proc.pid if proc is not None else None  # its CPU time a request, in the concurrent rows
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            ready = wait_ready(client)
            device = torch.device(ready["device"])
            rows = run(client, args, device)
            info = client.get("/info").json()
            if args.metrics_out:
                Path(args.metrics_out).write_text(client.get("/metrics").text)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
            log.unlink(missing_ok=True)
    report(rows, args, device, info)


def run(client: httpx.Client, args, device: torch.device) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    q = Quantizer(args.variant, args.dim, args.bits, 0, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    # The library runs in a worker thread, as the service's engine runs it. (On this loaded 2-core
    # machine the main thread's OpenMP team of 2 ran the CPU reference up to 10x slower than a worker
    # thread did, which would flatter the service; the worker thread is the stricter baseline.)
    pool = ThreadPoolExecutor(max_workers=1)
    url = urlsplit(str(client.base_url))
    load_client = LoadClient(url.hostname, url.port)
    if args.torch_threads:
        pool.submit(torch.set_num_threads, args.torch_threads).result()
    for n in args.batches:
        repeats = max(3, REPEATS.get(n, 10) // (4 if args.quick else 1))
        x = torch.randn(n, args.dim, generator=torch.Generator().manual_seed(n)).to(dtype)
        packed_host = q.quantize(x.to(device))
        codes, norms = packed_host.codes.cpu(), packed_host.norms.cpu()

        def lib_quantize(x=x):
            p = q.quantize(x.to(device))
            return p.codes.cpu(), p.norms.cpu()

        def lib_dequantize(codes=codes, norms=norms):
            p = Packed(codes=codes.to(device), norms=norms.to(device), **q.descriptor())
            return q.dequantize(p, dtype).cpu()

        options = {"variant": args.variant, "bits": args.bits}
        descriptor = {k: str(v) for k, v in q.descriptor().items()}
        quantize_json = json.dumps({"vectors": b64(x), **options}).encode()
        quantize_st = st_save({"vectors": x}, metadata={k: str(v) for k, v in options.items()})
        dequantize_json = json.dumps(
            {"quantizer": q.descriptor(), "codes": b64(codes), "norms": b64(norms), "dtype": args.dtype}
        ).encode()
        dequantize_st = st_save({"codes": codes, "norms": norms}, metadata={**descriptor, "dtype": args.dtype})
        measurements = {
            ("library", "quantize"): lambda fn=lib_quantize: pool.submit(library_once, fn, sync).result(),
            ("library", "dequantize"): lambda fn=lib_dequantize: pool.submit(library_once, fn, sync).result(),
            ("http json", "quantize"): lambda b=quantize_json: request_once(client, "/quantize", b, JSON),
            ("http safetensors", "quantize"): lambda b=quantize_st: binary_request_once(load_client, "/quantize", b),
            ("http json", "dequantize"): lambda b=dequantize_json: request_once(client, "/dequantize", b, JSON),
            ("http safetensors", "dequantize"): lambda b=dequantize_st: binary_request_once(
                load_client, "/dequantize", b
            ),
        }
        # Interleaved rounds: every path is measured once per round, so all see the same machine load
        # (this 2-core machine is shared; back-to-back blocks drifted by 2x between paths).
        times: dict = {key: [] for key in measurements}
        for measure in measurements.values():
            measure()  # warm-up and a check of every path
        for _ in range(repeats):
            for key, measure in measurements.items():
                times[key].append(measure())
        base = {}
        for op in ("quantize", "dequantize"):
            r = row("library", op, n, args.dim, itemsize, times[("library", op)], None)
            base[op] = r["vectors_per_s"]
            rows.append(r)
        for op in ("quantize", "dequantize"):
            for path in ("http json", "http safetensors"):
                rows.append(row(path, op, n, args.dim, itemsize, times[(path, op)], base[op]))
        if args.concurrency > 1:
            # N clients at once on the binary path: decoding of one request overlaps another's device work,
            # and with several server processes the requests are received in parallel.
            for op, body in (("quantize", quantize_st), ("dequantize", dequantize_st)):
                modes = (False, True) if args.new_connections else (False,)
                for fresh in modes:
                    cpu_before = process_tree_cpu(args.server_pid) if args.server_pid else None
                    groups_before = coalesced(client, op)
                    times_c, wall, spread = concurrent_requests(
                        client.base_url, f"/{op}", body, args.concurrency, repeats, fresh
                    )
                    label = f"http safetensors x{args.concurrency}" + (" new connections" if fresh else "")
                    rows.append(row(label, op, n, args.dim, itemsize, times_c, base[op], wall))
                    groups, joined = (a - b for a, b in zip(coalesced(client, op), groups_before, strict=True))
                    rows[-1]["mean_group"] = joined / groups if groups else None
                    if cpu_before is not None:
                        cpu_after = process_tree_cpu(args.server_pid)
                        rows[-1]["server_cpu_ms"] = (cpu_after[0] - cpu_before[0]) / len(times_c) * 1e3
                        rows[-1]["loop_cpu_ms"] = (cpu_after[1] - cpu_before[1]) / len(times_c) * 1e3
                    if not fresh:
                        print(
                            f"/{op} x{args.concurrency}: keep-alive connections per server process {spread}",
                            file=sys.stderr,
                            flush=True,
                        )
        print(f"batch {n}: done", file=sys.stderr, flush=True)
    pool.shutdown()
    return rows


def report(rows: list[dict], args, device: torch.device, info: dict) -> None:
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = commit.stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    print(
        f"# bench/bench_service.py: {args.variant}, dim {args.dim}, {args.bits} bits, {args.dtype}; device {device} "
        f"({machine}, {os.cpu_count()} CPUs); backend {info.get('backend')}; torch {torch.__version__}; "
        f"torch threads {args.torch_threads or 'server default'}; server processes {args.processes or 1}; "
        f"batching delay {args.batch_delay_ms} ms; "
        f"load average {os.getloadavg()[0]:.1f}; {datetime.date.today()}; commit {commit}"
    )
    print("| path | op | batch | req/s | vectors/s | MB/s | p50 ms | p99 ms | vs library |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['ratio'] * 100:.0f}%" if r["ratio"] is not None else "-"
        print(
            f"| {r['path']} | {r['op']} | {r['batch']:,} | {r['requests_per_s']:,.1f} | {r['vectors_per_s']:,.0f} "
            f"| {r['mb_per_s']:,.1f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {ratio} |"
        )
    cpu_rows = [r for r in rows if "server_cpu_ms" in r]
    if cpu_rows:
        # From /proc, over each concurrent row: the whole server (its processes, all threads) and their main
        # threads, which run the event loops; divided by the row's requests.
        print("\n| path | op | batch | server CPU ms a request | of which event loops | requests a batched launch |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for r in cpu_rows:
            group = f"{r['mean_group']:.1f}" if r.get("mean_group") else "-"
            print(
                f"| {r['path']} | {r['op']} | {r['batch']:,} | {r['server_cpu_ms']:.3f} | {r['loop_cpu_ms']:.3f} "
                f"| {group} |"
            )
    big = max(args.batches)
    for op in ("quantize", "dequantize"):
        for r in rows:
            if r["path"].startswith("http safetensors") and r["op"] == op and r["batch"] == big:
                verdict = "meets" if r["ratio"] >= 0.7 else "misses"
                clients, _, mode = (r["path"].removeprefix("http safetensors").strip() or "x1").partition(" ")
                mode = f" ({mode})" if mode else ""
                print(
                    f"target: binary /{op} at {big:,} vectors, {clients.lstrip('x')} client(s){mode}, "
                    f"{args.processes or 1} server process(es): {r['ratio'] * 100:.0f}% of the in-process "
                    f"throughput ({verdict} the 70% target)"
                )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
