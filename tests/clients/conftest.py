"""Real service processes for the client tests: ``python -m service`` on a free port, CPU, a one-quantizer
warm set (start-up takes a few seconds on two cores), terminated when the fixture ends."""

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
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "client-test-key"
BASE_ENV = {
    "ISOQUANT_DEVICE": "cpu",
    "ISOQUANT_WARM_VARIANTS": "full",
    "ISOQUANT_WARM_DIMS": "64",
    "ISOQUANT_WARM_BITS": "3",
    "ISOQUANT_WARM_DTYPES": "float32",
    "ISOQUANT_WARM_BATCH": "8",
    "ISOQUANT_LOG_LEVEL": "warning",
    "ISOQUANT_TORCH_THREADS": "1",  # two cores shared with the test process: one intra-op thread is much faster
    "ISOQUANT_MAX_REQUEST_BYTES": str(8 << 20),
}


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(api_key: str | None = None, timeout: float = 90.0, wait_for: str = "ready",
                 **settings: object) -> Server:
    """Start ``python -m service`` with ISOQUANT_<NAME> = value for each setting; wait until
    /health/<wait_for> (ready or live) answers 200."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
    env.update(BASE_ENV)
    env.update({f"ISOQUANT_{k.upper()}": str(v) for k, v in settings.items()})
    if api_key:
        env["ISOQUANT_API_KEY"] = api_key
    env["PYTHONPATH"] = str(REPO)
    log = Path(tempfile.mkstemp(prefix="isoquant-server-", suffix=".log")[1])
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log, api_key)
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
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)
    server.log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def server():
    """The main server: default limits (max_vectors 65536, 8 MiB bodies), an API key."""
    s = start_server(api_key=API_KEY)
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def busy_server():
    """A server that admits one request at a time (max_queue=1): concurrent callers get 429."""
    s = start_server(max_queue=1, workers=1)
    yield s
    stop_server(s)


@pytest.fixture
def vectors() -> np.ndarray:
    """float32 [3, 50, 64], standard normal, fixed seed."""
    return np.random.default_rng(7).standard_normal((3, 50, 64)).astype(np.float32)
