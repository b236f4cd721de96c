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
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch
from safetensors.torch import save as st_save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import Packed, Quantizer  # noqa: E402

SAFETENSORS = "application/x-safetensors"
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


class LoadClient:
    """A minimal HTTP/1.1 keep-alive client for the binary rows: it sends a POST and reads the answer,
    framed by Content-Length, into one preallocated buffer. Why not http.client: on the H200 host
    (Python 3.12.3) reading a 16 MiB answer took it ~20 ms, so /dequantize measured 26 ms a request with
    http.client and 9.7 ms with this reader against the same server (httpx took ~3x http.client's CPU);
    the load generator, not the service, set the numbers. It speaks only what the service answers here:
    a status line, headers with Content-Length, a body."""

    def __init__(self, host: str, port: int, timeout: float = 300.0) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def post(self, path: str, body: bytes, content_type: str = SAFETENSORS) -> tuple[int, bytearray]:
        """(status, answer body) of one POST. A kept-alive connection the server has closed meanwhile
        (uvicorn closes idle ones after 5 s) is replaced once, as http clients do."""
        reused = self.sock is not None
        try:
            return self._post(path, body, content_type)
        except _ClosedBeforeAnswer:
            self.close()
            if not reused:
                raise
            return self._post(path, body, content_type)

    def _post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytearray]:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
            # Head and body go out in two sends: without TCP_NODELAY the second waited for the delayed
            # ACK of the first (40 ms a request).
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.address[0]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            self.sock.sendall(head)
            self.sock.sendall(body)
            chunk = self.sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _ClosedBeforeAnswer(f"{path}: {exc}") from exc
        if not chunk:
            raise _ClosedBeforeAnswer(f"{path}: the server closed the connection before answering")
        received = chunk
        while b"\r\n\r\n" not in received:  # from here on a failure is an error, never a resend
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{path}: the server closed the connection inside the answer's head")
            received += chunk
        header, rest = received.split(b"\r\n\r\n", 1)
        status = int(header.split(b" ", 2)[1])
        length = re.search(rb"(?im)^content-length:\s*(\d+)", header)
        if length is None:
            raise ConnectionError(f"{path}: an answer without Content-Length: {header[:300]!r}")
        answer = bytearray(int(length.group(1)))
        view = memoryview(answer)
        view[: len(rest)] = rest
        got = len(rest)
        while got < len(answer):
            n = self.sock.recv_into(view[got:])
            if not n:
                raise ConnectionError(f"{path}: the answer ended after {got} of {len(answer)} bytes")
            got += n
        if re.search(rb"(?im)^connection:\s*close", header):
            self.close()
        return status, answer


class _ClosedBeforeAnswer(ConnectionError):
    """The connection failed before a byte of answer came back (a kept-alive connection the server had
    closed): the only case in which ``LoadClient.post`` sends the request again."""


def binary_request_once(client: LoadClient, path: str, body: bytes) -> float:
    """One safetensors request on the load client's keep-alive connection (the single-client binary rows
    use the same client as the concurrent ones)."""
    t0 = time.perf_counter()
    status, answer = client.post(path, body)
    elapsed = time.perf_counter() - t0
    if status != 200:
        raise SystemExit(f"{path} answered {status}: {bytes(answer[:500])!r}")
    return elapsed


def _client_process(
    url: str, path: str, body: bytes, count: int, connected, start, new_connections: bool
) -> list[float]:
    """One load-generating process: a keep-alive connection (LoadClient), one warm-up request, then
    ``count`` timed ones after the common start. With ``new_connections`` every timed request opens its
    own connection (the connect is timed with it)."""
    parts = urlsplit(url)
    client = LoadClient(parts.hostname, parts.port)

    def once() -> float:
        t0 = time.perf_counter()
        if new_connections:
            client.close()
        status, answer = client.post(path, body)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {bytes(answer[:300])!r}")
        return time.perf_counter() - t0

    once()
    connected.wait()  # the main process looks at the connections' spread now
    start.wait()
    return [once() for _ in range(count)]


def connections_per_process(port: int, leave_out_own: bool = True) -> list[int]:
    """How many established TCP connections on local port ``port`` each process holds (largest first),
    leaving out those whose client end is this process (its own control connection) unless asked not
    to, from /proc/net/tcp{,6} and the processes' fd links; [] where /proc cannot tell."""
    server_ends = {}  # inode -> the client's port
    client_ends = {}  # the client's port -> inode
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
            if fields[3] != "01":  # 01: ESTABLISHED
                continue
            if local == port:
                server_ends[f"socket:[{fields[9]}]"] = remote
            elif remote == port:
                client_ends[local] = f"socket:[{fields[9]}]"

    def sockets_of(proc: Path) -> set[str]:
        links = set()
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or another user's
            return links
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile (the listing's own fd among them)
                links.add(os.readlink(fd))
        return links

    own = sockets_of(Path("/proc/self")) if leave_out_own else set()
    counted = {inode for inode, peer in server_ends.items() if client_ends.get(peer) not in own}
    counts = [len(sockets_of(proc) & counted) for proc in Path("/proc").iterdir() if proc.name.isdigit()]
    return sorted((c for c in counts if c), reverse=True)


def concurrent_requests(
    url, path: str, body: bytes, clients: int, repeats: int, new_connections: bool = False
) -> tuple[list[float], float, list[int]]:
    """``clients`` processes (not threads: one Python process could not load a multi-process server),
    each with its own warmed connection, send about ``repeats`` requests each; returns their
    latencies, the wall time from the common start to the last answer and how the warmed keep-alive
    connections spread over the server's processes (connections_per_process at the start)."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        connected, start = manager.Barrier(clients + 1), manager.Barrier(clients + 1)
        with context.Pool(clients) as pool:
            jobs = [(str(url), path, body, repeats, connected, start, new_connections)] * clients
            pending = pool.starmap_async(_client_process, jobs)
            connected.wait()
            spread = connections_per_process(urlsplit(str(url)).port)  # before the clock starts
            start.wait()
            t0 = time.perf_counter()
            results = pending.get()
            wall = time.perf_counter() - t0
    return [t for r in results for t in r], wall, spread


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
                    times_c, wall, spread = concurrent_requests(
                        client.base_url, f"/{op}", body, args.concurrency, repeats, fresh
                    )
                    label = f"http safetensors x{args.concurrency}" + (" new connections" if fresh else "")
                    rows.append(row(label, op, n, args.dim, itemsize, times_c, base[op], wall))
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
