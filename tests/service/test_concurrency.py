"""Concurrency: many requests in flight never mix results; a full queue answers 429 at once; probes and
scrapes answer while the device is busy; device failures and timeouts answer 503 and the service goes on."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kernels import Quantizer
from service.app import create_app
from service.errors import Unavailable
from tests.service.conftest import SAFETENSORS, assert_error, b64, running, settings, unb64

pytestmark = pytest.mark.anyio

VARIANTS = ("full", "fast", "2d", "hadamard")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


async def test_64_concurrent_requests_with_different_parameters_are_not_mixed(client):
    cases = []
    for i in range(64):
        variant, dim, bits = VARIANTS[i % 4], (64, 128)[(i // 4) % 2], (2, 3, 4)[i % 3]
        seed, dtype, binary = (0, 7)[(i // 8) % 2], DTYPES[(i // 2) % 3], i % 5 == 0
        n = 1 + (i * 37) % 300
        x = (torch.randn(n, dim, generator=torch.Generator().manual_seed(i)) * (i + 1)).to(dtype)
        cases.append((variant, dim, bits, seed, x, binary))

    async def one(variant, dim, bits, seed, x, binary):
        if binary:
            meta = {"variant": variant, "bits": str(bits), "seed": str(seed)}
            r = await client.post(
                "/quantize", content=st_save({"vectors": x}, metadata=meta), headers={"content-type": SAFETENSORS}
            )
            assert r.status_code == 200, r.text
            t = st_load(r.content)
            return t["codes"], t["norms"]
        r = await client.post("/quantize", json={"vectors": b64(x), "variant": variant, "bits": bits, "seed": seed})
        assert r.status_code == 200, r.text
        return unb64(r.json()["codes"]), unb64(r.json()["norms"])

    results = await asyncio.gather(*(one(*case) for case in cases))
    for (variant, dim, bits, seed, x, _), (codes, norms) in zip(cases, results, strict=True):
        packed = Quantizer(variant, dim, bits, seed).quantize(x)
        assert codes.numpy().tobytes() == packed.codes.numpy().tobytes(), (variant, dim, bits, seed)
        assert torch.equal(norms, packed.norms)


def _blocker(started: threading.Event, release: threading.Event):
    def block() -> str:
        started.set()
        assert release.wait(30), "test did not release the worker"
        return "released"

    return block


async def test_queue_full_gives_429_and_probes_still_answer():
    app = create_app(settings(max_queue=2, workers=1, warm_dims=[64]))
    async with running(app) as client:
        engine = app.state.isoquant.engine
        started, release = threading.Event(), threading.Event()
        jobs = [asyncio.create_task(engine.run(_blocker(started, release))) for _ in range(2)]
        try:
            await asyncio.to_thread(started.wait, 10)
            body = {"vectors": b64(torch.randn(2, 64)), "bits": 3}
            r = await client.post("/quantize", json=body)
            assert_error(r, 429, "queue_full", None, "max_queue=2")
            assert r.headers["retry-after"] == "1"
            # The device is busy (one job running, one waiting): health and metrics answer anyway.
            t0 = time.perf_counter()
            assert (await client.get("/health/live")).status_code == 200
            assert (await client.get("/health/ready")).status_code == 200
            text = (await client.get("/metrics")).text
            assert time.perf_counter() - t0 < 2.0
            assert "isoquant_queue_depth 1.0" in text and "isoquant_jobs_running 1.0" in text
            assert 'isoquant_rejected_requests_total{reason="queue_full"} 1.0' in text
        finally:
            release.set()
        assert await asyncio.gather(*jobs) == ["released", "released"]
        # Refused requests give their place back: with max_queue=2, a leak would turn into 429s here.
        for _ in range(5):
            assert (await client.post("/quantize", json={**body, "bits": 99})).status_code == 422
            bad = await client.post("/dequantize", content=b"{", headers={"content-type": "application/json"})
            assert bad.status_code == 400
        assert (await client.post("/quantize", json=body)).status_code == 200
        assert "isoquant_queue_depth 0.0" in (await client.get("/metrics")).text


async def test_job_timeout_answers_503_and_the_service_recovers():
    app = create_app(settings(job_timeout_s=0.3, warm_dims=[64]))
    async with running(app) as client:
        engine = app.state.isoquant.engine
        started, release = threading.Event(), threading.Event()
        blocker = asyncio.create_task(engine.run(_blocker(started, release)))
        await asyncio.to_thread(started.wait, 10)
        body = {"vectors": b64(torch.randn(3, 64)), "bits": 3}
        try:
            r = await client.post("/quantize", json=body)
            assert_error(r, 503, "timeout", None, "did not finish within 0.3 s")
            assert r.headers["retry-after"] == "1"
        finally:
            release.set()
        with pytest.raises(Unavailable):
            await blocker  # the blocker itself outlived the timeout too
        r = await client.post("/quantize", json=body)
        assert r.status_code == 200, r.text


async def test_device_out_of_memory_is_503_and_serving_continues():
    app = create_app(settings(warm_dims=[64]))
    async with running(app) as client:
        engine = app.state.isoquant.engine

        def device_op_that_runs_out_of_memory():
            # What torch raises when an allocation on the device fails.
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        with pytest.raises(Unavailable) as info:
            await engine.run(device_op_that_runs_out_of_memory)
        assert info.value.status == 503 and info.value.type == "out_of_memory"
        assert info.value.headers["Retry-After"] == "1"

        def device_op_that_fails():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        with pytest.raises(Unavailable) as info:
            await engine.run(device_op_that_fails)
        assert info.value.type == "device_error"
        text = (await client.get("/metrics")).text
        assert 'isoquant_device_errors_total{kind="out_of_memory"} 1.0' in text
        assert 'isoquant_device_errors_total{kind="runtime"} 1.0' in text
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(3, 64)), "bits": 3})
        assert r.status_code == 200 and engine.resident_count()["default_seed"] >= 1


class _TorchWithoutHostMemory:
    """torch, except that a request-body buffer of 1 MiB or more cannot be allocated (as when the host is
    out of memory): fault injection for Engine.host_buffer, the one allocation made outside a job."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, **kwargs):
        size = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if kwargs.get("dtype") is torch.uint8 and len(size) == 1 and size[0] >= 1 << 20:
            raise MemoryError
        return torch.empty(*shape, **kwargs)


async def test_no_host_memory_for_a_body_is_503_and_serving_continues(monkeypatch):
    import service.host_buffers

    app = create_app(settings(warm_dims=[64]))
    async with running(app) as client:
        monkeypatch.setattr(service.host_buffers, "torch", _TorchWithoutHostMemory())
        big = st_save({"vectors": torch.randn(4096, 64)}, metadata={"bits": "3"})  # 1 MiB of float32
        r = await client.post("/quantize", content=big, headers={"content-type": SAFETENSORS})
        assert_error(r, 503, "out_of_memory", None, "no host memory", str(len(big)))
        assert r.headers["Retry-After"] == "1"
        small = st_save({"vectors": torch.randn(3, 64)}, metadata={"bits": "3"})
        r = await client.post("/quantize", content=small, headers={"content-type": SAFETENSORS})
        assert r.status_code == 200
        text = (await client.get("/metrics")).text
        assert 'isoquant_device_errors_total{kind="out_of_memory"} 1.0' in text
        assert "isoquant_queue_depth 0.0" in text  # the refused body gave its queue place back
