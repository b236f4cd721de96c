"""bench/bench_service.py's count of keep-alive connections per server process (Linux /proc)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from bench.loadgen import LoadClient, connections_per_process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_connections_per_process_counts_server_ends_and_leaves_out_our_own():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    own_client = socket.create_connection(("127.0.0.1", port))
    own_server_end, _ = server.accept()
    code = f"import socket, sys; s = socket.create_connection(('127.0.0.1', {port})); sys.stdin.read()"
    clients = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE) for _ in range(2)]
    try:
        accepted = [server.accept()[0] for _ in clients]
        # Two other processes' connections end in this process; the one this process opened to itself is
        # the benchmark's control connection and is not counted.
        assert connections_per_process(port) == [2]
        accepted[0].close()
        deadline = time.monotonic() + 5
        while connections_per_process(port) != [1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connections_per_process(port) == [1]
    finally:
        for client in clients:
            client.communicate(b"")
        for s in (own_client, own_server_end, server):
            s.close()


def _serve(server: socket.socket, answers: list[bytes], seen: list[bytes]) -> None:
    """Two connections one after the other, each answered once (the next item of ``answers``) and closed."""
    for _ in range(2):
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += conn.recv(65536)
            seen.append(head + b"|" + body)
            conn.sendall(answers.pop(0))


def test_load_client_reads_the_answer_and_replaces_a_closed_keep_alive_connection():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    big = bytes(range(256)) * 4096  # 1 MiB: read over several recv calls
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big) + big,
        b"HTTP/1.1 422 X\r\nContent-Length: 2\r\n\r\nno",
    ]
    seen: list[bytes] = []
    thread = threading.Thread(target=_serve, args=(server, answers, seen), daemon=True)
    thread.start()
    client = LoadClient("127.0.0.1", port, timeout=10)
    status, answer = client.post("/dequantize", b"abc")
    assert (status, bytes(answer)) == (200, big)
    # The server closed that connection after one answer (as uvicorn does with an idle one): the next
    # request goes out again on a new connection instead of failing.
    status, answer = client.post("/quantize", b"xy", "application/json")
    assert (status, bytes(answer)) == (422, b"no")
    thread.join(5)
    assert seen[0].startswith(b"POST /dequantize HTTP/1.1\r\n") and seen[0].endswith(b"|abc")
    assert b"Content-Type: application/json" in seen[1] and seen[1].endswith(b"|xy")
    client.close()
    server.close()
