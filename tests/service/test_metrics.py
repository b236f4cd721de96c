"""/metrics after traffic: `promtool check metrics` passes, and the names and labels the dashboard and docs rely on are
there with the right values; label values never leave the allowlist."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as st_save

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
    assert ("dequantize", "full", "128", "3", "float32") in series
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
    assert value("isoquant_payload_bytes", op="dequantize", direction="out") >= 100 * 128 * 4
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
        "dim": {"32", "64", "96", "128", "256", "512", "1024"},
        "bits": {str(b) for b in range(1, 9)},
        "dtype": {"float16", "bfloat16", "float32"},
        "op": {"quantize", "dequantize", "roundtrip"},
    }
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            for key, values in allowed.items():
                if key in sample.labels:
                    assert sample.labels[key] in values, (sample.name, sample.labels)
