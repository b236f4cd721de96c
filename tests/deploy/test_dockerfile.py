"""The Dockerfile, parsed (no image is built here: no Docker engine): pinned bases for the gpu and cpu
targets, the project installed with its server extra, a non-root user, HEALTHCHECK on /health/ready,
the Triton cache on a volume, `python -m service` as the command; and the health check script itself,
run against a live service."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.deploy.conftest import ROOT, free_port, load_yaml

DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def stages(text: str) -> dict[str, dict]:
    """Stage name -> {'from': image, 'ins': [(INSTRUCTION, args)]}; plus the global ARG defaults."""
    result: dict[str, dict] = {}
    current = None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = {"from": match.group(1), "ins": []}
            result[match.group(2)] = current
        elif current is None:
            result.setdefault("", {"from": None, "ins": []})["ins"].append((keyword, rest))
        else:
            current["ins"].append((keyword, rest))
    return result


def env_of(stage: dict) -> dict[str, str]:
    env = {}
    for keyword, rest in stage["ins"]:
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def last(stage: dict, keyword: str) -> str:
    found = [rest for k, rest in stage["ins"] if k == keyword]
    assert found, f"no {keyword}"
    return found[-1]


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict]:
    return stages(DOCKERFILE.read_text())


def test_two_targets_on_pinned_bases_gpu_by_default(parsed):
    names = [n for n in parsed if n]
    assert names == ["cpu", "gpu"], "gpu must be the last stage: the default target"
    gpu, cpu = parsed["gpu"]["from"], parsed["cpu"]["from"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-ubuntu\d+\.\d+", gpu), gpu
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", cpu), cpu


def test_torch_builds_and_versions(parsed):
    cpu_runs = " ".join(rest for k, rest in parsed["cpu"]["ins"] if k == "RUN")
    gpu_runs = " ".join(rest for k, rest in parsed["gpu"]["ins"] if k == "RUN")
    # CPU: torch's CPU wheel index. GPU: the CUDA build, whose own requirement brings the matching Triton.
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu_runs
    assert "download.pytorch.org/whl/cpu" not in gpu_runs
    assert '"torch==${TORCH_VERSION}"' in cpu_runs and '"torch==${TORCH_VERSION}"' in gpu_runs
    assert 'pip install ".[server]"' in cpu_runs and 'pip install ".[server]"' in gpu_runs
    assert "gcc" in gpu_runs and "python3-dev" in gpu_runs, "Triton builds its launcher with a C compiler"
    # The default versions are the Makefile's pins.
    args = dict(rest.split("=", 1) for k, rest in parsed[""]["ins"] if k == "ARG")
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_SPEC ?= torch=={args['TORCH_VERSION']}" in makefile
    assert f"TRITON_SPEC ?= triton=={args['TRITON_VERSION']}" in makefile


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_runtime_contract(parsed, target):
    stage = parsed[target]
    user = last(stage, "USER").split(":")[0]
    assert user not in ("root", "0")
    useradd = re.search(rf"useradd .*--uid (\d+) .*\b{user}\b", " ".join(r for k, r in stage["ins"] if k == "RUN"))
    assert useradd and int(useradd[1]) >= 1000
    # USER comes after everything that needs root.
    order = [k for k, _ in stage["ins"]]
    assert order.index("USER") > max(i for i, k in enumerate(order) if k == "RUN")

    healthcheck = last(stage, "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD")
    assert re.search(r"--start-period=(\d+)s", options) and int(re.search(r"--start-period=(\d+)s", options)[1]) >= 120
    assert json.loads(command) == ["python", "/opt/isoquant/healthcheck.py"]
    assert json.loads(last(stage, "CMD")) == ["python", "-m", "service", "--host", "0.0.0.0"]
    assert last(stage, "EXPOSE") == "8000"

    env = env_of(stage)
    cache = env["ISOQUANT_TRITON_CACHE_DIR"]
    assert env["TRITON_CACHE_DIR"] == cache
    assert json.loads(last(stage, "VOLUME")) == [cache]
    assert env["ISOQUANT_DEVICE"] == ("cuda" if target == "gpu" else "cpu")
    # The cache directory belongs to the user before the volume is declared (a new volume copies it).
    runs = " ".join(r for k, r in stage["ins"] if k == "RUN")
    assert f"mkdir -p {cache}" in runs and "chown -R isoquant:isoquant" in runs
    # The compose file mounts its named volume at that same path.
    compose = load_yaml(ROOT / "docker-compose.yml")
    assert f"triton-cache:{cache}" in compose["services"]["isoquant"]["volumes"]


def test_dockerignore_keeps_what_the_build_copies():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = {rest.split()[0] for k, rest in instructions(DOCKERFILE.read_text()) if k == "COPY"}
    assert copied == {"pyproject.toml", "kernels", "service", "clients", "isoquant_format", "deploy/healthcheck.py"}
    for path in copied | {"README.md"}:  # README.md: pyproject's readme
        assert path not in ignored and path.split("/")[0] not in ignored, path
        assert (ROOT / path).exists(), path
    assert {".git", ".venv", "tests"} <= ignored


def test_healthcheck_script_against_a_live_service(live_service):
    script = str(ROOT / "deploy" / "healthcheck.py")
    ok = subprocess.run(
        [sys.executable, script, f"{live_service.url}/health/ready"], capture_output=True, text=True, timeout=30
    )
    assert ok.returncode == 0, ok.stderr
    # Default URL from ISOQUANT_PORT, as in the container.
    env = {"ISOQUANT_PORT": str(live_service.port), "PATH": "/usr/bin:/bin"}
    assert subprocess.run([sys.executable, script], env=env, capture_output=True, timeout=30).returncode == 0
    # A 404 (wrong route) and a closed port are failures, with the reason on stderr.
    bad = subprocess.run(
        [sys.executable, script, f"{live_service.url}/health/nope"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 1 and "HTTP 404" in bad.stderr
    closed = subprocess.run(
        [sys.executable, script, f"http://127.0.0.1:{free_port()}/health/ready"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert closed.returncode == 1 and "not ready" in closed.stderr


def test_healthcheck_script_fails_on_503_with_the_reason():
    import http.server
    import threading

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"error": {"type": "not_ready", "message": "warming up: 1 of 9 quantizers built and run"}}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/health/ready"
        result = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "healthcheck.py"), url], capture_output=True, text=True, timeout=30
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1
    assert "HTTP 503" in result.stderr and "warming up: 1 of 9" in result.stderr


def test_the_image_build_context_installs_a_working_service(tmp_path):
    """What the image's `pip install ".[server]"` does, without Docker: copy only what the Dockerfile
    COPYs, install it (no deps: they are this venv's) into a fresh directory, and run the installed
    package from outside the source tree, as the image does from /home/isoquant."""
    context = tmp_path / "src"
    context.mkdir()
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword != "COPY":
            continue
        *sources, _ = rest.split()
        for source in sources:
            if source.startswith("deploy/") or (context / source).exists():
                continue  # deploy/: copied beside the install; both stages copy the same sources
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, context / source)
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    check = (
        "import service, kernels, torch\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        "from kernels import Quantizer\n"
        f"assert service.__file__.startswith({str(target)!r}), service.__file__\n"
        "create_app(Settings(warm_variants=[]))\n"
        "q = Quantizer('full', 64, 3, device='cpu')\n"
        "x = torch.randn(8, 64)\n"
        "assert q.dequantize(q.quantize(x)).shape == (8, 64)\n"
        "print('ok', q.fingerprint)\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
    env["PYTHONPATH"] = str(target)
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=home, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("ok "), result.stdout + result.stderr
    flags = subprocess.run(
        [sys.executable, "-m", "service", "--help"], cwd=home, env=env, capture_output=True, text=True, timeout=120
    )
    assert flags.returncode == 0 and "--host" in flags.stdout, flags.stderr
