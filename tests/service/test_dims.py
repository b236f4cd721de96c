"""Serving every dim the library supports (issue 17, points 1 and 7): a refusal names the setting that would
serve the dim, the default-seed quantizers outside the warm set are a bounded LRU, the CPU's torch threads
default from the cores, and a warm-up logs its progress."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from kernels import Quantizer
from service import engine as engine_module
from service.app import create_app
from service.engine import Engine
from service.metrics import Metrics
from service.quantizers import QuantizerCache
from service.settings import auto_torch_threads
from tests.service.conftest import assert_error, b64, running, settings

pytestmark = pytest.mark.anyio

NARROW = dict(dims=[64, 128], warm_variants=["full"], warm_dims=[64], warm_bits=[3], warm_dtypes=["float32"])


async def test_a_refused_dim_names_the_setting_that_serves_it():
    async with running(create_app(settings(**NARROW))) as client:
        x = {"vectors": b64(torch.randn(2, 768)), "variant": "full", "bits": 3}
        assert_error(
            await client.post("/quantize", json=x),
            422,
            "unsupported_value",
            "vectors",
            "dim 768 is not served; allowed: 64, 128 (the library supports it: add it to the server's ISOQUANT_DIMS "
            "setting to serve it)",
        )
        # A dim the library cannot do: no setting would help, so none is named.
        r = await client.get("/quantizer", params={"variant": "full", "dim": 5000, "bits": 3})
        error = assert_error(r, 422, "unsupported_value", "dim", "dim 5000 is not served; allowed: 64, 128")
        assert "ISOQUANT_DIMS" not in error["message"]
        info = (await client.get("/info")).json()
        assert info["dims"] == "64, 128"


async def test_other_settings_are_named_too():
    narrow = settings(**NARROW, bits=[3, 4], variants=["full", "fast"])
    async with running(create_app(narrow)) as client:
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(2, 64)), "bits": 2})
        assert_error(r, 422, "unsupported_value", "bits", "allowed: 3, 4", "ISOQUANT_BITS")
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(2, 64)), "variant": "dense"})
        assert_error(r, 422, "unsupported_value", "variant", "allowed: full, fast", "ISOQUANT_VARIANTS")
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(2, 64)), "variant": "rotor"})
        assert "ISOQUANT_VARIANTS" not in assert_error(r, 422, "unsupported_value", "variant")["message"]


def _cache(size: int) -> QuantizerCache:
    metrics = Metrics(settings(), "test")
    return QuantizerCache(torch.device("cpu"), 0, 2, metrics, pinned=[("full", 64, 3)], default_cache_size=size)


def test_default_seed_quantizers_outside_the_warm_set_are_a_bounded_lru():
    cache = _cache(size=2)
    warm = cache.get("full", 64, 3, 0)
    first = cache.get("fast", 100, 3, 0)
    for dim in (200, 100, 300):  # 100 is used again before 300 arrives: 200 is the least recently used
        cache.get("fast", dim, 3, 0)
    assert cache.counts() == {"default_seed": 3, "other_seeds": 0}  # the warm one and two in the LRU
    assert cache.get("fast", 100, 3, 0) is first  # kept
    assert cache.get("fast", 200, 3, 0) is not None and cache.counts()["default_seed"] == 3  # rebuilt, 300 out
    for dim in range(2, 40):  # a client walking through dims never evicts the warm set
        cache.get("fast", dim, 2, 0)
    assert cache.get("full", 64, 3, 0) is warm and cache.counts()["default_seed"] == 3
    sample = cache._metrics.registry.get_sample_value
    assert sample("isoquant_quantizers_resident", {"cache": "default_seed"}) == 3


def test_an_evicted_quantizer_is_rebuilt_identical():
    cache = _cache(size=1)
    a = cache.get("dense", 96, 4, 0)
    cache.get("dense", 97, 4, 0)
    b = cache.get("dense", 96, 4, 0)
    assert a is not b and a.fingerprint == b.fingerprint == Quantizer("dense", 96, 4, 0).fingerprint


def test_the_engine_bounds_the_cache_and_picks_torch_threads_from_the_cores():
    s = settings(warm_variants=[], warm_dims=[], warm_bits=[], warm_dtypes=[], quantizer_cache_size=3, device="cpu")
    engine = Engine(s, Metrics(s, "test"))
    try:
        assert engine.torch_threads == auto_torch_threads(1)
        assert engine._executor.submit(torch.get_num_threads).result() == auto_torch_threads(1)
        for dim in (50, 60, 70, 80, 90):
            engine.quantizer("fast", dim, 2, 0)
        assert engine.resident_count() == {"default_seed": 3, "other_seeds": 0}
    finally:
        engine.close()
    s = settings(warm_variants=[], warm_dims=[], warm_bits=[], warm_dtypes=[], torch_threads=3, device="cpu")
    engine = Engine(s, Metrics(s, "test"))
    try:  # an explicit setting wins
        assert engine._executor.submit(torch.get_num_threads).result() == 3
    finally:
        engine.close()


def test_warm_up_logs_its_progress(monkeypatch, caplog):
    monkeypatch.setattr(engine_module, "WARM_UP_LOG_EVERY_S", 0.0)  # a line per quantizer
    s = settings(warm_variants=["full", "fast"], warm_dims=[64], warm_bits=[2, 3], warm_dtypes=["float32"])
    engine = Engine(s, Metrics(s, "test"))
    try:
        with caplog.at_level(logging.INFO, logger="service.engine"):
            engine.warm_up()
    finally:
        engine.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "service.engine"]
    expected = [("full", 2), ("full", 3), ("fast", 2), ("fast", 3)]
    assert len(lines) == 4
    for i, (line, (variant, bits)) in enumerate(zip(lines, expected, strict=True)):
        pattern = rf"warm-up: {i} of 4 quantizers built and run after \d+\.\d s; next {variant} dim 64 {bits} bits"
        assert re.fullmatch(pattern, line), line
