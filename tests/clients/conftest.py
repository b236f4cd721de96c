"""Real service processes for the client tests: ``python -m service`` on a free port, CPU, a one-quantizer
warm set (start-up takes a few seconds on two cores), terminated when the fixture ends."""

from __future__ import annotations

import numpy as np
import pytest

from tests import live_service
from tests.live_service import REPO, Server, stop_server  # noqa: F401  (the client tests import them from here)

API_KEY = "client-test-key"
BASE_ENV = {
    **live_service.SMALL_CPU_ENV,
    "ISOQUANT_TORCH_THREADS": "1",  # two cores shared with the test process: one intra-op thread is much faster
    "ISOQUANT_MAX_REQUEST_BYTES": str(8 << 20),
}


def start_server(api_key: str | None = None, timeout: float = 90.0, wait_for: str = "ready",
                 **settings: object) -> Server:
    """Start ``python -m service`` with BASE_ENV and ISOQUANT_<NAME> = value for each setting; wait until
    /health/<wait_for> (ready or live) answers 200."""
    env = {**BASE_ENV, **{f"ISOQUANT_{k.upper()}": str(v) for k, v in settings.items()}}
    return live_service.start_server(env, api_key=api_key, timeout=timeout, wait_for=wait_for)


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
