"""Fixtures for the service tests: in-process apps over httpx's ASGI transport (lifespan run by hand,
as uvicorn would), and helpers to build request bodies."""

from __future__ import annotations

import asyncio
import base64
from contextlib import asynccontextmanager

import httpx
import pytest
import torch

from service.app import create_app
from service.settings import Settings

SAFETENSORS = "application/x-safetensors"

# Small warm set: the tests build other quantizers on demand, which is itself under test.
BASE = dict(
    warm_variants=["full", "fast", "2d"],
    warm_dims=[64, 128],
    warm_bits=[3],
    warm_dtypes=["float16", "float32"],
    warm_batch=8,
    max_request_bytes=4 << 20,
    max_vectors=4096,
    max_queue=128,
    seed_cache_size=2,
)


def settings(**overrides) -> Settings:
    return Settings(**{**BASE, **overrides})


@asynccontextmanager
async def running(app, wait_ready: bool = True, timeout: float = 60.0):
    """Run the app's lifespan and yield an AsyncClient bound to it; wait for readiness if asked."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://isoquant.test", timeout=timeout) as client:
            if wait_ready:
                await wait_until_ready(client, timeout)
            yield client


async def wait_until_ready(client: httpx.AsyncClient, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        response = await client.get("/health/ready")
        if response.status_code == 200:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"not ready after {timeout} s: {response.text}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def app(anyio_backend):
    """One warmed app shared by a module's tests (warm-up is the slow part)."""
    application = create_app(settings())
    async with running(application) as client:
        application.state.test_client = client
        yield application


@pytest.fixture
async def client(app) -> httpx.AsyncClient:
    return app.state.test_client


def b64(t: torch.Tensor) -> dict:
    """A CPU tensor as the API's array object."""
    t = t.contiguous()
    return {
        "data": base64.b64encode(t.reshape(-1).view(torch.uint8).numpy().tobytes()).decode(),
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
    }


def unb64(array: dict) -> torch.Tensor:
    dtype = getattr(torch, array["dtype"])
    raw = bytearray(base64.b64decode(array["data"]))
    return (
        torch.frombuffer(raw, dtype=dtype).reshape(array["shape"]) if raw else torch.empty(array["shape"], dtype=dtype)
    )


def assert_error(response: httpx.Response, status: int, type_: str | None, field: str | None, *fragments: str) -> dict:
    """The one error shape, with the given status, type, field and message fragments."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message", "field"}, body
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    assert body["error"]["field"] == field, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], (fragment, body)
    return body["error"]
