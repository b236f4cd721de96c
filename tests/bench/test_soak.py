"""bench/soak.py for a few seconds: it starts a service, drives it with valid, bad and fuzzed requests of both
media types, and reports statuses, latency and resident memory; no answer is a 500."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_smoke(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "bench/soak.py", "--duration", "6", "--fuzz", "300", "--threads", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| soak (6 s) |" in run.stdout and "server log: 0 tracebacks" in run.stdout, run.stdout
    soak, fuzz = json.loads(out.read_text())["results"]
    for result in (soak, fuzz):
        assert result["server_errors_500"] == 0 and result["no_answer"] == 0, result["failures"]
    assert all(soak["by_kind"][kind] > 20 for kind in ("valid", "bad", "fuzz")), soak["by_kind"]
    by_kind = soak["statuses_by_kind"]
    assert by_kind.get("valid:200", 0) > 20 and by_kind.get("bad:200", 0) == 0, by_kind  # every bad one refused
    assert {"400", "422"} <= set(fuzz["statuses"]) and fuzz["requests"] == 300, fuzz["statuses"]
    assert soak["rss_minute_one_bytes"] > 0 and soak["rss_end_bytes"] > 0 and soak["p99_ms"] >= soak["p50_ms"]
