"""The load generator of bench/bench_service.py: ``LoadClient`` (a minimal keep-alive HTTP/1.1 client for
binary bodies) and ``concurrent_requests`` (N client processes at once). Standard library only, on purpose:
each client is a fresh interpreter running this module. The clients used to be a spawn pool, whose children
re-import the parent's main script (bench_service, which imports torch): on the H200 host a 64-client run of
batches 1 and 128 then did not finish in 150 s, and the host's load average stood at 40-60."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]

SAFETENSORS = "application/x-safetensors"


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


def client_process(url: str, path: str, body: bytes, count: int, new_connections: bool) -> None:
    """One load-generating process (``python -m bench.loadgen``, started by ``concurrent_requests``): a
    keep-alive connection (LoadClient) and one warm-up request, then "ready" on stdout; on "go" from stdin,
    ``count`` timed requests, and their latencies (s) as one JSON list on stdout. With ``new_connections``
    every timed request opens its own connection (the connect is timed with it)."""
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
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    latencies = [once() for _ in range(count)]
    print(json.dumps(latencies), flush=True)


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
    connections spread over the server's processes (connections_per_process at the start).

    The clients are fresh interpreters running this module only (``python -m bench.loadgen``): a
    multiprocessing pool (spawn) re-imports the parent's main script in every child, and bench_service's
    imports torch (64 clients: minutes of the host's CPU before a request)."""
    with tempfile.NamedTemporaryFile(prefix="isoquant-load-", delete=False) as file:
        file.write(body)
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        str(url),
        path,
        file.name,
        str(repeats),
        str(int(new_connections)),
    ]
    procs = []
    try:
        for _ in range(clients):
            procs.append(subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a load client failed to warm up (exit {proc.wait()})")
        spread = connections_per_process(urlsplit(str(url)).port)  # before the clock starts
        t0 = time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [json.loads(proc.stdout.readline()) for proc in procs]
        wall = time.perf_counter() - t0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        os.unlink(file.name)
    return [t for r in results for t in r], wall, spread


if __name__ == "__main__":
    url, path, body_file, count, fresh = sys.argv[1:6]
    client_process(url, path, Path(body_file).read_bytes(), int(count), fresh == "1")
