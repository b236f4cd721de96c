"""Readiness gates on warm-up: 503 while a measurably slow warm set is built, 200 after."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from service.app import create_app
from tests.service.conftest import assert_error, b64, running, settings, wait_until_ready


@pytest.mark.anyio
async def test_ready_is_503_until_warm_up_completes():
    # Dense rotations of dim 1024 take ~0.5 s each to generate (10^6 normals and a QR): measurable.
    app = create_app(settings(warm_variants=["dense"], warm_dims=[1024], warm_bits=[1, 2], warm_dtypes=["float32"]))
    async with running(app, wait_ready=False) as client:
        assert (await client.get("/health/live")).json() == {"status": "live"}
        r = await client.get("/health/ready")
        assert_error(r, 503, "not_ready", None, "warming up", "of 2 quantizers")
        assert r.headers["retry-after"] == "1"
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(2, 64)), "bits": 3})
        assert_error(r, 503, "not_ready", None, "warming up")
        assert "isoquant_ready 0.0" in (await client.get("/metrics")).text
        await wait_until_ready(client, 60)
        body = (await client.get("/health/ready")).json()
        assert body["status"] == "ready" and body["device"] == "cpu" and body["warmup_seconds"] > 0.2
        text = (await client.get("/metrics")).text
        assert "isoquant_ready 1.0" in text
        assert app.state.isoquant.engine.resident_count()["default_seed"] == 2
        # The warm quantizers answer without a build.
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(2, 1024)), "variant": "dense", "bits": 2})
        assert r.status_code == 200


@pytest.mark.anyio
async def test_shutdown_turns_not_ready_but_serves_until_closed():
    app = create_app(settings(warm_dims=[64]))
    async with running(app) as client:
        engine = app.state.isoquant.engine
        engine.begin_shutdown()
        assert_error(await client.get("/health/ready"), 503, "shutting_down", None)
        assert (await client.get("/health/live")).status_code == 200
        # Draining: requests are still served so that in-flight traffic finishes.
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(2, 64)), "bits": 3})
        assert r.status_code == 200
        await asyncio.to_thread(engine.close)
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(2, 64)), "bits": 3})
        assert_error(r, 503, "shutting_down", None)


def test_bad_device_settings_are_refused():
    from pydantic import ValidationError

    from service.engine import resolve_device

    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
        settings(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert str(resolve_device("cpu")) == "cpu"


@pytest.mark.anyio
async def test_ready_waits_for_every_server_process(tmp_path, monkeypatch):
    """With several server processes (multiprocess metrics folder set), /health/ready is 503 while any
    process is not warm, naming how many are, and 200 once the marker of every process is there; a
    process that begins shutting down removes its own marker."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    app = create_app(settings(warm_dims=[64], warm_bits=[2], warm_variants=["full"], processes=2))
    async with running(app, wait_ready=False) as client:
        engine = app.state.isoquant.engine
        while not engine.ready:
            await asyncio.sleep(0.02)
        assert sorted(p.name for p in tmp_path.glob("ready-*")) == [f"ready-{os.getpid()}"]
        r = await client.get("/health/ready")
        assert_error(r, 503, "not_ready", None, "this process is ready, 1 of 2 server processes are")
        (tmp_path / "ready-999999").touch()  # the other process finished its warm-up
        r = await client.get("/health/ready")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        engine.begin_shutdown()
        assert not (tmp_path / f"ready-{os.getpid()}").exists()
        assert_error(await client.get("/health/ready"), 503, "shutting_down", None)


@pytest.mark.anyio
async def test_warm_all_tiles_on_the_cpu_warms_and_serves():
    """ISOQUANT_WARM_ALL_TILES on the torch backend (nothing to compile: Quantizer.warm_batches is [1]):
    warm-up runs each op at one vector and at warm_batch, the service turns ready and serves."""
    app = create_app(settings(warm_all_tiles=True, warm_variants=["full"], warm_dims=[32], warm_bits=[2]))
    async with running(app) as client:
        health = (await client.get("/health/ready")).json()
        assert health["status"] == "ready"
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(3, 32)), "variant": "full", "bits": 2})
        assert r.status_code == 200, r.text


@pytest.mark.anyio
async def test_warm_up_puts_what_it_built_out_of_the_cyclic_collectors_reach():
    """Once ready, the warm quantizers (and everything else alive then) are in the collector's permanent
    generation (gc.freeze): a full collection under load does not walk them."""
    import gc

    app = create_app(settings(warm_variants=["full"], warm_dims=[32], warm_bits=[2]))
    async with running(app) as client:
        assert (await client.get("/health/ready")).status_code == 200
        engine = app.state.isoquant.engine
        warm = engine.quantizer("full", 32, 2, engine.settings.default_seed)
        assert gc.get_freeze_count() > 0
        assert not any(obj is warm for obj in gc.get_objects())
        later = object.__new__(type(warm))  # made after warm-up: tracked as usual
        assert any(obj is later for obj in gc.get_objects())
    # Closed (the lifespan's end): unfrozen, so that an app built inside a longer-lived process can be freed.
    assert gc.get_freeze_count() == 0
