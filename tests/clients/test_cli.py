"""The ``isoquant`` command on files against a real service: quantize/dequantize round trips, info,
exit codes with one-line messages, and ``bench`` on a bounded load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from clients import IsoQuantClient, PackedCodes
from clients.cli import main
from tests.clients.conftest import API_KEY, REPO

SCRIPT = Path(sys.executable).with_name("isoquant")


@pytest.fixture
def env(server, monkeypatch):
    """The server's address and key from the environment, as a user would set them."""
    monkeypatch.setenv("ISOQUANT_URL", server.url)
    monkeypatch.setenv("ISOQUANT_API_KEY", API_KEY)
    return server


@pytest.fixture
def x(tmp_path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(5).standard_normal((4, 30, 64)).astype(np.float16))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_dequantize_files(env, x, tmp_path, capsys):
    codes, out_path = tmp_path / "codes.safetensors", tmp_path / "out.npy"
    code, out, err = run(capsys, "quantize", str(x), "-o", str(codes), "--variant", "fast", "--bits", "4", "--seed",
                         "17")
    assert (code, err) == (0, "")
    assert out.startswith("quantized 120 vectors of dim 64 (float16, shape [4, 30, 64]) with fast/4 bits, seed 17")
    packed = PackedCodes.load(codes)
    vectors = np.load(x)
    with IsoQuantClient(env.url, api_key=API_KEY) as client:
        direct = client.quantize(vectors, variant="fast", bits=4, seed=17)
        x_hat, stats = client.dequantize(direct, reference=vectors)
    np.testing.assert_array_equal(packed.codes, direct.codes)
    assert packed.descriptor() == direct.descriptor() and packed.bytes_in == vectors.nbytes

    code, out, err = run(capsys, "dequantize", str(codes), "-o", str(out_path), "--reference", str(x))
    assert (code, err) == (0, "")
    np.testing.assert_array_equal(np.load(out_path, allow_pickle=False), x_hat)
    lines = dict(line.rsplit(None, 1) for line in out.splitlines()[1:])
    assert float(lines["mse"]) == pytest.approx(stats.mse, rel=1e-5)
    assert float(lines["mean relative error"]) == pytest.approx(stats.mean_relative_error, rel=1e-5)
    assert float(lines["max relative error"]) == pytest.approx(stats.max_relative_error, rel=1e-5)


def test_safetensors_in_and_out(env, tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    data = np.random.default_rng(6).standard_normal((10, 128)).astype(np.float32)
    save_file({"emb": data, "ids": np.arange(10, dtype=np.int64)}, str(src))
    codes, out_path = tmp_path / "c.safetensors", tmp_path / "out.safetensors"
    code, _, err = run(capsys, "quantize", str(src), "-o", str(codes))
    assert code == 2 and "name one with --tensor" in err and err.count("\n") == 1
    code, _, err = run(capsys, "quantize", str(src), "--tensor", "emb", "-o", str(codes), "--format", "json")
    assert (code, err) == (0, "")
    code, out, _ = run(capsys, "dequantize", str(codes), "-o", str(out_path), "--dtype", "float16")
    assert code == 0 and "mse" not in out
    from safetensors.numpy import load_file

    rebuilt = load_file(str(out_path))["vectors"]
    assert rebuilt.shape == (10, 128) and rebuilt.dtype == np.float16
    relative = np.linalg.norm(rebuilt.astype(np.float32) - data, axis=-1) / np.linalg.norm(data, axis=-1)
    assert relative.max() < 0.3


def test_info(env, capsys):
    code, out, _ = run(capsys, "info")
    info = json.loads(out)
    assert code == 0 and info["limits"]["max_vectors"] == 65536 and info["ready"] is True


def test_exit_codes_and_one_line_messages(env, x, tmp_path, capsys, monkeypatch):
    codes = tmp_path / "c.safetensors"
    code, out, err = run(capsys, "quantize", str(x), "-o", str(codes), "--bits", "9")
    assert code == 1 and out == "" and not codes.exists()
    assert err == ("isoquant: error: HTTP 422 unsupported_value (field bits): bits 9 is not served; "
                   "allowed: 1, 2, 3, 4, 5, 6, 7, 8\n")

    code, _, err = run(capsys, "quantize", str(x), "-o", str(codes), "--url", "http://127.0.0.1:9")
    assert code == 3 and err.startswith("isoquant: error: cannot reach the server") and err.count("\n") == 1

    code, _, err = run(capsys, "--api-key", "wrong", "info")
    assert code == 1 and "HTTP 401 unauthorized (field authorization): invalid API key" in err

    code, _, err = run(capsys, "quantize", str(tmp_path / "missing.npy"), "-o", str(codes))
    assert code == 2 and "No such file" in err

    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, _, err = run(capsys, "quantize", str(pickled), "-o", str(codes))
    assert code == 2 and "without pickle" in err and err.count("\n") == 1

    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    code, _, err = run(capsys, "dequantize", str(tmp_path / "junk.safetensors"))
    assert code == 2 and "junk.safetensors" in err

    code, _, err = run(capsys, "quantize", str(x))
    assert code == 2 and "-o/--output" in err and err.count("\n") == 1


def test_console_script_and_module(env, x, tmp_path):
    """The installed ``isoquant`` script and ``python -m clients`` run as separate processes."""
    environ = {**os.environ, "PYTHONPATH": str(REPO)}
    if SCRIPT.exists():  # pip install -e . made it
        done = subprocess.run([str(SCRIPT), "quantize", str(x), "-o", str(tmp_path / "c.safetensors")],
                              env=environ, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "clients", "dequantize", str(tmp_path / "c.safetensors"), "-o",
                           str(tmp_path / "o.npy")] if SCRIPT.exists() else [sys.executable, "-m", "clients", "info"],
                          env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "clients", "info", "--url", "http://127.0.0.1:9"], env=environ,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stderr.count("\n") == 1


def test_bench_bounded_by_requests(env, capsys):
    code, out, err = run(capsys, "bench", "-n", "24", "-c", "3", "--batch", "64", "--dim", "64", "--json",
                         "--progress")
    assert code == 0
    report = json.loads(out)
    assert (report["requests"], report["ok"], report["failed"], report["by_status"]) == (24, 24, 0, {"200": 24})
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] and lat["mean"] > 0
    assert report["requests_per_s"] == pytest.approx(24 / report["elapsed_s"])
    assert report["vectors_per_s"] == pytest.approx(report["requests_per_s"] * 64)
    assert report["mb_per_s"] == pytest.approx(report["vectors_per_s"] * 64 * 4 / 1e6)
    assert report["upload_mb_per_s"] > report["mb_per_s"] > report["download_mb_per_s"] > 0
    # mean latency is bounded by the wall time a worker spent on its share of the requests
    assert lat["mean"] / 1000 <= report["elapsed_s"] * 3 / 24 * 1.01
    assert "100.0% 24/24 req" in err and err.endswith("\n")


def test_bench_bounded_by_duration_text_report(env, capsys):
    code, out, err = run(capsys, "bench", "--duration", "1.5", "-c", "2", "--batch", "32", "--dim", "64",
                         "--op", "dequantize", "--no-progress")
    assert code == 0 and err == ""
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["requests"].split(" in ")[0].split()[-1].isdigit()
    elapsed = float(lines["requests"].split(" in ")[1].split()[0])
    assert 1.4 < elapsed < 5.0
    assert "failed" in lines["requests"] and "p99" in lines["latency"] and "vectors/s" in lines["throughput"]


def test_bench_counts_429_by_status(busy_server, capsys):
    code, out, err = run(capsys, "bench", "--url", busy_server.url, "-n", "30", "-c", "6", "--batch", "1024",
                         "--dim", "64", "--json")
    report = json.loads(out)
    assert code == 1 and report["requests"] == 30
    assert report["by_status"].get("429", 0) >= 1 and sum(report["by_status"].values()) == 30
    assert report["ok"] == report["by_status"].get("200", 0) and report["failed"] == 30 - report["ok"]
    assert err.startswith(f"isoquant: error: {report['failed']} of 30 requests failed")
