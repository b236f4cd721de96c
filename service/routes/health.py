"""Health (GET /health/live, /health/ready), metrics (GET /metrics) and the pointer at GET /: never queued,
never behind the API key, so probes and scrapes answer while the device is busy."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.errors import Unavailable
from service.routes.common import get_state
from service.schemas import ErrorBody

router = APIRouter(tags=["health"])


@router.get("/", summary="Where to go from here: the API docs, health, info and metrics")
async def root(request: Request) -> dict:
    """A pointer for someone who opens the bare address (a browser, curl): before this it was a 404. Open like
    health and metrics: it says nothing a client could not read from /docs."""
    return {
        "service": "isoquant",
        "version": get_state(request).version,
        "docs": "/docs",
        "openapi": "/openapi.json",
        "health": {"live": "/health/live", "ready": "/health/ready"},
        "info": "/info",
        "metrics": "/metrics",
        "endpoints": ["POST /quantize", "POST /dequantize", "GET /quantizer", "GET /info"],
    }


@router.get("/health/live", summary="200 while the process serves HTTP")
async def live() -> dict:
    return {"status": "live"}


@router.get(
    "/health/ready",
    summary="200 once warm-up has finished (in every server process); 503 before, on failure, after shutdown began",
    responses={503: {"model": ErrorBody}},
)
async def ready(request: Request) -> JSONResponse:
    state = get_state(request)
    engine = state.engine
    # With several server processes, one port answers for all of them: ready when every one is.
    ready_processes = state.metrics.processes_ready()
    others_ready = ready_processes is None or ready_processes >= state.settings.processes
    if engine is not None and engine.ready and others_ready:
        return JSONResponse(
            {
                "status": "ready",
                "device": str(engine.device),
                "backend": engine.backend,
                "warmup_seconds": engine.warmup_seconds,
            }
        )
    if engine is None:
        raise Unavailable("the engine is not started yet", type="not_ready")
    if engine.draining or not engine.accepting:
        raise Unavailable("the service is shutting down", type="shutting_down")
    if engine.warmup_error is not None:
        raise Unavailable(f"warm-up failed: {engine.warmup_error}", type="warmup_failed", retry_after=60)
    if engine.ready:
        raise Unavailable(
            f"this process is ready, {ready_processes} of {state.settings.processes} server processes are",
            type="not_ready",
        )
    done, total = engine.warm_progress
    raise Unavailable(f"warming up: {done} of {total} quantizers built and run", type="not_ready")


@router.get("/metrics", summary="Prometheus text exposition", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
