"""Fixtures for the deployment tests: the repository's deploy files parsed, one real service process
(``python -m service`` on a free 127.0.0.1 port, a one-quantizer warm set so it starts in seconds) with
traffic sent to it, and helpers to read PromQL and the Prometheus exposition."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save as save_safetensors

from tests.live_service import SMALL_CPU_ENV, free_port, start_server, stop_server  # noqa: F401  (free_port: used by the tests)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "isoquant.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards"

# The live service: one small warm quantizer, CPU, everything else the defaults.
SERVICE_ENV = SMALL_CPU_ENV


class _ComposeTag:
    """A Compose merge tag (!reset, !override) kept as a marker around its value."""

    def __init__(self, tag: str, value: object) -> None:
        self.tag, self.value = tag, value

    def __repr__(self) -> str:
        return f"{self.tag} {self.value!r}"


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's !reset and !override tags."""


def _tag_constructor(loader: yaml.SafeLoader, node: yaml.Node) -> _ComposeTag:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return _ComposeTag(node.tag, value)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tag_constructor)


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.load(f, Loader=ComposeLoader)


def compose_merge(base: object, override: object) -> object:
    """Compose's merge rules for what our files use: mappings merge key by key, sequences append,
    scalars replace, `!reset` removes the key, `!override` replaces the value whole."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, _ComposeTag) and value.tag == "!reset":
                merged.pop(key, None)
            elif isinstance(value, _ComposeTag) and value.tag == "!override":
                merged[key] = value.value
            elif key in merged:
                merged[key] = compose_merge(merged[key], value)
            else:
                merged[key] = value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within the timeout."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_http(url: str, timeout: float, process: subprocess.Popen, log: Path) -> httpx.Response:
    """Poll url until it answers 200 (fail with the process's log if it exits or time runs out)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"{process.args[0]} exited with {process.returncode} before {url} answered:\n{log.read_text()[-4000:]}"
            )
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
            last = f"{response.status_code} {response.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"{url} not 200 after {timeout} s (last: {last}):\n{log.read_text()[-4000:]}")


def _b64(array: np.ndarray) -> dict:
    return {
        "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
        "dtype": str(array.dtype),
        "shape": list(array.shape),
    }


def send_traffic(client: httpx.Client, rng: np.random.Generator, rounds: int = 1) -> None:
    """Requests of every kind the dashboard shows: JSON and safetensors /quantize with distortion,
    /dequantize with a reference, a 422 and a 404. Asserts the successful ones succeed."""
    for _ in range(rounds):
        for variant, dim, bits in (("full", 64, 3), ("fast", 64, 2), ("2d", 128, 4)):
            x = rng.standard_normal((32, dim)).astype(np.float32)
            r = client.post(
                "/quantize", json={"vectors": _b64(x), "variant": variant, "bits": bits, "return_distortion": True}
            )
            assert r.status_code == 200, r.text
            answer = r.json()
            r = client.post("/dequantize", json={**answer, "reference": _b64(x)})
            assert r.status_code == 200, r.text
        body = save_safetensors(
            {"vectors": rng.standard_normal((64, 64)).astype(np.float16)},
            metadata={"variant": "full", "bits": "3", "return_distortion": "true"},
        )
        r = client.post("/quantize", content=body, headers={"Content-Type": "application/x-safetensors"})
        assert r.status_code == 200, r.text
        r = client.post("/dequantize", content=r.content, headers={"Content-Type": "application/x-safetensors"})
        assert r.status_code == 200, r.text
        assert client.post("/quantize", json={"vectors": [[1.0] * 64], "bits": 99}).status_code == 422
        assert client.get("/no-such-route").status_code == 404


@pytest.fixture(scope="session")
def live_service():
    """A real `python -m service` process on 127.0.0.1, ready, after one round of traffic."""
    server = start_server(SERVICE_ENV)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            send_traffic(client, np.random.default_rng(0))
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def live_metrics(live_service) -> str:
    return live_service.metrics_text()


def exposition_names(text: str) -> dict[str, set[str]]:
    """Every name in an exposition (sample names, and the names of HELP/TYPE lines, which declare a
    family even before it has samples) -> the label names seen on its samples."""
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            names.setdefault(line.split()[2], set())
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


# ---- PromQL -----------------------------------------------------------------------------------------

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.$])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:])(?!\s*\()")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) that a PromQL expression refers to. Label names come from matchers
    and from by/without/on/ignoring/group_* clauses; metric names are the remaining identifiers that
    are not functions (followed by '('), keywords or numbers."""
    labels: set[str] = set()
    text = _STRING.sub('""', expr)
    for body in _MATCHERS.findall(text):
        labels.update(_MATCHER_LABEL.findall(body))
    text = _MATCHERS.sub(" ", text)
    for _, body in _GROUPING.findall(text):
        labels.update(part.strip() for part in body.split(",") if part.strip())
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    metrics = {name for name in _IDENT.findall(text) if name.lower() not in PROMQL_KEYWORDS}
    return metrics, labels


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend or ""))


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets(board: dict | None = None) -> list[tuple[str, dict]]:
    """(panel title, target) for every query target of every panel, rows' nested panels included."""
    board = board or dashboard()
    out = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((panel.get("title", ""), target))
            walk(panel.get("panels", []))

    walk(board["panels"])
    return out


# Values substituted for the dashboard's Grafana variables when its queries are sent to Prometheus.
RATE_INTERVAL = "10s"


def substitute(expr: str) -> str:
    """Grafana variables -> what Grafana sends with 'All' selected and a short rate interval."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", RATE_INTERVAL)
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", ".*", expr)


def parse_markdown_table(text: str) -> list[list[str]]:
    """Rows (cells stripped) of every markdown table line in text, header and separator excluded."""
    rows = []
    for line in io.StringIO(text):
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            continue
        cells = [c.strip() for c in line[1:-1].split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue
        rows.append(cells)
    return rows[1:] if rows else rows


# ---- what the service exports -------------------------------------------------------------------------


def exported_families(monkeypatch: pytest.MonkeyPatch | None = None) -> dict[str, tuple[str, frozenset[str]]]:
    """Every metric family of service.metrics.Metrics -> (type, label names), from the metric objects
    themselves (so families without samples yet, like device errors, are included). The GPU memory
    collector is read with a fake CUDA device (torch's memory counters patched) to see its labels."""
    import torch
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics
    from service.settings import Settings

    metrics = Metrics(Settings(), "test")
    families: dict[str, tuple[str, frozenset[str]]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            families[value._name] = (value._type, frozenset(value._labelnames))
    patch = monkeypatch or pytest.MonkeyPatch()
    try:
        patch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1024)
        patch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2048)
        metrics.device = torch.device("cuda", 0)
        for family in metrics.registry.collect():
            if family.name not in families:
                labels = frozenset(k for s in family.samples for k in s.labels)
                families[family.name] = (family.type, labels)
    finally:
        if monkeypatch is None:
            patch.undo()
    return families


def query_names(name: str, kind: str) -> set[str]:
    """The names a family's series are queried by: name_total for counters, _bucket/_sum/_count for
    histograms, the name itself otherwise."""
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "info":
        return {f"{name}_info"}
    return {name}
