"""Every code block of README.md and docs/*.md (docs/archive excepted) runs as written.

- ```python blocks run in a fresh interpreter of the project's environment; ```bash and ```sh blocks in bash
  (``-e -o pipefail``: a command that fails fails the block), with that environment's bin folder first on
  PATH (``python``, ``isoquant``) and a ``.venv`` link to it in the working folder, as a reader who ran
  ``make setup`` and ``. .venv/bin/activate`` in a clone has them. A live ``python -m service`` answers on the
  documented port, 8000 (when another program holds 8000, a free port is substituted in the blocks' text and
  in ISOQUANT_URL, and the test says so). The blocks of one document share a working folder and run in their
  order, as a reader follows the page: a block may read what an earlier one wrote.
- ```json and ```yaml blocks must parse; ```text (output samples, pseudo-code) and ```promql (queries for a
  Prometheus server) are shown, not run. A block without a language fails: say what it is.
- A block that cannot run here (Docker, a GPU, a model download, a server that never returns) carries
  ``<!-- snippet: skip (the reason) -->`` on the line before it; each is listed as a skipped test with its
  reason, and a marker without a reason, or not followed by a runnable block, fails.

A block fails when its command fails or when it prints a service error body (``{"error": {...``: ``curl -s``
prints those with exit status 0).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # not docs/archive: the record of old runs
EXECUTED = {"python", "bash", "sh"}
PARSED = {"json", "yaml"}
SHOWN = {"text", "promql"}
DOC_PORT = 8000  # every page says localhost:8000 / 127.0.0.1:8000, the service's default
SKIP = re.compile(r"<!--\s*snippet:\s*skip\s*(?:\((?P<reason>.*)\))?\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
ERROR_BODY = re.compile(r'\{\s*"error"\s*:\s*\{')
BLOCK_TIMEOUT_S = 180


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None  # the marker's reason ("" for a marker without one), None without a marker

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a markdown file, each with the skip marker on the line before it, if any."""
    lines = doc.read_text().splitlines()
    found: list[Block] = []
    previous = ""
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence, start = match["fence"], i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        marker = SKIP.fullmatch(previous)
        skip = (marker["reason"] or "").strip() if marker else None
        language = match["info"].strip().split()[0].lower() if match["info"].strip() else ""
        found.append(Block(doc, start + 1, language, textwrap.dedent("\n".join(body)) + "\n", skip))
        previous = ""
        i += 1
    return found


ALL = [b for doc in DOCS for b in blocks(doc)]
SKIPPED = [b for b in ALL if b.skip is not None]
RUNNABLE_DOCS = [doc for doc in DOCS if any(b.language in EXECUTED and b.skip is None for b in blocks(doc))]


def test_every_block_says_what_it_is():
    problems = []
    for b in ALL:
        if b.language not in EXECUTED | PARSED | SHOWN:
            problems.append(f"{b.id}: language {b.language or '(none)'!r}; use one of "
                            f"{sorted(EXECUTED | PARSED | SHOWN)} (text for output samples)")
        if b.skip is not None and b.language not in EXECUTED:
            problems.append(f"{b.id}: a skip marker on a {b.language!r} block, which is not run anyway")
    assert not problems, "\n".join(problems)


def test_every_skip_marker_sits_on_a_block():
    problems = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        for n, line in enumerate(lines):
            if "snippet:" in line and SKIP.search(line):
                following = next((x for x in lines[n + 1:] if x.strip()), "")
                if not FENCE.match(following):
                    problems.append(f"{doc.relative_to(REPO)}:{n + 1}: a skip marker not followed by a block")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", SKIPPED, ids=[b.id for b in SKIPPED])
def test_skipped_blocks_say_why(block):
    """One line per block that is not run, with its reason (pytest -rs lists them)."""
    assert len(block.skip.split()) >= 3, f"{block.id}: the skip marker must give a reason: (why it cannot run)"
    pytest.skip(f"{block.id}: {block.skip}")


@pytest.mark.parametrize("block", [b for b in ALL if b.language in PARSED], ids=lambda b: b.id)
def test_data_blocks_parse(block):
    if block.language == "json":
        json.loads(block.code)
    else:
        list(yaml.safe_load_all(block.code))


# ------------------------------------------------------------------------------------------------
# Running the blocks against a live service


@dataclass
class DocService:
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def substituted(self) -> bool:
        return self.port != DOC_PORT


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_service():
    """``python -m service`` on port 8000 (the documented one) with its defaults, on the CPU, with a one-quantizer
    warm set so that it starts in seconds (everything else the pages use is built on first use, as it would be)."""
    port = DOC_PORT if _port_free(DOC_PORT) else _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
    env.update(ISOQUANT_DEVICE="cpu", ISOQUANT_WARM_VARIANTS="full", ISOQUANT_WARM_DIMS="128", ISOQUANT_WARM_BITS="3",
               ISOQUANT_WARM_DTYPES="float32", ISOQUANT_LOG_LEVEL="warning", PYTHONPATH=str(REPO))
    log = Path(tempfile.mkstemp(prefix="isoquant-docs-", suffix=".log")[1])
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    service = DocService(port, process, log)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the service was not ready after 120 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    yield service
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    log.unlink(missing_ok=True)


def _environment(service: DocService, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = sys.prefix
    env["PYTHONPATH"] = str(REPO)  # what make setup's editable install gives, also where the project is not installed
    if service.substituted:
        env["ISOQUANT_URL"] = f"http://127.0.0.1:{service.port}"
    venv = workdir / ".venv"
    if not venv.exists():  # `. .venv/bin/activate` as in a clone
        venv.symlink_to(sys.prefix, target_is_directory=True)
    return env


def _run(block: Block, service: DocService, workdir: Path, scripts: Path) -> str | None:
    """Run one block; None if it passed, else what went wrong with the tail of its output."""
    code = block.code
    if service.substituted:
        code = re.sub(r"(localhost|127\.0\.0\.1):8000\b", rf"\g<1>:{service.port}", code)
    suffix = ".py" if block.language == "python" else ".sh"
    script = scripts / f"{block.doc.stem}_{block.line}{suffix}"
    script.write_text(code)
    command = [sys.executable, str(script)] if block.language == "python" else ["bash", "-e", "-o", "pipefail",
                                                                                str(script)]
    try:
        done = subprocess.run(command, cwd=workdir, env=_environment(service, workdir), capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{block.id}: still running after {BLOCK_TIMEOUT_S} s"
    output = done.stdout + done.stderr
    if done.returncode != 0:
        return f"{block.id}: exit status {done.returncode}\n{textwrap.indent(output[-2500:], '    ')}"
    if ERROR_BODY.search(output):
        return f"{block.id}: printed a service error body\n{textwrap.indent(output[-2500:], '    ')}"
    return None


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("curl") is None, reason="needs bash and curl")
@pytest.mark.parametrize("doc", RUNNABLE_DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_snippets_run_as_written(doc, live_service, tmp_path):
    workdir, scripts = tmp_path / "work", tmp_path / "scripts"
    workdir.mkdir()
    scripts.mkdir()
    runnable = [b for b in blocks(doc) if b.language in EXECUTED and b.skip is None]
    failures = [f for f in (_run(b, live_service, workdir, scripts) for b in runnable) if f is not None]
    note = (f" (port 8000 was taken: the blocks ran against port {live_service.port})"
            if live_service.substituted else "")
    assert not failures, f"{len(failures)} of {len(runnable)} blocks of {doc.name} failed as written{note}:\n" + \
        "\n".join(failures)
