"""/metrics after traffic: `promtool check metrics` passes, and the names and labels the dashboard and docs rely on are
there with the right values; label values never leave the allowlist."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as st_save

from service.metrics import COMMON_DIMS, dim_label
from tests.service.conftest import SAFETENSORS, b64

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def exposition(app) -> str:
    client = app.state.test_client
    x = torch.randn(100, 128).half()
    r = await client.post(
        "/quantize", json={"vectors": b64(x), "variant": "full", "bits": 3, "return_distortion": True}
    )
    assert r.status_code == 200
    d = await client.post("/dequantize", content=r.content, headers={"content-type": "application/json"})
    assert d.status_code == 200
    r = await client.post(
        "/quantize",
        content=st_save({"vectors": torch.randn(7, 64)}, metadata={"variant": "2d"}),
        headers={"content-type": SAFETENSORS},
    )
    assert r.status_code == 200
    # Dims outside the common sizes and the warm set: their label is a power-of-two bucket.
    for dim in (100, 300, 768, 4096):
        r = await client.post("/quantize", json={"vectors": b64(torch.randn(3, dim)), "variant": "fast", "bits": 2})
        assert r.status_code == 200, r.text
    # Refused requests must not create label values outside the allowlist.
    assert (await client.post("/quantize", json={"vectors": b64(x), "variant": "rotor<script>"})).status_code == 422
    assert (await client.get("/no/such/route")).status_code == 404
    text = (await client.get("/metrics")).text
    assert (await client.get("/metrics")).headers["content-type"].startswith("text/plain; version=")
    return text


def _samples(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.mark.integration  # runs the real promtool
async def test_promtool_check_metrics(exposition):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    result = subprocess.run([promtool, "check", "metrics"], input=exposition.encode(), capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


async def test_kernel_histogram_labels_and_buckets(exposition):
    families = _samples(exposition)
    kernel = families["isoquant_kernel_duration_seconds"]
    assert kernel.type == "histogram"
    buckets = [s for s in kernel.samples if s.name.endswith("_bucket")]
    series = {
        (s.labels["op"], s.labels["variant"], s.labels["dim"], s.labels["bits"], s.labels["dtype"]) for s in buckets
    }
    assert ("quantize", "full", "128", "3", "float16") in series
    assert ("roundtrip", "full", "128", "3", "float16") in series
    # The /quantize answer posted back carries its input's dtype: the dequantize ran in float16.
    assert ("dequantize", "full", "128", "3", "float16") in series
    assert ("quantize", "2d", "64", "3", "float32") in series
    bounds = sorted({float(s.labels["le"]) for s in buckets})
    assert bounds[0] == 1e-6 and bounds[-2] == 1.0 and bounds[-1] == float("inf")
    count = [
        s
        for s in kernel.samples
        if s.name.endswith("_count")
        and s.labels["op"] == "quantize"
        and s.labels["variant"] == "full"
        and s.labels["dim"] == "128"
    ]
    assert count and count[0].value >= 1


async def test_counters_and_gauges(exposition):
    f = _samples(exposition)

    def value(name, **labels):
        for s in f[name].samples:
            if s.name.endswith("_total") or s.name == name or s.name.endswith("_count"):
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise AssertionError(f"{name} {labels} missing")

    assert value("isoquant_vectors", op="quantize", variant="full", dim="128", bits="3") >= 100
    assert value("isoquant_vectors", op="dequantize", variant="full", dim="128", bits="3") >= 100
    assert value("isoquant_payload_bytes", op="quantize", direction="in") >= 100 * 128 * 2 + 7 * 64 * 4
    assert value("isoquant_payload_bytes", op="dequantize", direction="out") >= 100 * 128 * 2  # float16 restored
    assert f["isoquant_batch_size_vectors"].type == "histogram"
    assert f["isoquant_reconstruction_relative_error"].type == "histogram"
    assert value("isoquant_reconstruction_relative_error", variant="full", dim="128", bits="3") >= 1
    assert value("isoquant_requests", route="/quantize", method="POST", status="200") >= 2
    assert value("isoquant_requests", route="/quantize", method="POST", status="422") >= 1
    assert value("isoquant_requests", route="unmatched", method="GET", status="404") >= 1
    assert f["isoquant_request_duration_seconds"].type == "histogram"
    for gauge in ("isoquant_queue_depth", "isoquant_inflight_requests", "isoquant_jobs_running"):
        assert f[gauge].type == "gauge"
    assert value("isoquant_ready") == 1.0
    info = [s for s in f["isoquant_build_info"].samples][0]
    assert info.labels["device"] == "cpu" and info.labels["torch"] == torch.__version__
    assert "# TYPE isoquant_gpu_memory_bytes gauge" in exposition  # samples only on a CUDA device
    assert "process_resident_memory_bytes" in exposition


async def test_label_values_stay_on_the_allowlist(exposition):
    assert "rotor" not in exposition and "/no/such/route" not in exposition
    allowed = {
        "variant": {"full", "fast", "2d", "dense", "hadamard", "identity"},
        # Every dim 2-4096 is served; the label is the dim for the common sizes and the warm set, else a bucket.
        "dim": {str(d) for d in COMMON_DIMS} | {f"le_{1 << k}" for k in range(1, 13)},
        "bits": {str(b) for b in range(1, 9)},
        "dtype": {"float16", "bfloat16", "float32"},
        "op": {"quantize", "dequantize", "roundtrip"},
    }
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            for key, values in allowed.items():
                if key in sample.labels:
                    assert sample.labels[key] in values, (sample.name, sample.labels)


async def test_dim_label_is_the_dim_or_its_power_of_two_bucket(exposition):
    samples = _samples(exposition)["isoquant_vectors"].samples
    dims = {s.labels["dim"] for s in samples if s.labels.get("op") == "quantize"}
    # 100 -> (64, 128], 300 -> (256, 512]; 768 and 4096 are common sizes; 128 and 64 are warm (and common).
    assert {"le_128", "le_512", "768", "4096", "128", "64"} <= dims
    assert not {"100", "300"} & dims


def test_dim_label_bounds():
    exact = frozenset({64, 128, 768})
    assert [dim_label(d, exact) for d in (2, 3, 4, 5, 64, 65, 100, 128, 129, 768, 769, 4095, 4096)] == [
        "le_2", "le_4", "le_4", "le_8", "64", "le_128", "le_128", "128", "le_256", "768", "le_1024", "le_4096",
        "le_4096"]  # fmt: skip
    # Every served dim maps into at most len(exact) + 12 values, whatever clients send.
    labels = {dim_label(d, exact) for d in range(2, 4097)}
    assert len(labels) == len(exact) + 12


def test_a_short_served_list_labels_each_dim_exactly():
    from service.metrics import Metrics
    from tests.service.conftest import settings

    m = Metrics(settings(dims=[64, 100, 128, 300], warm_dims=[64]), "test")
    assert [m.label("dim", d) for d in (64, 100, 300, 128)] == ["64", "100", "300", "128"]
    assert m.label("dim", 5000) == "other" and m.label("dim", "100") == "other" and m.label("dim", 101) == "other"
    wide = Metrics(settings(), "test")  # the default: 2-4096, bucketed outside the common sizes and warm set
    assert [wide.label("dim", d) for d in (100, 128, 384, 385)] == ["le_128", "128", "384", "le_512"]


def test_a_multiprocess_scrape_skips_a_metric_file_not_yet_sized(tmp_path):
    """A server process creates its metric file empty and sizes it just after: a scrape (or another process's
    collector registration, which reads every file) in between read it as a truncated header, struct.error (a CI
    run's Traceback). The collector skips empty files and still reads the others."""
    import struct

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from prometheus_client.multiprocess import MultiProcessCollector

    from service.metrics import SizedFilesCollector

    written = MmapedDict(str(tmp_path / "counter_101.db"))
    key = mmap_key("isoquant_requests", "isoquant_requests_total", ["route"], ["/quantize"], "HTTP requests")
    written.write_value(key, 3.0, 0.0)
    written.close()
    (tmp_path / "counter_102.db").touch()  # another process's file, opened but not yet sized
    with pytest.raises(struct.error):
        MultiProcessCollector(None, path=str(tmp_path)).collect()  # prometheus_client's own
    registry = CollectorRegistry(auto_describe=True)  # as the service's: registering collects once
    SizedFilesCollector(registry, str(tmp_path))
    text = generate_latest(registry).decode()
    assert 'isoquant_requests_total{route="/quantize"} 3.0' in text, text
