"""A real ``python -m service`` process for the tests that talk to one over the network (clients,
deploy): started on a free 127.0.0.1 port with the given ISOQUANT_* environment, polled until
/health/<ready|live> answers 200, terminated afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
# A service that starts in seconds on a small CPU: one quantizer warmed, on a few vectors.
SMALL_CPU_ENV = {
    "ISOQUANT_DEVICE": "cpu",
    "ISOQUANT_WARM_VARIANTS": "full",
    "ISOQUANT_WARM_DIMS": "64",
    "ISOQUANT_WARM_BITS": "3",
    "ISOQUANT_WARM_DTYPES": "float32",
    "ISOQUANT_WARM_BATCH": "8",
    "ISOQUANT_LOG_LEVEL": "warning",
}


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    log: Path
    api_key: str | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics_text(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=10)
        response.raise_for_status()
        return response.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], api_key: str | None = None, timeout: float = 90.0,
                 wait_for: str = "ready") -> Server:
    """Start ``python -m service`` with the caller's ISOQUANT_* variables (the test process's own are
    dropped) and wait until /health/<wait_for> answers 200; RuntimeError with the log's tail otherwise."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
    full_env.update(env)
    if api_key:
        full_env["ISOQUANT_API_KEY"] = api_key
    full_env["PYTHONPATH"] = str(REPO)
    log = Path(tempfile.mkstemp(prefix="isoquant-server-", suffix=".log")[1])
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", port, process, log, api_key)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health/{wait_for}", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"the service was not ready after {timeout} s:\n{server.log_text()[-3000:]}")
        time.sleep(0.1)


def stop_server(server: Server) -> None:
    """SIGTERM, SIGKILL if it has not exited within 20 s; the log file is removed."""
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)
    server.log.unlink(missing_ok=True)
