"""The ``isoquant`` command on files against a real service: quantize/dequantize round trips, info,
exit codes with one-line messages, and ``bench`` on a bounded load."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
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
    assert code == 1 and err == ("isoquant: error: HTTP 401 unauthorized (field authorization): invalid API key "
                                 "(give the server's key with --api-key or $ISOQUANT_API_KEY)\n")

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
    # the rate over the last second beside the average, not the average alone
    assert re.search(r"ok 24  failed 0  now [\d,.]+ req/s  avg [\d,.]+ req/s", err), err


def test_bench_bounded_by_duration_text_report(env, capsys):
    code, out, err = run(capsys, "bench", "--duration", "1.5", "-c", "2", "--batch", "32", "--dim", "64",
                         "--op", "dequantize", "--no-progress")
    assert code == 0 and err == ""
    lines = {line.split()[0]: line for line in out.splitlines()}
    names = [line.split()[0] for line in out.splitlines()]
    # The failure share comes first, before any rate; then why the run stopped.
    assert names[2:5] == ["failed", "stopped", "by"] and names.index("failed") < names.index("throughput")
    assert lines["failed"].startswith("failed       0.0% (0 of ")
    assert lines["stopped"] == f"stopped      after 1.5 s (--duration), {lines['failed'].split('of ')[1].split()[0]} " \
                               "requests sent"
    elapsed = float(lines["throughput"].split(" over ")[1].split()[0])
    assert 1.4 < elapsed < 5.0
    assert all(f"{p} " in lines["latency"] for p in ("p50", "p90", "p95", "p99", "p99.9"))
    assert "successful requests/s" in lines["throughput"] and "vectors/s" in lines["throughput"]


def test_bench_counts_429_by_status(busy_server, capsys):
    code, out, err = run(capsys, "bench", "--url", busy_server.url, "-n", "30", "-c", "6", "--batch", "1024",
                         "--dim", "64", "--json")
    report = json.loads(out)
    assert code == 1 and report["requests"] == 30
    assert report["by_status"].get("429", 0) >= 1 and sum(report["by_status"].values()) == 30
    assert report["ok"] == report["by_status"].get("200", 0) and report["failed"] == 30 - report["ok"]
    assert err.startswith(f"isoquant: error: {report['failed']} of 30 requests failed")


# ------------------------------------------------------------------------------------------------
# Issue 17: a 768-dim float16 file end to end, quality at a glance, wrong files and outputs, bench's truth


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and err == "" and re.fullmatch(r"isoquant \d+\.\d+\.\d+\S* \(code format 1\)\n", out), out


def test_a_768_dim_float16_file_round_trip_without_flags(env, tmp_path, capsys):
    """The README's first hour: compress a 768-dim float16 embedding file, inspect it, decompress it back to
    float16, with no flag but -o."""
    emb, codes, back = tmp_path / "emb.npy", tmp_path / "emb.codes.safetensors", tmp_path / "emb_hat.npy"
    x = np.random.default_rng(3).standard_normal((200, 768)).astype(np.float16)
    np.save(emb, x)
    code, out, err = run(capsys, "quantize", str(emb), "-o", str(codes), "--distortion")
    assert (code, err) == (0, "")
    first, *quality = out.splitlines()
    # 768 coordinates at 3 bits = 288 bytes + a 4-byte norm a vector, against 1,536 bytes of float16
    assert first.startswith("quantized 200 vectors of dim 768 (float16, shape [200, 768]) with full/3 bits, seed 0")
    assert "58,400 bytes of codes and norms, ratio 5.26 against the float16 input (307,200 bytes)" in first
    stats = {name.strip(): float(value) for name, value in (line.rsplit(None, 1) for line in quality)}
    assert set(stats) == {"mse", "mean relative error", "max relative error", "mean cosine similarity",
                          "min cosine similarity"}
    assert 0.97 < stats["min cosine similarity"] <= stats["mean cosine similarity"] < 0.99  # 3 bits: ~0.983
    assert 0.15 < stats["mean relative error"] <= stats["max relative error"] < 0.3

    code, out, err = run(capsys, "inspect", str(codes))
    assert (code, err) == (0, "")
    fields = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()}
    packed = PackedCodes.load(codes)
    assert (fields["variant"], fields["dim"], fields["bits"], fields["seed"]) == ("full", "768", "3", "0")
    assert fields["fingerprint"] == packed.fingerprint and fields["vectors"] == "200 (shape [200, 768])"
    assert fields["dtype"] == "float16 (isoquant dequantize restores it)"
    assert fields["bytes"].startswith("58,400 of codes and norms (288 + 4 a vector; the file ")
    assert fields["bytes"].endswith("ratio 5.26 against 307,200 bytes of input")
    assert f"cosine similarity {stats['mean cosine similarity']:.4f}" in fields["quality"]

    code, out, err = run(capsys, "dequantize", str(codes), "-o", str(back))
    assert (code, err) == (0, "")
    assert "(float16, as the codes record; shape [200, 768])" in out
    y = np.load(back)
    assert y.dtype == np.float16 and y.shape == (200, 768)
    with IsoQuantClient(env.url, api_key=API_KEY) as client:
        np.testing.assert_array_equal(y, client.dequantize(packed, dtype="float16"))
    code, _, _ = run(capsys, "dequantize", str(codes), "-o", str(back), "--dtype", "float32")
    assert code == 0 and np.load(back).dtype == np.float32  # an explicit dtype still overrides


def test_inspect_json_and_a_vectors_file(env, x, tmp_path, capsys):
    codes = tmp_path / "c.safetensors"
    assert run(capsys, "quantize", str(x), "-o", str(codes))[0] == 0
    code, out, _ = run(capsys, "inspect", str(codes), "--json")
    d = json.loads(out)
    assert code == 0 and d["kind"] == "codes" and d["shape"] == [4, 30, 64] and d["vectors"] == 120
    assert (d["dtype"], d["bytes_in"], d["bytes"]) == ("float16", 120 * 64 * 2, 120 * (24 + 4))
    assert d["distortion"] is None and d["file_bytes"] == codes.stat().st_size
    code, out, _ = run(capsys, "inspect", str(x))
    assert code == 0 and out == (f"{x}: vectors, not codes: float16 [4, 30, 64], 15,360 bytes; compress them with "
                                 f"isoquant quantize {x} -o CODES.safetensors\n")
    code, _, err = run(capsys, "inspect", str(tmp_path / "none.safetensors"))
    assert code == 2 and "No such file" in err


def _vectors_counted(server) -> float:
    total = 0.0
    for line in server.metrics_text().splitlines():
        if line.startswith("isoquant_vectors_total{"):
            total += float(line.rsplit(None, 1)[1])
    return total


def test_wrong_files_and_outputs_are_refused_before_the_server_works(env, x, tmp_path, capsys):
    codes = tmp_path / "c.safetensors"
    assert run(capsys, "quantize", str(x), "-o", str(codes))[0] == 0
    vectors_file = tmp_path / "v.safetensors"
    save_file({"vectors": np.load(x)}, str(vectors_file))
    before = _vectors_counted(env)
    cases = [
        (("quantize", str(x), "-o", str(tmp_path / "out.npy")),
         "out.npy: codes are written as a safetensors container; name the output *.safetensors"),
        (("quantize", str(x), "-o", str(tmp_path / "missing" / "c.safetensors")),
         f"the folder {tmp_path / 'missing'} does not exist"),
        (("dequantize", str(x)), "is a .npy array (vectors), not codes: quantize it with `isoquant quantize` first"),
        (("dequantize", str(vectors_file)),
         "is a vectors file (tensor 'vectors' float16 [4, 30, 64]), not codes: quantize it with `isoquant quantize`"),
        (("dequantize", str(codes), "-o", str(tmp_path / "missing" / "o.npy")), "does not exist"),
        (("dequantize", str(codes), "-o", str(tmp_path / "o.txt")), "o.txt: unknown file type; use .npy or"),
    ]
    for argv, fragment in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and fragment in err and err.count("\n") == 1, (argv, err)
    assert _vectors_counted(env) == before  # no request did any work
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "missing").exists()


def test_float64_and_int8_ratios_are_against_the_file(env, tmp_path, capsys):
    wide = tmp_path / "f64.npy"
    np.save(wide, np.random.default_rng(1).standard_normal((10, 64)))
    code, out, _ = run(capsys, "quantize", str(wide), "-o", str(tmp_path / "c.safetensors"))
    # 10 x 64 x 8 bytes against 10 x (24 + 4): 18.29; as the float32 that was sent: 9.14
    assert code == 0 and "ratio 18.29 against the float64 input (5,120 bytes); it was sent as float32 (ratio 9.14 " \
        "against that)" in out
    small = tmp_path / "i8.npy"
    np.save(small, np.ones((10, 64), np.int8))
    code, out, _ = run(capsys, "quantize", str(small), "-o", str(tmp_path / "c.safetensors"))
    assert code == 0 and "ratio 2.29 against the int8 input (640 bytes)" in out


def test_bench_help_documents_every_option(capsys):
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0
    for option, default in (("--op", "default quantize"), ("--variant", "default full"), ("--bits", "default 3"),
                            ("--dim", "default 128"), ("--dtype", "default float32"), ("--rate", "fixed-rate"),
                            ("--max-connection-failures", "default 10"), ("--concurrency", "default 4")):
        assert option in out and default in " ".join(out.split()), option
    assert "--retries" not in out  # bench never retries: the option is not offered
    code, out, _ = run(capsys, "quantize", "--help")
    assert code == 0 and "embeddings" in out and "KV caches" in out and "kv-3.5" in out and "--distortion" in out


def test_bench_fixed_rate(env, capsys):
    code, out, err = run(capsys, "bench", "--rate", "40", "-d", "1.5", "--batch", "16", "--dim", "64", "--json")
    report = json.loads(out)
    assert code == 0 and err == ""
    assert report["mode"] == "rate" and report["config"]["rate"] == 40 and report["config"]["concurrency"] == 64
    assert report["stopped_by"] == "duration" and 55 <= report["requests"] <= 61  # 40/s for 1.5 s: 60 scheduled
    assert report["ok"] == report["requests"] and 0 <= report["delayed"] <= report["requests"]
    assert set(report["latency_ms"]) == {"p50", "p90", "p95", "p99", "p99.9", "mean", "max"}
    assert report["config"]["api_key"] == "<redacted>"  # a key was used: never shown, never null


@pytest.mark.integration  # starts its own service process
def test_bench_stops_soon_after_the_server_stops(tmp_path):
    """Stopping the server mid-run: the bench ends within 5 s, leads with the failure share, counts only
    successes in its throughput, and exits 3 (unreachable)."""
    from tests.clients.conftest import start_server, stop_server

    server = start_server()
    try:
        bench = subprocess.Popen(
            [sys.executable, "-m", "clients", "bench", "--url", server.url, "-d", "60", "-c", "4", "--batch", "64",
             "--dim", "64", "--json", "--no-progress"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while _vectors_counted(server) < 64 * 20:  # the run is under way
            assert time.monotonic() < deadline and bench.poll() is None
            time.sleep(0.2)
        server.process.terminate()
        stopped = time.monotonic()
        out, err = bench.communicate(timeout=30)
        took = time.monotonic() - stopped
    finally:
        stop_server(server)
    assert took < 5.0, took
    report = json.loads(out)
    assert bench.returncode == 3 and err.startswith("isoquant: error: the server stopped answering")
    assert report["stopped_by"] == "connection_failures" and report["failed"] >= 10
    assert report["failed_share"] == pytest.approx(report["failed"] / report["requests"])
    assert report["ok"] >= 20 and report["requests_per_s"] == pytest.approx(report["ok"] / report["elapsed_s"])
    assert report["elapsed_s"] < 60 and sum(report["by_status"].values()) == report["requests"]


def test_bfloat16_codes_decode_to_float32_and_say_why(env, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    with IsoQuantClient(env.url, api_key=API_KEY) as client:
        packed = client.quantize(torch.randn(5, 64, dtype=torch.bfloat16))
    codes = tmp_path / "bf16.safetensors"
    packed.save(codes)
    code, out, _ = run(capsys, "dequantize", str(codes), "-o", str(tmp_path / "o.npy"))
    assert code == 0 and "(float32: the codes record bfloat16, which numpy cannot hold; shape [5, 64])" in out
    assert np.load(tmp_path / "o.npy").dtype == np.float32
