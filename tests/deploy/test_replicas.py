"""Two replicas of the service are interchangeable, tested for real on one machine: two ``python -m service``
processes behind HAProxy (Debian's package; .ci/run installs it) with health checks on /health/ready, and
a Prometheus (Debian's package) scraping both as a kube-prometheus stack would, with the labels its
ServiceMonitor gives (namespace, pod).

- Codes made on one replica decode byte-identically on the other, for every served variant, at the default
  seed and another one; codes made before a rolling restart decode identically on the restarted replicas.
- A rolling restart (SIGTERM, exit, start, ready, in the balancer again; then the other) under steady load
  through the balancer loses no request: the service turns not-ready at SIGTERM and keeps serving for
  ISOQUANT_DRAIN_SECONDS, HAProxy's checks take it out before it closes.
- Every query of the Grafana dashboard counts both replicas: at one instant, a sum over both is the sum of
  the query over each replica alone, a quantile or a ratio lies between the two replicas' own, and the
  per-replica panels show both. The autoscaler's query (prometheus-adapter's rule) answers for each pod.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.deploy.conftest import PROMETHEUS_CONFIG, ROOT, dashboard_targets, free_port, stop, substitute, wait_http

ADAPTER_RULES = ROOT / "deploy" / "k8s" / "autoscaling" / "prometheus-adapter-rules.yaml"
PROMETHEUS = shutil.which("prometheus")
HAPROXY = shutil.which("haproxy")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or HAPROXY is None,
    reason="haproxy and prometheus not installed (Debian packages; .ci/run installs them)",
)

# Outside Kubernetes the drain is the service's own: not ready but serving for this long after SIGTERM,
# several times what HAProxy's checks below take to see it (2 failures 250 ms apart, on a busy machine).
DRAIN_SECONDS = 3
# Two replicas and everything else on two cores: one torch thread each, a small warm set.
REPLICA_ENV = {
    "ISOQUANT_DEVICE": "cpu",
    "ISOQUANT_TORCH_THREADS": "1",
    # The dims the codes are checked at (below), whatever the default list is.
    "ISOQUANT_DIMS": "64,98",
    "ISOQUANT_WARM_VARIANTS": "full",
    "ISOQUANT_WARM_DIMS": "64",
    "ISOQUANT_WARM_BITS": "3",
    "ISOQUANT_WARM_DTYPES": "float32",
    "ISOQUANT_WARM_BATCH": "8",
    "ISOQUANT_DRAIN_SECONDS": str(DRAIN_SECONDS),
    "ISOQUANT_LOG_LEVEL": "warning",
}
NAMESPACE = "isoquant-test"
LOAD_THREADS = 4
LOAD_LIMIT_S = 150  # the load stops by itself after this, whatever happens


# ---- the pieces ---------------------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str  # the pod label Prometheus gives its series
    port: int
    log: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
        env.update(REPLICA_ENV, PYTHONPATH=str(ROOT))
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        self.starts += 1
        wait_http(f"{self.url}/health/ready", 120, self.process, self.log)


class Balancer:
    """HAProxy in front of the replicas: round robin, health checks on /health/ready every 250 ms (down
    after 2 failures, up after 2 successes), no retries of requests that reached a server."""

    def __init__(self, replicas: list[Replica], directory: Path) -> None:
        self.port, self.stats_port = free_port(), free_port()
        servers = "\n".join(f"  server {r.name} {r.instance} check" for r in replicas)
        self.config = directory / "haproxy.cfg"
        self.config.write_text(f"""
global
  maxconn 512

defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout check 2s
  # Connection attempts only (nothing was sent yet), to the other server: never a request twice.
  retries 2
  option redispatch

frontend isoquant
  bind 127.0.0.1:{self.port}
  default_backend replicas

backend replicas
  balance roundrobin
  option httpchk
  http-check send meth GET uri /health/ready
  http-check expect status 200
  default-server inter 250ms fastinter 250ms downinter 250ms fall 2 rise 2
{servers}

frontend stats
  bind 127.0.0.1:{self.stats_port}
  stats enable
  stats uri /stats
""")
        checked = subprocess.run([HAPROXY, "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.log = directory / "haproxy.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=out,
                                            stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def states(self) -> dict[str, str]:
        """Server name -> HAProxy's status (UP, DOWN, "UP 1/2", ...), from its CSV statistics."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text.lstrip("# ")
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait(self, name: str, status: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"haproxy exited: {self.log.read_text()[-2000:]}")
            try:
                states = self.states()
            except httpx.TransportError as exc:  # still starting
                states = {"error": repr(exc)}
            if states.get(name) == status:
                return
            time.sleep(0.05)
        pytest.fail(f"haproxy: {name} not {status} after {timeout} s: {states}")


class Prometheus:
    def __init__(self, replicas: list[Replica], directory: Path) -> None:
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        self.port = free_port()
        config["global"].update(scrape_interval="1s", scrape_timeout="1s")
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        # The labels the Prometheus Operator puts on a ServiceMonitor's targets (the job is the Service's name).
        jobs["isoquant"]["static_configs"] = [
            {"targets": [r.instance], "labels": {"namespace": NAMESPACE, "pod": r.name}} for r in replicas
        ]
        jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{self.port}"]}]
        path = directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = directory / "prometheus.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={directory}/data",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=out, stderr=subprocess.STDOUT, cwd=directory,
            )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(f"{self.url}/-/ready", 30, self.process, self.log)

    def query(self, expr: str, at: float) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr, "time": f"{at:.3f}"}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {response.text}"
        return body["data"]["result"]


@dataclass
class Cluster:
    replicas: list[Replica]
    balancer: Balancer
    prometheus: Prometheus
    variants: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="isoquant-replicas-") as tmp:
        directory = Path(tmp)
        replicas = [Replica(name, free_port(), directory / f"{name}.log") for name in ("replica-a", "replica-b")]
        processes = []
        try:
            for replica in replicas:
                replica.start()
            balancer = Balancer(replicas, directory)
            processes.append(balancer.process)
            for replica in replicas:
                balancer.wait(replica.name, "UP")
            prometheus = Prometheus(replicas, directory)
            processes.append(prometheus.process)
            info = httpx.get(f"{replicas[0].url}/info", timeout=10).json()
            yield Cluster(replicas, balancer, prometheus, variants=list(info["variants"]))
        finally:
            for process in processes + [r.process for r in replicas if r.process]:
                stop(process)


# ---- codes across replicas --------------------------------------------------------------------------------

# Every served variant, at a dimension that is a power of two and one that is not (hadamard pads it, the block
# rotations end on a partial block: 98 = 24 x 4 + 2), two bit widths, the default seed and another one (whose
# quantizers each replica builds on demand).
CASES_DIMS = (64, 98)
CASES_BITS = (2, 5)
CASES_SEEDS = (None, 987654321)


def _array(x: np.ndarray) -> dict:
    return {"data": base64.b64encode(x.tobytes()).decode(), "dtype": str(x.dtype), "shape": list(x.shape)}


def _cases(variants: list[str]):
    rng = np.random.default_rng(11)
    for variant in variants:
        for dim in CASES_DIMS:
            for bits in CASES_BITS:
                for seed in CASES_SEEDS:
                    x = rng.standard_normal((16, dim)).astype(np.float32)
                    request = {"vectors": _array(x), "variant": variant, "bits": bits}
                    if seed is not None:
                        request["seed"] = seed
                    yield (variant, dim, bits, seed), request


def _post(client: httpx.Client, url: str, path: str, body: dict) -> dict:
    response = client.post(f"{url}{path}", json=body)
    assert response.status_code == 200, (url, path, response.text[:500])
    return response.json()


@pytest.fixture(scope="module")
def codes_before(cluster) -> dict:
    """Before the rolling restart: each case quantized on replica A, and A's decoding of it."""
    a = cluster.replicas[0]
    out = {}
    with httpx.Client(timeout=60) as client:
        for key, request in _cases(cluster.variants):
            answer = _post(client, a.url, "/quantize", request)
            decoded = _post(client, a.url, "/dequantize", answer)["vectors"]
            out[key] = (answer, decoded)
    return out


def test_every_variant_is_served_and_checked(cluster, codes_before):
    # The service's own list, whatever it is: the seven variants at the time of writing.
    assert {"full", "fast", "2d", "dense", "hadamard", "identity", "kronecker"} <= set(cluster.variants)
    assert {key[0] for key in codes_before} == set(cluster.variants)


def test_codes_made_on_one_replica_decode_byte_identically_on_the_other(cluster):
    a, b = cluster.replicas
    checked = 0
    with httpx.Client(timeout=60) as client:
        for key, request in _cases(cluster.variants):
            answer_a = _post(client, a.url, "/quantize", request)
            answer_b = _post(client, b.url, "/quantize", request)
            # The same codes, norms and quantizer (fingerprint) from both.
            for part in ("codes", "norms", "quantizer"):
                assert answer_a[part] == answer_b[part], (key, part)
            on_a = _post(client, a.url, "/dequantize", answer_a)["vectors"]
            on_b = _post(client, b.url, "/dequantize", answer_a)["vectors"]
            back_on_a = _post(client, a.url, "/dequantize", answer_b)["vectors"]
            assert on_a["shape"] == on_b["shape"] == request["vectors"]["shape"], key
            assert base64.b64decode(on_a["data"]) == base64.b64decode(on_b["data"]), key
            assert base64.b64decode(back_on_a["data"]) == base64.b64decode(on_a["data"]), key
            checked += 1
    assert checked == len(cluster.variants) * len(CASES_DIMS) * len(CASES_BITS) * len(CASES_SEEDS)


# ---- a rolling restart under load ---------------------------------------------------------------------------


@dataclass
class LoadResult:
    ok: list[float] = field(default_factory=list)  # completion times of the successful requests
    failures: list[str] = field(default_factory=list)
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)  # replica -> (SIGTERM, back UP)
    exit_seconds: dict[str, float] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    end_wall: float = 0.0  # time.time() when the load stopped


def _load(url: str, stop_event: threading.Event, result: LoadResult, lock: threading.Lock, seed: int) -> None:
    """One client of the steady load: /quantize with distortion, then /dequantize of the answer with the
    reference, through the balancer over a keep-alive connection, until told to stop (or LOAD_LIMIT_S)."""
    rng = np.random.default_rng(seed)
    deadline = time.monotonic() + LOAD_LIMIT_S
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop_event.is_set() and time.monotonic() < deadline:
            x = rng.standard_normal((64, 64)).astype(np.float32)
            try:
                r = client.post("/quantize", json={"vectors": _array(x), "variant": "full", "bits": 3,
                                                   "return_distortion": True})
                if r.status_code == 200:
                    answer = r.json()
                    r = client.post("/dequantize", json={**answer, "reference": _array(x)})
                outcome = None if r.status_code == 200 else f"{r.request.url.path} {r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with lock:
                if outcome is None:
                    result.ok.append(time.monotonic())
                else:
                    result.failures.append(outcome)
            stop_event.wait(0.005)


@pytest.fixture(scope="module")
def rolling_restart(cluster, codes_before) -> LoadResult:
    """Steady load through the balancer; restart replica A, then B, each: SIGTERM, wait for the exit, start
    it again, wait until HAProxy has it UP. The load runs 3 s before, throughout, and 5 s after."""
    result, lock, stop_event = LoadResult(), threading.Lock(), threading.Event()
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        clients = [pool.submit(_load, cluster.balancer.url, stop_event, result, lock, seed)
                   for seed in range(LOAD_THREADS)]
        try:
            time.sleep(3)
            for replica in cluster.replicas:
                start = time.monotonic()
                replica.process.send_signal(signal.SIGTERM)
                # HAProxy sees it go not-ready well within the drain...
                cluster.balancer.wait(replica.name, "DOWN", timeout=DRAIN_SECONDS)
                result.exit_codes[replica.name] = replica.process.wait(60)
                result.exit_seconds[replica.name] = time.monotonic() - start
                replica.start()
                cluster.balancer.wait(replica.name, "UP")
                result.windows[replica.name] = (start, time.monotonic())
            time.sleep(5)
        finally:
            stop_event.set()
            for c in clients:
                c.result(timeout=60)
    result.end_wall = time.time()
    return result


def test_a_rolling_restart_under_load_loses_no_request(cluster, rolling_restart):
    result = rolling_restart
    assert not result.failures, f"{len(result.failures)} failed of {len(result.failures) + len(result.ok)}: " \
                                f"{result.failures[:5]}"
    # The load was real and kept flowing while each replica was away: the other one served it.
    assert len(result.ok) >= 200, len(result.ok)
    for name, (start, back) in result.windows.items():
        during = sum(start <= t <= back for t in result.ok)
        assert during >= 20, (name, during)
    for replica in cluster.replicas:
        assert replica.starts == 2
        # A clean exit: 0, or killed by the SIGTERM that uvicorn re-raises once it has shut down.
        assert result.exit_codes[replica.name] in (0, -signal.SIGTERM), result.exit_codes
        assert DRAIN_SECONDS <= result.exit_seconds[replica.name] < DRAIN_SECONDS + 30, result.exit_seconds
    print(f"\nrolling restart: {len(result.ok)} requests answered, {len(result.failures)} failed; "
          f"exits after SIGTERM {', '.join(f'{k} {v:.1f} s' for k, v in result.exit_seconds.items())}; "
          f"each replica away (SIGTERM to back in the balancer) "
          f"{', '.join(f'{k} {b - a:.1f} s' for k, (a, b) in result.windows.items())}")


def test_codes_made_before_the_restart_decode_identically_after_it(cluster, rolling_restart, codes_before):
    with httpx.Client(timeout=60) as client:
        for key, (answer, decoded) in codes_before.items():
            for replica in cluster.replicas:
                again = _post(client, replica.url, "/dequantize", answer)["vectors"]
                assert base64.b64decode(again["data"]) == base64.b64decode(decoded["data"]), (key, replica.name)


# ---- Prometheus and the dashboard, across both ----------------------------------------------------------------

_SELECTOR = re.compile(r"\b(isoquant_[a-z_]+)(\{([^{}]*)\})?")


def only(expr: str, instance: str) -> str:
    """The query restricted to one scraped instance: instance="..." added to every series selector."""

    def add(match: re.Match) -> str:
        inner = match.group(3)
        return f'{match.group(1)}{{instance="{instance}"{", " + inner if inner else ""}}}'

    return _SELECTOR.sub(add, expr)


def _values(result: list[dict]) -> dict[tuple, float]:
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in result}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _kind(expr: str) -> str:
    compact = re.sub(r"\s+", "", expr)
    if compact.startswith("histogram_quantile("):
        return "between"  # a quantile of the merged histograms lies between the replicas' own
    if re.search(r"\)/sum", compact):
        return "between"  # sum(a)/sum(b) over both lies between each replica's a/b
    if compact.startswith(("sum(", "sumby(", "count(")):
        return "sum"
    if compact.startswith(("min(", "minby(")):
        return "min"
    if compact.startswith(("max(", "maxby(")):
        return "max"
    raise AssertionError(f"the dashboard query {expr!r} aggregates over replicas in a way this test does not know")


def test_prometheus_scrapes_both_replicas(cluster, rolling_restart):
    at = rolling_restart.end_wall - 1
    up = _values(cluster.prometheus.query('up{job="isoquant"}', at))
    assert len(up) == 2 and set(up.values()) == {1.0}, up
    pods = {dict(k)["pod"] for k in _values(cluster.prometheus.query("isoquant_ready", at))}
    assert pods == {"replica-a", "replica-b"}


def test_every_dashboard_query_counts_both_replicas(cluster, rolling_restart):
    """At one instant during the load, each query over both replicas against the same query on each replica
    alone. Series of the rare events and the GPU (none here) are skipped; everything else must have data on
    both replicas."""
    at = rolling_restart.end_wall - 1
    prometheus = cluster.prometheus
    a, b = (r.instance for r in cluster.replicas)
    checked, per_replica = 0, 0
    for title, target in dashboard_targets():
        expr = substitute(target["expr"])
        total = _values(prometheus.query(expr, at))
        if not total:
            assert re.search(r"gpu_memory|rejected|device_errors", expr), f"{title}: no data for {expr}"
            continue
        if "by (instance)" in expr:
            # A per-replica panel: one series for each.
            assert {dict(k)["instance"] for k in total} == {a, b}, (title, total)
            per_replica += 1
            continue
        on_a, on_b = _values(prometheus.query(only(expr, a), at)), _values(prometheus.query(only(expr, b), at))
        assert on_a and on_b, f"{title}: one replica has no data for {expr}: {on_a} / {on_b}"
        kind = _kind(expr)
        for key, value in total.items():
            parts = [v for v in (on_a.get(key), on_b.get(key)) if v is not None and not math.isnan(v)]
            if math.isnan(value):
                continue
            assert parts, (title, key)
            if kind == "sum":
                assert _close(value, sum(parts)), (title, key, value, parts)
            elif kind == "min":
                assert _close(value, min(parts)), (title, key, value, parts)
            elif kind == "max":
                assert _close(value, max(parts)), (title, key, value, parts)
            else:
                assert min(parts) - 1e-9 <= value <= max(parts) + 1e-9, (title, key, value, parts)
        checked += 1
    # The overview's replica count says 2 of 2 ready.
    assert _values(prometheus.query("sum(isoquant_ready)", at)) == {(): 2.0}
    assert _values(prometheus.query("count(isoquant_ready)", at)) == {(): 2.0}
    assert checked >= 20 and per_replica == 3, (checked, per_replica)


def test_the_autoscalers_query_answers_for_each_pod(cluster, rolling_restart):
    """prometheus-adapter's rule, with what the adapter substitutes for a HorizontalPodAutoscaler asking
    about these pods: one value a pod, and the same values as the dashboard's panel of the signal."""
    (rule,) = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    series = rule["seriesQuery"]
    at = rolling_restart.end_wall - 1
    assert {dict(k)["pod"] for k in _values(cluster.prometheus.query(series, at))} == {"replica-a", "replica-b"}
    query = (rule["metricsQuery"].replace("<<.Series>>", "isoquant_queue_depth")
             .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"replica-a|replica-b"')
             .replace("<<.GroupBy>>", "pod"))
    per_pod = {dict(k)["pod"]: v for k, v in _values(cluster.prometheus.query(query, at)).items()}
    assert set(per_pod) == {"replica-a", "replica-b"}, per_pod
    assert all(v >= 0 for v in per_pod.values()) and sum(per_pod.values()) > 0, per_pod
    (panel,) = [t for title, t in dashboard_targets() if title.startswith("Admitted requests per replica")]
    by_instance = _values(cluster.prometheus.query(substitute(panel["expr"]), at))
    assert sorted(by_instance.values()) == pytest.approx(sorted(per_pod.values()))
