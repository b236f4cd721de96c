"""README.md: the quick start's two commands first, the compose commands, a configuration table that
is exactly service/settings.py, a metrics list that is exactly what the service exports, the links,
and curl examples that work against a live service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic_core import PydanticUndefined
from safetensors.numpy import load_file

from service.settings import Settings
from tests.deploy.conftest import ROOT, exported_families, exposition_names, parse_markdown_table, query_names

README = ROOT / "README.md"


def sections() -> dict[str, str]:
    """'## Title' -> its text (up to the next '## ')."""
    text = README.read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def code_blocks(text: str, language: str = "bash") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_quick_start_comes_first_with_the_two_make_commands():
    names = list(sections())
    assert names[0] == "Quick start"
    first = code_blocks(sections()["Quick start"])[0]
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make serve", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    # Then the compose command for GPU hosts, and the CPU variant, as the compose files themselves say.
    quick = sections()["Quick start"]
    assert "docker compose up -d --build" in code_blocks(quick)[1]
    cpu = "docker compose -f docker-compose.yml -f docker-compose.cpu.yml up -d --build"
    assert cpu in quick and cpu in (ROOT / "docker-compose.cpu.yml").read_text()
    assert "docker compose up -d --build" in (ROOT / "docker-compose.yml").read_text()


def test_library_section_is_kept():
    assert "from kernels import Quantizer" in sections()["The library"]


def _default_text(value: object) -> str:
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def test_configuration_table_is_exactly_the_settings():
    rows = parse_markdown_table(sections()["Configuration"])
    table = {}
    for cells in rows:
        match = re.fullmatch(r"`(ISOQUANT_[A-Z0-9_]+)`", cells[0])
        assert match, f"not a variable: {cells[0]}"
        assert match[1] not in table, f"{match[1]} listed twice"
        table[match[1]] = cells
    fields = {f"ISOQUANT_{name.upper()}": field for name, field in Settings.model_fields.items()}
    assert set(table) == set(fields), (
        f"missing: {sorted(set(fields) - set(table))}; not settings: {sorted(set(table) - set(fields))}"
    )
    for variable, field in fields.items():
        default = table[variable][1].strip("`")
        assert default == _default_text(field.default), (
            f"{variable}: README says {default!r}, settings.py {field.default!r}"
        )
        assert table[variable][2], f"{variable} has no explanation"


def _metrics_rows() -> dict[str, list[str]]:
    rows = {}
    for cells in parse_markdown_table(sections()["Metrics"]):
        match = re.fullmatch(r"`([a-z_:]+)`", cells[0])
        assert match, cells[0]
        rows[match[1]] = cells
    return rows


def test_metrics_list_is_exactly_what_the_service_exports(live_metrics):
    families = exported_families()
    live = exposition_names(live_metrics)
    text = sections()["Metrics"]
    rows = _metrics_rows()
    documented = set(re.findall(r"`([a-z][a-z0-9_]*)`", text))
    for name, (kind, labels) in families.items():
        (query_name, *_) = sorted(query_names(name, kind)) if kind != "histogram" else [name]
        # Counters are listed as queried (name_total), histograms and gauges by their family name.
        assert query_name in documented, f"{query_name} ({kind}) is exported but not in the README"
        shown = f"{name}_total" if kind == "counter" else name
        assert shown in live or f"{name}_bucket" in live, f"{shown} not in a live /metrics"
        if name.startswith("isoquant_"):
            cells = rows[query_name]
            assert cells[1] == kind, f"{query_name}: README says {cells[1]}, exported as {kind}"
            assert set(re.findall(r"`(\w+)`", cells[2])) == set(labels), f"{query_name} labels"
    exported = {q if k != "histogram" else n for n, (k, _) in families.items() for q in query_names(n, k)}
    stale = {name for name in rows if name not in exported}
    assert not stale, f"README lists metrics the service does not export: {sorted(stale)}"


def test_documentation_links():
    text = README.read_text()
    for doc in ("docs/FORMAT.md", "docs/BENCHMARKS.md", "docs/EVALUATION.md", "docs/OPERATIONS.md", "docs/CLIENTS.md"):
        assert f"]({doc})" in text, f"README does not link {doc}"
    # The links that exist must resolve (the teammates' docs are linked ahead of landing).
    for target in re.findall(r"\]\((docs/[^)#]+)\)", text):
        if target in ("docs/FORMAT.md", "docs/BENCHMARKS.md"):
            assert (ROOT / target).exists(), target


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_examples_work_against_a_live_service(live_service, tmp_path):
    blocks = code_blocks(sections()["Using the service"])
    assert len(blocks) == 2, "a JSON example and a safetensors example"
    assert all("curl" in b and "/quantize" in b and "/dequantize" in b for b in blocks)
    host = live_service.url.removeprefix("http://")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    for block in blocks:
        assert "http://localhost:8000/" in block
        script = "set -euo pipefail\n" + block.replace("localhost:8000", host)
        result = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{block}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    codes = json.loads((tmp_path / "codes.json").read_text())
    assert codes["quantizer"]["variant"] == "full" and codes["quantizer"]["bits"] == 3
    assert codes["shape"] == [4, 64] and 0 < codes["distortion"]["mean_relative_error"] < 0.5
    vectors = json.loads((tmp_path / "vectors.json").read_text())["vectors"]
    assert vectors["shape"] == [4, 64]
    x = load_file(str(tmp_path / "vectors.safetensors"))["vectors"]
    y = load_file(str(tmp_path / "vectors_hat.safetensors"))["vectors"]
    assert x.shape == y.shape == (1000, 128)
    # 3-bit full IsoQuant on Gaussian vectors: relative squared error near the Lloyd-Max 0.034.
    error = float(((x.astype(np.float32) - y) ** 2).sum() / (x.astype(np.float32) ** 2).sum())
    assert 0.02 < error < 0.05, error
