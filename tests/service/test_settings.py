"""Settings: one class, every field from ISOQUANT_* variables, lists as commas or JSON, bad values refused
with a message that names the allowed ones."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings, auto_torch_threads, ranges_text, usable_cores


def test_defaults_cover_the_issue_warm_set(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("ISOQUANT_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.device == "auto" and s.default_seed == 0 and s.api_key is None
    assert s.warm_variants == ["full", "fast", "2d"] and s.warm_dims == [64, 128, 256] and s.warm_bits == [2, 3, 4]
    assert s.warm_dtypes == ["float16", "bfloat16", "float32"]
    assert len(s.warm_set()) == 27 and ("dense", 128, 3) not in s.warm_set()
    assert s.max_request_bytes == 64 << 20 and s.max_vectors == 65536 and s.max_queue == 64
    # Every dim the library supports is served (768-dim embeddings among them), written as one range.
    assert s.dims == list(range(2, 4097)) and s.dims_text() == "2-4096"
    assert all(s.serves_dim(d) for d in (2, 384, 768, 1536, 4096)) and not any(map(s.serves_dim, (0, 1, 4097)))
    assert s.torch_threads is None and s.quantizer_cache_size == 64


def test_dims_take_values_and_ranges(monkeypatch):
    monkeypatch.setenv("ISOQUANT_DIMS", "64, 128,300-303")
    monkeypatch.setenv("ISOQUANT_WARM_DIMS", "64")
    s = Settings()
    assert s.dims == [64, 128, 300, 301, 302, 303] and s.dims_text() == "64, 128, 300-303"
    assert s.serves_dim(301) and not s.serves_dim(299) and not s.serves_dim(65)
    assert Settings(dims="[256, 64, 64]", warm_dims=[64]).dims == [64, 256]  # JSON too; sorted, once each


def test_ranges_text():
    assert ranges_text([2, 3, 4]) == "2-4" and ranges_text([2, 3]) == "2, 3" and ranges_text([7]) == "7"
    assert ranges_text([32, 64, 96, 97, 98, 100, 101, 4096]) == "32, 64, 96-98, 100, 101, 4096"
    assert ranges_text([]) == ""


def test_torch_threads_default_is_half_the_cores_per_process():
    # The 2-core case is the measured one (1 thread served 1.6x the requests of torch's default of 2).
    assert [auto_torch_threads(1, cores) for cores in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]
    assert auto_torch_threads(4, 16) == 2 and auto_torch_threads(8, 16) == 1 and auto_torch_threads(64, 2) == 1
    assert auto_torch_threads(1) == max(1, usable_cores() // 2)


def test_environment(monkeypatch):
    monkeypatch.setenv("ISOQUANT_DEVICE", "CUDA:1")
    monkeypatch.setenv("ISOQUANT_WARM_DIMS", "128, 64")
    monkeypatch.setenv("ISOQUANT_WARM_VARIANTS", '["fast"]')
    monkeypatch.setenv("ISOQUANT_BITS", "2,3,4")
    monkeypatch.setenv("ISOQUANT_WARM_BITS", "3")
    monkeypatch.setenv("ISOQUANT_API_KEY", "sekrit-123")
    monkeypatch.setenv("ISOQUANT_MAX_QUEUE", "5")
    monkeypatch.setenv("ISOQUANT_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("ISOQUANT_TRITON_CACHE_DIR", "/tmp/triton-cache")
    s = Settings()
    assert s.device == "cuda:1" and s.warm_dims == [128, 64] and s.warm_variants == ["fast"]
    assert s.bits == [2, 3, 4] and s.api_key.get_secret_value() == "sekrit-123" and "sekrit" not in repr(s)
    assert s.max_queue == 5 and s.log_level == "debug" and s.triton_cache_dir == "/tmp/triton-cache"
    # Flags win over the environment (what __main__ does with --host/--port).
    assert Settings(port=9).port == 9


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"variants": ["full", "rotor"]}, "allowed: full, fast, 2d, dense, hadamard, identity, kronecker"),
        ({"dims": [1]}, "dims (ISOQUANT_DIMS) must be a non-empty list of integers in 2..4096; got [1]"),
        ({"bits": [9]}, "1..8"),
        ({"dims": [64, 128], "warm_dims": [64, 100]}, "(ISOQUANT_WARM_DIMS): [100] not allowed; allowed: 64, 128"),
        ({"warm_dims": [5000]}, "[5000] not allowed; allowed: 2-4096"),
        ({"dims": "100-50"}, "range '100-50' is empty"),
        ({"variants": ["full"], "warm_variants": ["fast"]}, "warm_variants"),
        ({"dtypes": ["float64"]}, "float16, bfloat16, float32"),
        ({"max_queue": 0}, "max_queue"),
        ({"log_level": "loud"}, "log_level"),
    ],
)
def test_bad_values_are_refused(overrides, fragment):
    with pytest.raises(ValidationError) as info:
        Settings(**overrides)
    assert fragment in str(info.value)


def test_a_settings_error_names_the_variable_and_never_echoes_the_api_key():
    import os
    import subprocess
    import sys

    env = {**os.environ, "ISOQUANT_API_KEY": "api-key-0123456789", "ISOQUANT_DIMS": "128,384,768,1536"}
    result = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "ISOQUANT_WARM_DIMS" in output and "Traceback" not in output
    assert "0123456789" not in output and "api-key" not in output
