"""On a CUDA device (run with -m gpu on the GPU machine): the service serves from the GPU, its codes equal
the library's on the same device, kernel time comes from CUDA events and GPU memory is reported."""

from __future__ import annotations

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kernels import Quantizer
from service.app import create_app
from tests.service.conftest import b64, running, settings, unb64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.anyio,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


async def test_service_on_gpu_matches_library_on_gpu():
    app = create_app(settings(device="cuda", warm_dims=[128], warm_dtypes=["float16"]))
    async with running(app) as client:
        info = (await client.get("/info")).json()
        assert info["device"].startswith("cuda")
        for variant in ("full", "fast", "2d"):
            x = torch.randn(4096, 128).half()
            r = await client.post(
                "/quantize", json={"vectors": b64(x), "variant": variant, "bits": 3, "return_distortion": True}
            )
            assert r.status_code == 200, r.text
            q = Quantizer(variant, 128, 3, 0, device="cuda")
            packed = q.quantize(x.cuda())
            assert unb64(r.json()["codes"]).numpy().tobytes() == packed.codes.cpu().numpy().tobytes()
            d = await client.post("/dequantize", content=r.content, headers={"content-type": "application/json"})
            # posted back as it is, the response asks for its input's dtype (float16)
            assert torch.equal(unb64(d.json()["vectors"]), q.dequantize(packed, torch.float16).cpu())
        text = (await client.get("/metrics")).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        memory = [s for s in families["isoquant_gpu_memory_bytes"].samples if s.labels["kind"] == "allocated"]
        assert memory and memory[0].value > 0
        counts = [s for s in families["isoquant_kernel_duration_seconds"].samples if s.name.endswith("_count")]
        assert sum(s.value for s in counts) >= 6


@pytest.mark.parametrize("pinned_host_bytes", [1 << 30, 1 << 20, 0])
async def test_binary_path_on_gpu_matches_library(pinned_host_bytes):
    """Safetensors bodies read into pinned host memory (or pageable memory beyond the budget, or with
    pinning off) and answers copied back into it give the library's codes and reconstruction byte for
    byte; the pinned storage still alive does not grow with the number of requests (at most one
    answer's worth lingers: on an H200 the last 4 MiB answer stayed alive after its request, which we
    did not trace)."""
    import gc

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from tests.service.conftest import SAFETENSORS

    app = create_app(
        settings(
            device="cuda",
            warm_dims=[128],
            warm_dtypes=["float16"],
            max_vectors=8192,
            pinned_host_bytes=pinned_host_bytes,
        )
    )
    async with running(app) as client:
        engine = app.state.isoquant.engine
        q = Quantizer("full", 128, 3, 0, device="cuda")
        in_use = []
        for n in (5, 8192, 5, 8192, 8192):  # 2 KiB and 2 MiB bodies: under and over the 1 MiB budget
            x = torch.randn(n, 128).half()
            body = st_save({"vectors": x}, metadata={"variant": "full", "bits": "3"})
            r = await client.post("/quantize", content=body, headers={"content-type": SAFETENSORS})
            assert r.status_code == 200, r.text
            out = st_load(r.content)
            packed = q.quantize(x.cuda())
            assert torch.equal(out["codes"], packed.codes.cpu()) and torch.equal(out["norms"], packed.norms.cpu())
            d = await client.post("/dequantize", content=r.content, headers={"content-type": SAFETENSORS})
            assert d.status_code == 200, d.text
            # The answer's metadata names its input's dtype, so /dequantize answers float16.
            assert torch.equal(st_load(d.content)["vectors"], q.dequantize(packed, torch.float16).cpu())
            del r, d, out
            gc.collect()
            in_use.append(engine.pinned_bytes_in_use())
        answer = 8192 * 128 * 4
        assert max(in_use) <= answer and in_use[-1] <= in_use[1], in_use
        if pinned_host_bytes == 0:
            assert in_use == [0] * 5


def test_small_host_buffers_are_pageable_and_large_ones_pinned():
    """Below PINNED_MIN_BYTES a host buffer is pageable (not worth the allocator's work on the event loop);
    from it on, pinned within the budget, and only those count against it."""
    from service.host_buffers import PINNED_MIN_BYTES, HostBuffers

    buffers = HostBuffers(torch.device("cuda"), pinned_budget_bytes=1 << 30)
    small = buffers.empty((PINNED_MIN_BYTES - 1,), torch.uint8)
    large = buffers.empty((PINNED_MIN_BYTES // 4,), torch.float32)
    assert not small.is_pinned() and large.is_pinned()
    assert buffers.pinned_bytes_in_use() == PINNED_MIN_BYTES


async def test_warm_up_compiles_every_kernel_a_request_can_need():
    """After warm-up with ISOQUANT_WARM_ALL_TILES, requests of the largest allowed batch, of
    sizes that are and are not multiples of 16 in each tile range, and of one vector compile no Triton
    kernel: the kernels' JIT caches hold as many kernels after the requests as before."""
    from kernels.triton.dequantize import _dequantize_fused_kernel
    from kernels.triton.quantize import _quantize_fused_kernel
    from kernels.triton.roundtrip import _roundtrip_fused_kernel

    def compiled() -> int:
        fns = (_quantize_fused_kernel, _dequantize_fused_kernel, _roundtrip_fused_kernel)
        return sum(len(cache[0]) for fn in fns for cache in fn.device_caches.values())

    app = create_app(
        settings(
            device="cuda",
            warm_variants=["full"],
            warm_dims=[128],
            warm_bits=[3],
            warm_dtypes=["float16"],
            max_vectors=65536,
            warm_all_tiles=True,
            max_request_bytes=64 << 20,
        )
    )
    async with running(app) as client:
        before = compiled()
        for n in (65536, 1001, 1, 20000, 20001, 65535, 4096):
            x = torch.randn(n, 128).half()
            r = await client.post(
                "/quantize", json={"vectors": b64(x), "variant": "full", "bits": 3, "return_distortion": True}
            )
            assert r.status_code == 200, r.text
            d = await client.post("/dequantize", json={**r.json(), "dtype": "float16"})  # the warm dtype
            assert d.status_code == 200, d.text
        assert compiled() == before
