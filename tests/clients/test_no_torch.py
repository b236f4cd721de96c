"""The SDK and the CLI work where torch, triton and the server's packages cannot be imported: a fresh
interpreter whose import system refuses them runs a round trip (sync, async, CLI) against the server."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.clients.conftest import API_KEY, REPO

SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc, sys

    BLOCKED = ("torch", "triton", "kernels", "service")
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())

    import asyncio, os, tempfile
    import numpy as np
    import clients, clients.cli, clients.bench, clients.client, clients.errors, clients._codec
    from clients import AsyncIsoQuantClient, IsoQuantClient, PackedCodes

    url, key = sys.argv[1], sys.argv[2]
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    with IsoQuantClient(url, api_key=key) as c:
        packed = c.quantize(x, bits=3)
        x_hat, stats = c.dequantize(packed, reference=x)
    assert packed.codes.shape == (5, 24) and x_hat.shape == (5, 64) and stats.mean_relative_error < 0.3

    async def run():
        async with AsyncIsoQuantClient(url, api_key=key, format="json") as a:
            return await a.quantize(x, bits=3)
    assert np.array_equal(asyncio.run(run()).codes, packed.codes)

    folder = tempfile.mkdtemp()
    np.save(os.path.join(folder, "x.npy"), x)
    common = ["--url", url, "--api-key", key]
    assert clients.cli.main(["quantize", os.path.join(folder, "x.npy"), "-o", os.path.join(folder, "c.safetensors"),
                             *common]) == 0
    assert clients.cli.main(["dequantize", os.path.join(folder, "c.safetensors"), "-o", os.path.join(folder, "o.npy"),
                             "--reference", os.path.join(folder, "x.npy"), *common]) == 0
    assert np.array_equal(np.load(os.path.join(folder, "o.npy")), x_hat)
    assert clients.cli.main(["bench", "-n", "3", "-c", "1", "--batch", "8", "--dim", "64", *common]) == 0

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("NO-TORCH-OK", sorted(set(a.split(".")[0] for a in attempts)))
    """
)


def test_clients_run_without_torch_or_server_packages(server, tmp_path):
    script = tmp_path / "no_torch.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOQUANT_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, str(script), server.url, API_KEY], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NO-TORCH-OK" in done.stdout
