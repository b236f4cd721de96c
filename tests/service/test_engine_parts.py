"""The parts the Engine coordinates, each on its own: the quantizer cache (one build per key however many
threads ask at once), the admission counters, and the mapping of the library's typed errors to 422s."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import service.quantizers
from kernels import Quantizer, QuantizerError
from service.admission import Admission
from service.engine import invalid_input
from service.errors import QueueFull
from service.metrics import Metrics
from service.quantizers import QuantizerCache
from tests.service.conftest import settings

THREADS = 16


class _CountingQuantizer:
    """Stands in for Quantizer: records each build and takes a while, so that threads that missed the
    cache together overlap inside the build."""

    builds: list[tuple] = []
    builds_lock = threading.Lock()

    def __init__(self, variant, dim, bits, seed, device) -> None:
        with self.builds_lock:
            self.builds.append((variant, dim, bits, seed))
        time.sleep(0.05)
        self.key = (variant, dim, bits, seed)


@pytest.fixture
def counting(monkeypatch) -> list[tuple]:
    _CountingQuantizer.builds = []
    monkeypatch.setattr(service.quantizers, "Quantizer", _CountingQuantizer)
    return _CountingQuantizer.builds


def _cache(seed_cache_size: int = 8) -> tuple[QuantizerCache, Metrics]:
    metrics = Metrics(settings(), "test")
    return QuantizerCache(torch.device("cpu"), 0, seed_cache_size, metrics), metrics


def _all_at_once(fn, keys: list[tuple]) -> list:
    """``fn(*key)`` for each key, each on its own thread, all released together by a barrier."""
    barrier = threading.Barrier(len(keys))

    def one(key):
        barrier.wait(10)
        return fn(*key)

    with ThreadPoolExecutor(len(keys)) as pool:
        return list(pool.map(one, keys))


@pytest.mark.parametrize("seed", [0, 7], ids=["default_seed", "other_seed"])
def test_concurrent_misses_of_one_key_build_one_quantizer(counting, seed):
    cache, _ = _cache()
    got = _all_at_once(cache.get, [("full", 64, 3, seed)] * THREADS)
    assert counting == [("full", 64, 3, seed)]
    assert all(q is got[0] for q in got)


def test_concurrent_misses_of_several_keys_build_each_once(counting):
    cache, metrics = _cache(seed_cache_size=8)
    keys = [(v, 64, 3, s) for v in ("full", "2d") for s in (0, 1, 2, 3)]  # 2 default-seed keys, 6 others
    got = _all_at_once(cache.get, keys * 3)
    assert sorted(counting) == sorted(keys)
    for key, q in zip(keys * 3, got, strict=True):
        assert q.key == key and q is cache.get(*key)
    assert sorted(counting) == sorted(keys)  # the lookups after the storm built nothing
    assert cache.counts() == {"default_seed": 2, "other_seeds": 6}
    sample = metrics.registry.get_sample_value
    assert sample("isoquant_quantizers_resident", {"cache": "default_seed"}) == 2
    assert sample("isoquant_quantizers_resident", {"cache": "other_seeds"}) == 6


def test_other_seeds_are_a_bounded_lru_and_the_default_seed_is_kept(counting):
    cache, _ = _cache(seed_cache_size=2)
    for seed in (1, 2, 1, 3):  # 1 is used again before 3 arrives: 2 is the least recently used
        cache.get("full", 64, 3, seed)
    cache.get("full", 64, 3, 0)
    assert cache.counts() == {"default_seed": 1, "other_seeds": 2}
    counting.clear()
    cache.get("full", 64, 3, 1)
    cache.get("full", 64, 3, 3)
    cache.get("full", 64, 3, 0)
    assert counting == []  # still cached
    cache.get("full", 64, 3, 2)
    assert counting == [("full", 64, 3, 2)]  # evicted, so built again


def test_a_refused_build_caches_nothing():
    cache, _ = _cache()
    with pytest.raises(QuantizerError):
        cache.get("full", 64, 99, 0)
    assert cache.counts() == {"default_seed": 0, "other_seeds": 0}
    assert isinstance(cache.get("full", 64, 3, 0), Quantizer)


def test_admission_counts_places_and_refuses_beyond_max_queue():
    metrics = Metrics(settings(), "test")
    admission = Admission(max_queue=2, metrics=metrics)
    sample = metrics.registry.get_sample_value
    first, second = admission.admit(), admission.admit()
    with pytest.raises(QueueFull, match="max_queue=2"):
        admission.admit()
    assert sample("isoquant_rejected_requests_total", {"reason": "queue_full"}) == 1
    first.handed_off = True  # as Engine.run does when a job takes the place over
    admission.job_started()
    assert (sample("isoquant_queue_depth"), sample("isoquant_jobs_running")) == (1, 1)
    with second:  # a request that never reached the device gives its place back on leaving
        pass
    admission.job_finished()
    assert (sample("isoquant_queue_depth"), sample("isoquant_jobs_running")) == (0, 0)
    with admission.admit(), admission.admit():  # both places are free again
        pass


@pytest.mark.parametrize(
    "field, kind, status, type_, request_field",
    [
        ("x", "non_finite", 422, "non_finite", "vectors"),
        ("x", "overflow", 422, "invalid_value", "vectors"),
        ("x", "dtype", 422, "invalid_value", "vectors"),
        ("x", "shape", 422, "shape_mismatch", "vectors"),
        ("x", "device", 422, "invalid_value", "vectors"),
        ("x", "type", 422, "invalid_value", "vectors"),
        ("norms", "non_finite", 422, "non_finite", "norms"),
        ("codes", "shape", 422, "shape_mismatch", "codes"),
        ("dtype", "dtype", 422, "invalid_value", "dtype"),
        ("fingerprint", "fingerprint", 422, "fingerprint_mismatch", "quantizer.fingerprint"),
        ("bits", "value", 422, "invalid_value", "bits"),
        ("backend", "value", 422, "invalid_value", None),
        ("packed", "type", 422, "invalid_value", None),
        (None, "value", 422, "invalid_value", None),
    ],
)
def test_library_errors_map_by_field_and_kind(field, kind, status, type_, request_field):
    # The same uninformative message for every case: the mapping must not depend on the wording.
    message = f"{field} is refused" if field is not None else "refused"
    error = invalid_input(QuantizerError(message, field=field, kind=kind))
    assert (error.status, error.type, error.field) == (status, type_, request_field)
    assert error.message == ("vectors is refused" if field == "x" else message)
