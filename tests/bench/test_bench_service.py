"""bench/bench_service.py's count of keep-alive connections per server process (Linux /proc)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from bench.bench_service import connections_per_process

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
