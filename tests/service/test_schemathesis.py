"""schemathesis, with every one of its checks, against a live `python -m service`: requests generated from the
service's own OpenAPI schema (valid ones and ones that break it, for every operation) must get no 5xx, only
statuses and bodies the schema documents, and rejections of whatever breaks the schema.

One allowance, configured below: a request the schema allows may get 422 ("positive data acceptance"
would want 2xx). JSON Schema cannot say that an array's base64 ``data`` holds exactly shape x dtype bytes,
nor that a descriptor's fingerprint is the server's for its parameters; the service checks both and answers
422 naming the field. Everything JSON Schema can say about a request is in the schema (service/app.py,
``_request_constraints``)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.live_service import SMALL_CPU_ENV, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("schemathesis", path=str(Path(sys.executable).parent))
                                                   is None, reason="schemathesis is not installed (extra dev)")]

CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "422", "429"]
"""
# Per operation and phase: 671 requests in all, 18-25 s on a loaded 2-core CPU.
MAX_EXAMPLES = 60
# What a schema-valid request may still be refused for (422): each is a constraint JSON Schema cannot state.
INEXPRESSIBLE = (
    "data holds",  # base64 length against shape x dtype
    "data decodes to",
    "Input should be a valid integer",  # an integer written with a fraction (3.0): an integer to JSON Schema
    "nested lists must",  # rectangular lists
    "is not served",  # the last axis of a shape or nested list against the served dims
)
INEXPRESSIBLE_TYPES = ("fingerprint_mismatch", "shape_mismatch", "non_finite")


def _positive_refusals(ndjson: Path) -> Counter:
    """(path, error type, message) of every 422 that answered a request schemathesis generated as valid."""
    refused = Counter()
    for line in ndjson.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if event is None:
            continue
        recorder = event["recorder"]
        for case_id, interaction in recorder.get("interactions", {}).items():
            case = recorder["cases"][case_id]["value"]
            response = interaction.get("response") or {}
            if case["meta"]["generation"]["mode"] != "positive" or response.get("status_code") != 422:
                continue
            content = response["content"]
            raw = base64.b64decode(content["$base64"]) if isinstance(content, dict) else content
            error = json.loads(raw)["error"]
            refused[(case["path"], error["type"], error["message"][:80])] += 1
    return refused


def test_schemathesis_all_checks_against_a_live_service(tmp_path):
    server = start_server({**SMALL_CPU_ENV, "ISOQUANT_DIMS": "32,64", "ISOQUANT_WARM_DIMS": "64"})
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    har, ndjson = tmp_path / "run.har", tmp_path / "run.ndjson"
    try:
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
                f"{server.url}/openapi.json", "--checks", "all", "--max-examples", str(MAX_EXAMPLES),
                # One worker: with two, hypothesis's repr of a strategy parsed lambdas from two threads at once and
                # CPython 3.11.7's ast raised "SystemError: AST constructor recursion depth mismatch" (measured).
                "--workers", "1", "--seed", "20261201", "--request-timeout", "30",
                "--report", "har,ndjson", "--report-har-path", str(har), "--report-ndjson-path", str(ndjson),
            ],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        log = server.log_text()
    finally:
        stop_server(server)
    report = run.stdout[-8000:] + run.stderr[-2000:]
    assert run.returncode == 0, report  # any failed check fails the run
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = Counter(entry["response"]["status"] for entry in entries)
    print(f"schemathesis: {len(entries)} requests, statuses {dict(sorted(statuses.items()))}")
    assert len(entries) >= 500, (len(entries), report)
    assert not [s for s in statuses if s >= 500], statuses
    assert statuses[200] > 0, statuses  # the generated requests are not all refused
    # The 422 allowance covers only what the schema cannot say: anything else refused is a schema to fix.
    refused = _positive_refusals(ndjson)
    assert refused, "no schema-valid request was refused: the allowance is not needed (or nothing was recorded)"
    other = {key: n for key, n in refused.items()
             if key[1] not in INEXPRESSIBLE_TYPES and not any(text in key[2] for text in INEXPRESSIBLE)}
    assert not other, other
    assert "Traceback" not in log, log[-3000:]
