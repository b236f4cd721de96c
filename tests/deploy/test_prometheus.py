"""deploy/prometheus.yml with a real Prometheus (Debian's package; .ci/run installs it): promtool accepts
the file; a Prometheus started on a free 127.0.0.1 port with that configuration (target and interval
changed for the test) scrapes a live service, answers histogram_quantile(0.99, ...) on the kernel
latency histogram, and runs every query of the dashboard."""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.deploy.conftest import (
    PROMETHEUS_CONFIG,
    dashboard,
    dashboard_targets,
    free_port,
    promql_names,
    sample_names,
    send_traffic,
    stop,
    substitute,
    wait_http,
)

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool not installed (Debian package 'prometheus'; .ci/run installs it)",
)
WAIT_S = 60


def promtool_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60)


@needs_prometheus
def test_promtool_accepts_the_repository_config():
    result = promtool_check(PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@needs_prometheus
def test_promtool_rejects_a_broken_config(tmp_path):
    # The check above can fail: a wrong key is refused.
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["scrape_configs"][0]["scrape_intervall"] = "5s"
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(config))
    assert promtool_check(path).returncode != 0


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> dict:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {response.text}"
        return body["data"]


@pytest.fixture(scope="module")
def prometheus(live_service):
    """Prometheus with deploy/prometheus.yml, its isoquant target pointed at the live service and a 1 s
    scrape interval; traffic keeps flowing to the service (bounded) while the tests query."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    port = free_port()
    config["global"]["scrape_interval"] = "1s"
    config["global"]["scrape_timeout"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["isoquant"]["static_configs"] = [{"targets": [f"127.0.0.1:{live_service.port}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    stop_traffic = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        rng = np.random.default_rng(1)
        deadline = time.monotonic() + 3 * WAIT_S
        try:
            with httpx.Client(base_url=live_service.url, timeout=30) as client:
                while not stop_traffic.is_set() and time.monotonic() < deadline:
                    send_traffic(client, rng)
                    stop_traffic.wait(0.2)
        except BaseException as exc:  # surfaced by the tests
            errors.append(exc)

    with tempfile.TemporaryDirectory(prefix="isoquant-prometheus-") as tmp:
        path = Path(tmp) / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        checked = promtool_check(path)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        log = Path(tmp) / "prometheus.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={path}",
                    f"--storage.tsdb.path={tmp}/data",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp,
            )
        thread = threading.Thread(target=traffic, daemon=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", 30, process, log)
            thread.start()
            server = Prometheus(f"http://127.0.0.1:{port}")
            server.errors = errors
            yield server
        finally:
            stop_traffic.set()
            thread.join(60)
            stop(process)
    assert not errors, errors


def poll(prometheus: Prometheus, expr: str, accept, timeout: float = WAIT_S) -> list:
    """Query until accept(result) is true; fail with the last result after timeout."""
    deadline = time.monotonic() + timeout
    result: list = []
    while time.monotonic() < deadline:
        assert not prometheus.errors, prometheus.errors
        result = prometheus.query(expr)["result"]
        if accept(result):
            return result
        time.sleep(0.5)
    pytest.fail(f"{expr} after {timeout} s: {result}")


def finite(result: list) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


@needs_prometheus
def test_prometheus_scrapes_the_service(prometheus):
    result = poll(prometheus, 'up{job="isoquant"}', lambda r: r and r[0]["value"][1] == "1")
    assert len(result) == 1
    (ready,) = poll(prometheus, "isoquant_ready", lambda r: len(r) == 1)
    assert ready["value"][1] == "1" and ready["metric"]["job"] == "isoquant"


@needs_prometheus
def test_histogram_quantile_p99_of_kernel_latency(prometheus):
    expr = (
        "histogram_quantile(0.99, sum by (le, op, variant, dim, bits) "
        "(rate(isoquant_kernel_duration_seconds_bucket[10s])))"
    )
    result = poll(prometheus, expr, finite)
    values = {tuple(r["metric"][k] for k in ("op", "variant", "dim", "bits")): float(r["value"][1]) for r in result}
    assert ("quantize", "full", "64", "3") in values and ("dequantize", "2d", "128", "4") in values
    for key, value in values.items():
        if math.isfinite(value):
            # A CPU kernel on 32..64 vectors: above zero, within the histogram's top bucket (1 s).
            assert 0 < value <= 1.0, (key, value)


@needs_prometheus
def test_every_dashboard_query_runs_and_returns_data(prometheus, live_service):
    """Each query, as Grafana sends it with 'All' selected, is valid PromQL; those over series that
    exist on a CPU service return data."""
    samples = sample_names(live_service.metrics_text())
    for title, target in dashboard_targets():
        expr = substitute(target["expr"])
        metrics = promql_names(target["expr"])[0]
        if metrics <= samples:
            result = poll(prometheus, expr, lambda r: len(r) > 0)
            assert all("value" in r for r in result), title
        else:
            prometheus.query(expr)  # valid, though nothing to show yet (GPU memory, rare events)
    # The variables' label_values() answer with the values the traffic used.
    for variable in dashboard()["templating"]["list"]:
        metric, label = variable["definition"][len("label_values(") : -1].replace(" ", "").split(",")
        response = httpx.get(f"{prometheus.url}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10)
        values = response.json()["data"]
        assert values, variable["name"]
    assert {"full", "fast", "2d"} <= set(
        httpx.get(
            f"{prometheus.url}/api/v1/label/variant/values",
            params={"match[]": "isoquant_kernel_duration_seconds_bucket"},
            timeout=10,
        ).json()["data"]
    )


@needs_prometheus
def test_error_rate_query_sees_the_4xx(prometheus):
    (target,) = [
        t for title, t in dashboard_targets() if title == "Error rate (API routes)" and t["legendFormat"] == "4xx"
    ]
    # Each traffic round sends 10 API requests, 2 of them bad (a 422 and a 404 on an unmatched route).
    result = poll(prometheus, substitute(target["expr"]), lambda r: r and float(r[0]["value"][1]) > 0)
    assert 0.05 < float(result[0]["value"][1]) < 0.3
