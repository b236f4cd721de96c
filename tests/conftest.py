"""On a machine without CUDA, the Triton kernels run on the CPU under TRITON_INTERPRET=1. triton 3.6 reads
it when @triton.jit decorates a function and again while interpreting, so it is set here, at the root of the
tests, before any test module is imported: transformers (tests/bench, the KV cache tests) imports
triton.language, whose own @jit helpers (the reductions' combine functions) are decorated then, and a kernel
interpreted later cannot call helpers decorated without the variable.
``Quantizer`` still refuses backend="triton" on the CPU; the interpreter tests call the ops directly."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import kernels.triton  # noqa: F401

    INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
except ImportError:
    INTERPRETED = False


def pytest_terminal_summary(terminalreporter):
    """Print how many codes differed from the reference over all Triton op tests of the session."""
    import sys

    module = sys.modules.get("tests.kernels.test_triton_ops")
    stats = getattr(module, "CODE_DIFF_STATS", None)
    if stats:
        total = sum(n for _, _, n in stats)
        differing = sum(d for _, d, _ in stats)
        worst = max(stats, key=lambda s: s[1] / max(s[2], 1))
        terminalreporter.write_line(
            f"triton ops: {differing} of {total} codes differed from the reference over {len(stats)} cases "
            f"(all within the boundary tolerance); worst case {worst[0]}: {worst[1]} of {worst[2]}"
        )


# ---------------------------------------------------------------------------------------------------
# Test tiers. "integration": tests that start real service processes or talk to them over the network, run
# real Prometheus tools, or load a real model (tests/deploy, tests/bench, the client tests against a live
# server, supervised processes, the slow model tests). Everything else is the fast tier: units, the Triton
# interpreter, the service in process. `make test` runs both tiers, as CI does; `make test-fast` the first.

_INTEGRATION_DIRS = ("tests/deploy/", "tests/bench/")
_INTEGRATION_FILES = ("tests/service/test_process.py",)
_INTEGRATION_FIXTURES = {"server", "busy_server", "live_service", "live_metrics", "smollm"}


def pytest_collection_modifyitems(config, items):
    import pytest

    root = str(config.rootpath) + "/"
    for item in items:
        path = str(item.path).removeprefix(root)
        if (
            path.startswith(_INTEGRATION_DIRS)
            or path in _INTEGRATION_FILES
            or _INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ()))
            or item.get_closest_marker("slow")
        ):
            item.add_marker(pytest.mark.integration)
