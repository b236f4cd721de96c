"""Soak and fuzz the service over HTTP: saturation with valid and bad requests of both media types, then
(``--fuzz N``) N fuzzed requests; prints the status histogram, latency percentiles, the server's resident
memory at minute 1 and at the end, and how many answers were 500 (the target is none).

Soak (``--duration`` seconds, default 300): ``--threads`` clients (default 4), each on its own keep-alive
connection, send as fast as they are answered a mix of
- valid requests (about 60%): /quantize as JSON (nested lists or base64 arrays) and as safetensors,
  /dequantize of earlier answers in both formats, with and without reconstruction or distortion, 1 to
  512 vectors of dims 64 and 128; GET /info, /quantizer, /health/ready;
- bad requests (about 20%): each a known mistake (bits or variant not served, unknown field, bad base64,
  truncated data, wrong shape, a tampered fingerprint, truncated or mislabelled safetensors, wrong
  Content-Type, an Accept nothing matches, an unknown path or method);
- fuzzed bodies (about 20%): a valid JSON or safetensors body mutated at random (bytes flipped, cut,
  repeated; JSON values replaced by values of other types; the safetensors header's length, dtypes, shapes
  and offsets changed), sent as either media type.
Latency percentiles are over every answered request (and over the valid ones alone); the resident memory
is ``isoquant_process_resident_memory_bytes`` (every server process, summed) from /metrics, sampled every
5 s: "minute 1" is the first sample at or after 60 s (or a fifth of ``--duration``, when shorter).

Fuzz (``--fuzz N``): N fuzzed requests, half of each media type, from the same threads; counts 500s.

    python bench/soak.py                              # starts `python -m service` (CPU) on a free port
    python bench/soak.py --duration 300 --fuzz 10000  # the documented run (docs/BENCHMARKS.md)
    python bench/soak.py --url http://host:8000       # a running service (needs dims 64 and 128, full, 3 bits)
    python bench/soak.py --duration 10 --fuzz 200 --json out.json

Exit status 1 when any answer was a 500 or a request got no answer at all.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench.host from the checkout

from bench.host import cpu_name  # noqa: E402

JSON = "application/json"
SAFETENSORS = "application/x-safetensors"
DIMS = (64, 128)
RSS_SAMPLE_S = 5.0


# -- bodies ---------------------------------------------------------------------------------------


def b64(array: np.ndarray) -> dict:
    return {
        "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
        "dtype": str(array.dtype),
        "shape": list(array.shape),
    }


def safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors container (docs/FORMAT.md), written here so that the bench needs numpy only."""
    names = {"float16": "F16", "float32": "F32", "uint8": "U8"}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": names[str(array.dtype)], "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]
        }
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def read_safetensors(body: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    (n,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + n])
    dtypes = {"F16": np.float16, "F32": np.float32, "U8": np.uint8, "BF16": np.uint16}
    data = body[8 + n :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])
    return header.get("__metadata__", {}), tensors


@dataclass
class Request:
    kind: str  # valid | bad | fuzz
    method: str
    path: str
    body: bytes | None = None
    headers: dict = field(default_factory=dict)


class Bodies:
    """Request makers, one per client thread (its own random generator)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.answers: list[tuple[str, bytes]] = []  # recent /quantize answers: (media type, body)

    def vectors(self, dtype: str = "float32") -> np.ndarray:
        n = self.rng.choice((1, 3, 17, 64, 256, 512))
        return self.np.standard_normal((n, self.rng.choice(DIMS))).astype(dtype)

    def quantize_json(self) -> dict:
        x = self.vectors(self.rng.choice(("float16", "float32")))
        vectors = x.astype(np.float32).tolist() if self.rng.random() < 0.3 else b64(x)
        body = {"vectors": vectors, "variant": "full", "bits": 3}
        if self.rng.random() < 0.3:
            body["return_distortion"] = True
        if self.rng.random() < 0.2:
            body["return_reconstruction"] = True
        return body

    def quantize_safetensors(self) -> bytes:
        meta = {"variant": "full", "bits": "3"}
        if self.rng.random() < 0.3:
            meta["return_distortion"] = "true"
        return safetensors({"vectors": self.vectors(self.rng.choice(("float16", "float32")))}, meta)

    def valid(self) -> Request:
        r = self.rng.random()
        if r < 0.3:
            body = json.dumps(self.quantize_json()).encode()
            return Request("valid", "POST", "/quantize", body, {"content-type": JSON})
        if r < 0.6:
            return Request("valid", "POST", "/quantize", self.quantize_safetensors(), {"content-type": SAFETENSORS})
        if r < 0.85 and self.answers:
            media, body = self.rng.choice(self.answers)
            return Request("valid", "POST", "/dequantize", body, {"content-type": media})
        path = self.rng.choice(("/info", "/health/ready", "/quantizer?variant=full&dim=64&bits=3"))
        return Request("valid", "GET", path)

    def bad(self) -> Request:
        """A request with one known mistake: a 4xx is the right answer."""
        body = self.quantize_json()
        choice = self.rng.randrange(14)
        headers = {"content-type": JSON}
        if choice == 0:
            body["bits"] = 9
        elif choice == 1:
            body["variant"] = "nope"
        elif choice == 2:
            body["extra"] = 1
        elif choice == 3:
            body["vectors"] = {"data": "not base64!", "dtype": "float32", "shape": [1, 64]}
        elif choice == 4:
            body["vectors"] = {**b64(self.vectors()), "shape": [1, 999]}
        elif choice == 5:
            body["bits"] = "3"
        elif choice == 6:
            body["vectors"] = [[1.0] * 64, [1.0] * 63]
        elif choice == 7 and self.answers:
            media, raw = self.rng.choice(self.answers)
            if media == JSON:
                answer = json.loads(raw)
                answer["quantizer"]["fingerprint"] = "0" * 16
                return Request("bad", "POST", "/dequantize", json.dumps(answer).encode(), headers)
            return Request("bad", "POST", "/dequantize", raw[: len(raw) // 2], {"content-type": SAFETENSORS})
        elif choice == 8:
            raw = self.quantize_safetensors()
            cut = raw[: self.rng.randrange(1, len(raw))]
            return Request("bad", "POST", "/quantize", cut, {"content-type": SAFETENSORS})
        elif choice == 9:
            return Request("bad", "POST", "/quantize", json.dumps(body).encode(), {"content-type": SAFETENSORS})
        elif choice == 10:
            return Request("bad", "POST", "/quantize", self.quantize_safetensors(), {"content-type": "text/plain"})
        elif choice == 11:
            return Request("bad", "POST", "/quantize", json.dumps(body).encode(), {**headers, "accept": "image/png"})
        elif choice == 12:
            return Request("bad", self.rng.choice(("GET", "DELETE", "PUT")), "/quantize")
        else:
            return Request("bad", "GET", f"/no/such/path/{self.rng.randrange(1000)}")
        return Request("bad", "POST", "/quantize", json.dumps(body).encode(), headers)

    # -- fuzz ---------------------------------------------------------------------------------------

    def random_value(self, depth: int = 0):
        choice = self.rng.randrange(12)
        if choice == 0:
            return None
        if choice == 1:
            return self.rng.random() < 0.5
        if choice == 2:
            return self.rng.choice((0, -1, 1, 3, 64, 2**63, 2**64, -(2**64), 10**30))
        if choice == 3:
            return self.rng.choice((0.5, -0.0, 1e308, -1e308, 3.0, 1e-320))
        if choice == 4:
            return "".join(chr(self.rng.randrange(0x20, 0x2FFF)) for _ in range(self.rng.randrange(0, 20)))
        if choice == 5:
            return self.rng.choice(("full", "float16", "uint8", "", "AAAA", "====", "bfloat16", "int8"))
        if choice in (6, 7) and depth < 4:
            return [self.random_value(depth + 1) for _ in range(self.rng.randrange(0, 5))]
        if choice in (8, 9) and depth < 4:
            keys = ("data", "dtype", "shape", "variant", "bits", "dim", "seed", "fingerprint", "x")
            return {self.rng.choice(keys): self.random_value(depth + 1) for _ in range(self.rng.randrange(0, 5))}
        return self.rng.choice(([], {}, [[]], [[1.0]], "x" * 1000))

    def mutate_json(self, value, depth: int = 0):
        """A copy of a JSON value with one or more parts replaced, removed or added."""
        if isinstance(value, dict) and value and depth < 6:
            value = dict(value)
            key = self.rng.choice(list(value))
            action = self.rng.randrange(4)
            if action == 0:
                del value[key]
            elif action == 1:
                value[key] = self.random_value()
            elif action == 2:
                value[key] = self.mutate_json(value[key], depth + 1)
            else:
                value[self.rng.choice(("extra", key + "_", "shape", "dtype"))] = self.random_value()
            return value
        if isinstance(value, list) and value and depth < 6:
            value = list(value)
            i = self.rng.randrange(len(value))
            action = self.rng.randrange(3)
            if action == 0:
                del value[i]
            elif action == 1:
                value[i] = self.mutate_json(value[i], depth + 1)
            else:
                value.append(self.random_value())
            return value
        return self.random_value()

    def mutate_bytes(self, raw: bytes) -> bytes:
        data = bytearray(raw)
        for _ in range(self.rng.randrange(1, 4)):
            action = self.rng.randrange(6)
            if not data:
                data = bytearray(self.rng.randbytes(self.rng.randrange(1, 64)))
            if action == 0:  # flip bytes
                for _ in range(self.rng.randrange(1, 8)):
                    data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            elif action == 1:  # cut
                data = data[: self.rng.randrange(len(data))]
            elif action == 2:  # repeat a slice
                i = self.rng.randrange(len(data))
                data[i:i] = data[i : i + self.rng.randrange(1, 256)]
            elif action == 3:  # random bytes
                i = self.rng.randrange(len(data))
                data[i : i + 8] = self.rng.randbytes(8)
            elif action == 4 and len(data) >= 8:  # the safetensors header length
                length = self.rng.choice((0, 1, 7, len(data), len(data) * 2, 2**63, 2**64 - 1))
                data[:8] = struct.pack("<Q", length)
            else:  # an insertion
                i = self.rng.randrange(len(data) + 1)
                inserted = (b"{", b"}", b"[", b"\x00", b"\\u0000", b'"', b"NaN", b"1e999", b"\xff\xfe")
                data[i:i] = self.rng.choice(inserted)
        return bytes(data)

    def mutate_safetensors(self) -> bytes:
        x = self.vectors(self.rng.choice(("float16", "float32")))
        if self.rng.random() < 0.5:
            return self.mutate_bytes(safetensors({"vectors": x}, {"variant": "full", "bits": "3"}))
        # Change the header's JSON itself: dtype, shape, offsets, metadata.
        header = {
            "__metadata__": {"variant": "full", "bits": "3"},
            "vectors": {"dtype": {"float16": "F16", "float32": "F32"}[str(x.dtype)], "shape": list(x.shape),
                        "data_offsets": [0, x.nbytes]},
        }
        header = self.mutate_json(header)
        text = json.dumps(header).encode()
        if self.rng.random() < 0.1:
            text = self.mutate_bytes(text)
        return struct.pack("<Q", len(text)) + text + x.tobytes()

    def fuzz(self, media: str | None = None) -> Request:
        media = media or self.rng.choice((JSON, SAFETENSORS))
        path = self.rng.choice(("/quantize", "/dequantize"))
        if media == JSON:
            if path == "/dequantize" and self.answers:
                source = next((json.loads(b) for m, b in reversed(self.answers) if m == JSON), self.quantize_json())
            else:
                source = self.quantize_json()
            body = self.mutate_json(source)
            raw = json.dumps(body).encode()
            if self.rng.random() < 0.25:
                raw = self.mutate_bytes(raw)
        else:
            if path == "/dequantize" and self.answers and self.rng.random() < 0.5:
                raw = self.mutate_bytes(self.rng.choice(self.answers)[1])
            else:
                raw = self.mutate_safetensors()
        content_type = media
        if self.rng.random() < 0.1:
            content_type = self.rng.choice((JSON, SAFETENSORS, "application/octet-stream"))
        headers = {"content-type": content_type}
        if self.rng.random() < 0.2:
            headers["accept"] = self.rng.choice((JSON, SAFETENSORS, "*/*", "application/*;q=0.5", "text/html"))
        return Request("fuzz", "POST", path, raw, headers)


# -- load -------------------------------------------------------------------------------------------


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)  # (kind, status) -> n; status -1: no answer
    latencies: dict = field(default_factory=lambda: {"valid": [], "bad": [], "fuzz": []})
    failures: list = field(default_factory=list)  # examples of 500s and transport errors
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: Request, status: int, seconds: float, detail: str = "") -> None:
        with self.lock:
            self.statuses[(request.kind, status)] += 1
            self.latencies[request.kind].append(seconds)
            if (status >= 500 and status != 503 or status < 0) and len(self.failures) < 20:
                body = request.body[:300] if request.body else b""
                what = f"{request.method} {request.path} {request.headers}"
                self.failures.append(f"{what} -> {status} {detail[:300]} body={body!r}")


def send(client: httpx.Client, request: Request, tally: Tally, bodies: Bodies) -> None:
    t0 = time.perf_counter()
    try:
        response = client.request(request.method, request.path, content=request.body, headers=request.headers)
    except httpx.HTTPError as exc:
        tally.add(request, -1, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
        return
    seconds = time.perf_counter() - t0
    tally.add(request, response.status_code, seconds, response.text if response.status_code >= 500 else "")
    if request.kind == "valid" and request.path == "/quantize" and response.status_code == 200:
        media = response.headers.get("content-type", "").split(";")[0]
        if len(bodies.answers) >= 32:
            bodies.answers.pop(bodies.rng.randrange(len(bodies.answers)))
        bodies.answers.append((media, response.content))


def soak_worker(url: str, seed: int, deadline: float, tally: Tally) -> None:
    bodies = Bodies(seed)
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            r = bodies.rng.random()
            request = bodies.valid() if r < 0.6 else bodies.bad() if r < 0.8 else bodies.fuzz()
            send(client, request, tally, bodies)


def fuzz_worker(url: str, seed: int, count: int, tally: Tally) -> None:
    bodies = Bodies(seed)
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(4):  # answers to mutate for /dequantize
            send(client, bodies.valid(), Tally(), bodies)
        for i in range(count):
            send(client, bodies.fuzz(JSON if i % 2 == 0 else SAFETENSORS), tally, bodies)


def resident_bytes(url: str) -> float | None:
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^isoquant_process_resident_memory_bytes (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_threads(target, args_list) -> None:
    threads = [threading.Thread(target=target, args=a, daemon=True) for a in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def soak(url: str, duration: float, threads: int, seed: int) -> dict:
    tally = Tally()
    start = time.monotonic()
    deadline = start + duration
    minute_one = min(60.0, duration / 5)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while True:
            rss = resident_bytes(url)
            if rss is not None:
                samples.append((time.monotonic() - start, rss))
            if done.wait(RSS_SAMPLE_S):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run_threads(soak_worker, [(url, seed + i, deadline, tally) for i in range(threads)])
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    final = resident_bytes(url)
    if final is not None:
        samples.append((time.monotonic() - start, final))
    first = next((rss for t, rss in samples if t >= minute_one), samples[-1][1] if samples else None)
    last = samples[-1][1] if samples else None
    return summary("soak", tally, wall) | {
        "rss_minute_one_s": minute_one,
        "rss_minute_one_bytes": first,
        "rss_end_bytes": last,
        "rss_growth_percent": (last - first) / first * 100 if first and last else None,
        "rss_samples": samples,
    }


def fuzz(url: str, count: int, threads: int, seed: int) -> dict:
    tally = Tally()
    start = time.monotonic()
    shares = [count // threads + (i < count % threads) for i in range(threads)]
    run_threads(fuzz_worker, [(url, seed + 1000 + i, n, tally) for i, n in enumerate(shares)])
    return summary("fuzz", tally, time.monotonic() - start)


def summary(name: str, tally: Tally, wall: float) -> dict:
    total = sum(tally.statuses.values())
    every = [s for kind in tally.latencies.values() for s in kind]
    by_status = Counter()
    for (_, status), n in tally.statuses.items():
        by_status[status] += n
    return {
        "phase": name,
        "requests": total,
        "seconds": wall,
        "requests_per_s": total / wall if wall else 0.0,
        "by_kind": {kind: sum(n for (k, _), n in tally.statuses.items() if k == kind) for kind in tally.latencies},
        "statuses": {str(k): v for k, v in sorted(by_status.items())},
        "statuses_by_kind": {f"{k}:{s}": n for (k, s), n in sorted(tally.statuses.items())},
        "server_errors_500": by_status.get(500, 0),
        "no_answer": by_status.get(-1, 0),
        "p50_ms": percentile(every, 50) * 1e3,
        "p99_ms": percentile(every, 99) * 1e3,
        "valid_p50_ms": percentile(tally.latencies["valid"], 50) * 1e3,
        "valid_p99_ms": percentile(tally.latencies["valid"], 99) * 1e3,
        "failures": tally.failures,
    }


# -- the service ------------------------------------------------------------------------------------


def start_service(args) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkstemp(prefix="isoquant-soak-", suffix=".log")[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
        "ISOQUANT_DEVICE": args.device,
        "ISOQUANT_WARM_VARIANTS": "full",
        "ISOQUANT_WARM_DIMS": ",".join(map(str, DIMS)),
        "ISOQUANT_WARM_BITS": "3",
        "ISOQUANT_WARM_DTYPES": "float16,float32",
        "ISOQUANT_PROCESSES": str(args.processes),
        "ISOQUANT_LOG_LEVEL": "warning",
    })
    if args.torch_threads:
        env["ISOQUANT_TORCH_THREADS"] = str(args.torch_threads)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(args.port)],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return process, url, log
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the service did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(results: list[dict], args) -> None:
    print(f"\nsoak.py: {args.threads} client threads, seed {args.seed}, {cpu_name()} ({os.cpu_count()} CPUs), "
          f"{args.processes} server process(es), device {args.device}")
    print("\n| phase | requests | req/s | valid / bad / fuzzed | 500s | no answer | p50 ms | p99 ms "
          "| valid p50 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        kinds = r["by_kind"]
        print(f"| {r['phase']} ({r['seconds']:.0f} s) | {r['requests']} | {r['requests_per_s']:.0f} | "
              f"{kinds['valid']} / {kinds['bad']} / {kinds['fuzz']} | {r['server_errors_500']} | {r['no_answer']} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['valid_p50_ms']:.1f} / {r['valid_p99_ms']:.1f} |")
    for r in results:
        print(f"\n{r['phase']} statuses: " + ", ".join(f"{s}: {n}" for s, n in r["statuses"].items()))
        if r.get("rss_end_bytes") is not None and r.get("rss_minute_one_bytes") is not None:
            print(f"{r['phase']} resident memory (all server processes): "
                  f"{r['rss_minute_one_bytes'] / 2**20:.1f} MiB at "
                  f"{r['rss_minute_one_s']:.0f} s, {r['rss_end_bytes'] / 2**20:.1f} MiB at the end: "
                  f"{r['rss_growth_percent']:+.2f}%")
        for failure in r["failures"]:
            print(f"  failure: {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running service (default: start one)")
    parser.add_argument("--duration", type=float, default=300.0, help="soak seconds (0: no soak)")
    parser.add_argument("--fuzz", type=int, default=0, help="fuzzed requests after the soak (0: none)")
    parser.add_argument("--threads", type=int, default=4, help="client threads, one connection each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="server processes of the service started here")
    parser.add_argument("--device", default="cpu", help="device of the service started here")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="ISOQUANT_TORCH_THREADS of the service started here")
    parser.add_argument("--port", type=int, default=0, help="port of the service started here (0: a free one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    process = log = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        args.port = args.port or free_port()
        process, url, log = start_service(args)
    try:
        results = []
        if args.duration > 0:
            results.append(soak(url, args.duration, args.threads, args.seed))
        if args.fuzz > 0:
            results.append(fuzz(url, args.fuzz, args.threads, args.seed))
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            server_log = log.read_text(errors="replace")
            tracebacks = server_log.count("Traceback")
            log.unlink(missing_ok=True)
    report(results, args)
    if process is not None:
        print(f"\nserver log: {tracebacks} tracebacks")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_name(), "results": results}, indent=1))
    bad = sum(r["server_errors_500"] + r["no_answer"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
