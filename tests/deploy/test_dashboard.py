"""The provisioned Grafana dashboard: well-formed, covers the panels operators need, and every query uses only
metric names and labels that the service really exports (checked against a live service's /metrics
after traffic, and against the metric objects for label names)."""

from __future__ import annotations

import re

import pytest

from tests.deploy.conftest import (
    dashboard,
    dashboard_targets,
    exported_families,
    exposition_names,
    legend_labels,
    promql_names,
    query_names,
    sample_names,
)

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}


@pytest.fixture(scope="module")
def families(live_service) -> dict:
    return exported_families()


@pytest.fixture(scope="module")
def queryable(families) -> dict[str, frozenset[str]]:
    """Name a query may use -> labels its series carry ('le' on histogram buckets)."""
    out = {}
    for name, (kind, labels) in families.items():
        for query_name in query_names(name, kind):
            out[query_name] = labels | ({"le"} if query_name.endswith("_bucket") else set())
    return out


def all_panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_dashboard_is_well_formed():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for dx in range(grid["w"]):
            for dy in range(grid["h"]):
                cell = (grid["x"] + dx, grid["y"] + dy)
                assert cell not in cells, f"panel {panel['title']!r} overlaps another at {cell}"
                cells.add(cell)
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    # The variables the queries use are defined.
    defined = {v["name"] for v in board["templating"]["list"]}
    used = {name for _, t in dashboard_targets(board) for name in re.findall(r"\$([a-z]\w*)", t["expr"])}
    assert used - {"__rate_interval", "__interval"} <= defined


def test_dashboard_covers_what_the_issue_lists():
    """Kernel latency p50/p99 by op, variant, dim, bits; vectors/s; bytes/s; request rate by route and
    status; error rate; reconstruction error by variant and bits; queue depth; in-flight; GPU memory."""
    exprs = [t["expr"] for _, t in dashboard_targets()]
    compact = [re.sub(r"\s+", "", e) for e in exprs]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in compact)

    for q in ("0.5", "0.99"):
        assert has(
            rf"histogram_quantile\({q},sumby\(le,op,variant,dim,bits\)\(rate\(isoquant_kernel_duration_seconds_bucket"
        ), q
    assert has(r"rate\(isoquant_vectors_total")
    assert has(r"rate\(isoquant_payload_bytes_total")
    assert has(r"sumby\(route,status\)\(rate\(isoquant_requests_total")
    assert has(r'isoquant_requests_total\{[^}]*status=~"5\.\."')
    assert has(r"sumby\(variant,bits\)\(rate\(isoquant_reconstruction_relative_error_sum")
    for gauge in ("isoquant_queue_depth", "isoquant_inflight_requests", "isoquant_gpu_memory_bytes"):
        assert has(re.escape(gauge)), gauge


def test_every_query_uses_exported_metric_names_and_labels(queryable, families):
    problems = []
    for title, target in dashboard_targets():
        metrics, labels = promql_names(target["expr"])
        if not metrics:
            problems.append(f"{title}: no metric found in {target['expr']!r}")
        unknown = metrics - set(queryable)
        if unknown:
            problems.append(f"{title}: {sorted(unknown)} not exported")
            continue
        available = set().union(*(queryable[m] for m in metrics)) | TARGET_LABELS
        missing = (labels | legend_labels(target.get("legendFormat", ""))) - available
        if missing:
            problems.append(f"{title}: labels {sorted(missing)} not on {sorted(metrics)}")
    for variable in dashboard()["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
        assert match, variable["definition"]
        assert variable["query"]["query"] == variable["definition"]
        if match[2] not in queryable.get(match[1], ()):
            problems.append(f"variable {variable['name']}: {match[1]} has no label {match[2]}")
    assert not problems, "\n".join(problems)


def test_every_dashboard_metric_is_in_live_metrics_after_traffic(live_metrics, families):
    names = exposition_names(live_metrics)
    samples = sample_names(live_metrics)
    used = set().union(*(promql_names(t["expr"])[0] for _, t in dashboard_targets()))
    missing = sorted(used - set(names))
    assert not missing, f"dashboard metrics absent from a live /metrics: {missing}"
    # After traffic they have samples, except the GPU memory gauge (no series on a CPU service) and the
    # counters of rare events (a labelled counter has no series before its first event).
    no_samples = used - samples
    assert no_samples == {
        "isoquant_gpu_memory_bytes",
        "isoquant_rejected_requests_total",
        "isoquant_device_errors_total",
    }, no_samples
    # And the labels the live series carry are the ones the metric objects declare (with 'le').
    live_labels = exposition_names(live_metrics)
    for name in used & samples:
        family = next(f for f, (kind, _) in families.items() if name in query_names(f, kind))
        expected = families[family][1] | ({"le"} if name.endswith("_bucket") else set())
        assert live_labels[name] == expected, name
