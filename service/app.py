"""``create_app(settings)``: the FastAPI app, its lifespan (engine build + warm-up in the background),
routes, the request metrics middleware and the handlers that give every error the one shape
``{"error": {"type", "message", "field"}}``."""

from __future__ import annotations

import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.engine import Engine
from service.errors import ApiError
from service.metrics import Metrics
from service.routes import dequantize, health, info, quantize
from service.routes.common import AppState
from service.schemas import DequantizeRequest, QuantizeRequest
from service.settings import Settings

log = logging.getLogger("service")


def _error(
    status: int, type_: str, message: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message, "field": field}}, status, headers=headers)


# Plain starlette routes (FastAPI's docs) do not put themselves in the scope; name them from the path.
_DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class RequestMetricsMiddleware:
    """Pure ASGI middleware: in-flight gauge, request count and duration by route template and status.
    The route label is the matched template (e.g. /quantize), or 'unmatched', so it stays bounded."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or (scope["path"] if scope["path"] in _DOC_PATHS else "unmatched")
            labels = (template, scope.get("method", ""), str(status["code"]))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.request_duration.labels(*labels).observe(time.perf_counter() - start)


def _served_enums(schema: dict, settings: Settings) -> None:
    """Give variant, dim and bits the values this server serves, wherever the schema has them (request
    models, the descriptor, /quantizer's query), so that a schema-driven client forms valid requests."""
    served = {"variant": list(settings.variants), "dim": list(settings.dims), "bits": list(settings.bits)}
    components = schema.get("components", {}).get("schemas", {})
    for model in ("QuantizeRequest", "Descriptor"):
        for name, values in served.items():
            prop = components.get(model, {}).get("properties", {}).get(name)
            if prop is not None:
                prop["enum"] = values
    for parameter in schema.get("paths", {}).get("/quantizer", {}).get("get", {}).get("parameters", []):
        if parameter.get("name") in served:
            parameter.setdefault("schema", {})["enum"] = served[parameter["name"]]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service as an ASGI app. The engine (device, quantizers, workers) is built in the lifespan;
    warm-up runs on the device worker after start-up, so /health/live answers at once and
    /health/ready turns 200 when warm-up is done."""
    settings = settings or Settings()
    if settings.triton_cache_dir:
        # Triton reads this when it first compiles; set before any quantizer is built.
        os.environ["TRITON_CACHE_DIR"] = settings.triton_cache_dir
    metrics = Metrics(settings, __version__)
    state = AppState(settings=settings, metrics=metrics, version=__version__)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = await run_in_threadpool(Engine, settings, metrics)
        state.engine = engine
        log.info(
            "engine on %s (backend %s); warming %d quantizers", engine.device, engine.backend, len(settings.warm_set())
        )
        engine.start_warm_up()
        try:
            yield
        finally:
            # Uvicorn has already waited for the open requests; this waits for queued device work.
            await run_in_threadpool(engine.close)

    app = FastAPI(
        title="IsoQuant Service",
        version=__version__,
        description="Block-rotation vector quantization (IsoQuant) as a service: POST /quantize, POST /dequantize. "
        'Every error is {"error": {"type", "message", "field"}}.',
        lifespan=lifespan,
    )
    app.state.isoquant = state
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    for module in (quantize, dequantize, info, health):
        app.include_router(module.router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status < 500:
            log.debug("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.type, exc.message)
        return _error(exc.status, exc.type, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header")]
        field = ".".join(loc) or None
        return _error(422, "invalid_value", f"{field}: {first.get('msg')}" if field else str(first.get("msg")), field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return _error(
            exc.status_code,
            kinds.get(exc.status_code, "http_error"),
            str(exc.detail),
            None,
            getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # Starlette re-raises after this answer and uvicorn then drops the connection: say so, so that a
        # keep-alive client opens a new one instead of failing its next request on this one.
        return _error(
            500, "internal_error", f"internal error ({type(exc).__name__}); see the server log", None,
            {"connection": "close"},
        )

    def openapi() -> dict:
        # The request bodies are parsed by the routes (two media types), so their JSON schemas are added
        # to the components here for /docs.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (QuantizeRequest, DequantizeRequest):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in model_schema.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[model.__name__] = model_schema
            either = [{"$ref": "#/components/schemas/Array"}, {"type": "array", "items": {}}]
            for model, name in ((QuantizeRequest, "vectors"), (DequantizeRequest, "reference")):
                components[model.__name__]["properties"][name].update(anyOf=either)
            _served_enums(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
