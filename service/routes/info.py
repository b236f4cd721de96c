"""GET /info (what this server serves and its limits) and GET /quantizer (one quantizer's parameters,
enough to check or reimplement it)."""

from __future__ import annotations

import platform
from dataclasses import asdict
from importlib import metadata

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request

from kernels import FORMAT_VERSION, Quantizer
from kernels.kv_cache import PRESETS
from kernels.rotations import DEFINING_PARAMS
from service import codec, validate
from service.routes.common import ERROR_RESPONSES, authorized, get_state, ready_engine

router = APIRouter(tags=["info"], dependencies=[Depends(authorized)])


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@router.get(
    "/info",
    summary="Device, versions, what is served, the warm set and the limits",
    responses={401: ERROR_RESPONSES[401]},
)
async def info(request: Request) -> dict:
    state = get_state(request)
    s, engine = state.settings, state.engine
    return {
        "service": "isoquant",
        "version": state.version,
        "format_version": FORMAT_VERSION,
        "ready": bool(engine and engine.ready),
        "device": str(engine.device) if engine else None,
        "backend": engine.backend if engine else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "fastapi": _version("fastapi"),
        },
        "variants": s.variants,
        # The ISOQUANT_DIMS syntax ("2-4096"), not a list: the default serves 4,095 dims.
        "dims": s.dims_text(),
        "bits": s.bits,
        "dtypes": s.dtypes,
        "default_seed": s.default_seed,
        "warm_set": {"variants": s.warm_variants, "dims": s.warm_dims, "bits": s.warm_bits, "dtypes": s.warm_dtypes},
        "warmup_seconds": engine.warmup_seconds if engine else None,
        "quantizers_resident": engine.resident_count() if engine else None,
        "limits": {
            "max_request_bytes": s.max_request_bytes,
            "max_vectors": s.max_vectors,
            "max_queue": s.max_queue,
            "workers": s.workers,
            "body_timeout_s": codec.BODY_TIMEOUT_S,
            # What the device workers use: the setting, or on the CPU the default chosen from the cores.
            "torch_threads": engine.torch_threads if engine else s.torch_threads,
            "job_timeout_s": s.job_timeout_s,
            "seed_cache_size": s.seed_cache_size,
            "quantizer_cache_size": s.quantizer_cache_size,
        },
        "media_types": ["application/json", "application/x-safetensors"],
        # KV-cache recipes (docs/EVALUATION.md): a client quantizes keys with key_variant / key_bits and values
        # with value_variant / value_bits; the exact sink and window, smoothing and norm dtype are the cache's
        # (kernels.hf.IsoQuantCache applies them all).
        "kv_cache_presets": {name: asdict(config) for name, config in PRESETS.items()},
        "auth": "bearer" if s.api_key is not None else None,
    }


def describe(q: Quantizer) -> dict:
    """The quantizer's defining values as JSON numbers: rotation parameters and codebook exactly as
    applied (float32 values, which the fingerprint hashes, docs/FORMAT.md), plus the float64 codebook."""
    params = {name: q.rotation.tensors[name].tolist() for name in DEFINING_PARAMS[q.variant]}
    return {
        **q.descriptor(),
        "n_coded": q.n_coded,
        "code_bytes": q.code_bytes,
        "parameters": params,
        "codebook": {
            "centroids": q.codebook.centroids.astype(np.float32).astype(np.float64).tolist(),
            "boundaries": q.codebook.boundaries.astype(np.float32).astype(np.float64).tolist(),
            "centroids_float64": q.codebook.centroids.tolist(),
            "distortion_per_coordinate": q.codebook.distortion,
        },
    }


@router.get("/quantizer", summary="One quantizer's parameters, codebook and fingerprint", responses=ERROR_RESPONSES)
async def quantizer(
    request: Request,
    variant: str = Query(..., description="a served variant"),
    dim: int = Query(..., description="a served dimension (GET /info: dims)"),
    bits: int = Query(..., description="a served bit width"),
    seed: int | None = Query(None, description="0..2^64-1; default: the server's default seed"),
) -> dict:
    settings = get_state(request).settings
    engine = ready_engine(request)
    args = (
        validate.variant(settings, variant),
        validate.dim(settings, dim),
        validate.bits(settings, bits),
        validate.seed(settings, seed),
    )
    q = await engine.run(engine.quantizer, *args)
    return describe(q)
