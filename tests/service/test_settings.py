"""Settings: one class, every field from ISOQUANT_* variables, lists as commas or JSON, bad values refused
with a message that names the allowed ones."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


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
        ({"dims": [1]}, "2..4096"),
        ({"bits": [9]}, "1..8"),
        ({"warm_dims": [100]}, "warm_dims"),
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
