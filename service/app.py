"""``create_app(settings)``: the FastAPI app, its lifespan (engine build + warm-up in the background),
routes, the request metrics middleware and the handlers that give every error the one shape
``{"error": {"type", "message", "field"}}``."""

from __future__ import annotations

import copy
import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kernels import FORMAT_VERSION
from service import __version__, codec, schemas
from service.admission import BodyGateMiddleware
from service.engine import Engine
from service.errors import ApiError
from service.metrics import Metrics
from service.routes import dequantize, health, info, quantize
from service.routes.common import AppState, authorized
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
            self.metrics.observe_http(
                template, scope.get("method", ""), str(status["code"]), time.perf_counter() - start
            )


class OpRoutesMiddleware:
    """Pure ASGI middleware, innermost of ours: ``POST /quantize`` and ``POST /dequantize`` go straight to their
    endpoints, past FastAPI's router, dependency solving, exit stacks and exception middleware, which the rest
    keeps. Why: those layers cost the event loop about 150 us of a 1-vector /quantize's 480 (in process, our
    2-core CPU), and under many small concurrent requests the event loop is the bound (docs/BENCHMARKS.md).

    What they did for these routes is done here: the API-key check (the routes' dependency), the
    ``scope["route"]`` that RequestMetricsMiddleware labels with, and an ``ApiError`` answered in the one
    shape by the app's own handler. Anything else propagates to the app's 500 handler as before. The routes
    stay registered with FastAPI for the OpenAPI schema; other paths and methods (a 405, a trailing slash)
    take FastAPI's way."""

    def __init__(self, app, routes: list[APIRoute], on_error) -> None:
        for route in routes:
            # A dependency added to an op route would be skipped here without a word: refuse to start instead.
            d = route.dependant
            others = [dep.call.__name__ for dep in d.dependencies if dep.call is not authorized]
            params = d.path_params + d.query_params + d.header_params + d.cookie_params + d.body_params
            if others or params:
                raise ValueError(
                    f"{route.path}: OpRoutesMiddleware runs only the API-key check, but the route also needs "
                    f"{others or 'parameters'}; run it there too or take the route out of the middleware"
                )
        self.app = app
        self.routes = {route.path: route for route in routes}
        self.on_error = on_error

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            await authorized(request)
            response = await route.endpoint(request)
        except ApiError as exc:
            response = await self.on_error(request, exc)
        await response(scope, receive, send)


def _served_enums(schema: dict, settings: Settings) -> None:
    """Give variant, dim and bits the values this server serves, wherever the schema has them (request
    models, the descriptor, /quantizer's query), so that a schema-driven client forms valid requests."""
    served = schemas.served_constraints(settings)  # an enum, or minimum/maximum for a range of dims
    components = schema.get("components", {}).get("schemas", {})
    for model in ("QuantizeRequest", "Descriptor"):
        for name, constraint in served.items():
            prop = components.get(model, {}).get("properties", {}).get(name)
            if prop is not None:
                prop.pop("enum", None)
                prop.update(constraint)
    for parameter in schema.get("paths", {}).get("/quantizer", {}).get("get", {}).get("parameters", []):
        if parameter.get("name") in served:
            prop = parameter.setdefault("schema", {})
            prop.pop("enum", None)
            prop.update(served[parameter["name"]])


# Standard base64, padded, as codec.array_to_tensor reads it.
_BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def _request_constraints(schema: dict, settings: Settings) -> None:
    """What the routes check and JSON Schema can say, in the schemas (schemathesis, run against a live
    service with every check, generated from the looser schema empty batches, empty dtypes and shapes,
    uint8 norms, float codes, ragged lists and negative seeds, which the service rightly refused with 422).
    What JSON Schema cannot say stays a 422: the byte count of ``data`` against shape x dtype, the
    descriptor's fingerprint against the server's quantizer, a nested list's innermost length against the
    served dims, and an integer written with a fraction (``3.0``), which JSON Schema counts as an integer."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    array = components.get("Array")
    if array is None:
        return
    array["properties"]["data"].update(pattern=_BASE64, contentEncoding="base64")
    # Served dtypes; float32 always, as nested lists are read (and reconstructed) in it.
    array["properties"]["dtype"]["enum"] = [d for d in ("float16", "bfloat16", "float32")
                                            if d in settings.dtypes or d == "float32"]
    array["properties"]["shape"].update(
        minItems=1, maxItems=codec.MAX_NDIM, items={"type": "integer", "minimum": 1}
    )
    # Codes and norms have one dtype each (uint8, float32): arrays of their own.
    for name, dtype in (("Codes", "uint8"), ("Norms", "float32")):
        components[name] = copy.deepcopy(array)
        components[name]["title"] = name
        components[name]["properties"]["dtype"]["enum"] = [dtype]
    for model in ("DequantizeRequest", "QuantizeResponse"):
        properties = components.get(model, {}).get("properties", {})
        for field, name in (("codes", "Codes"), ("norms", "Norms")):
            if field in properties:
                properties[field]["$ref"] = f"#/components/schemas/{name}"
    components["NestedNumbers"] = {
        "title": "NestedNumbers",
        "description": "vectors [..., dim] as nested lists of numbers, rectangular (read as float32)",
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [{"type": "number"}, {"$ref": "#/components/schemas/NestedNumbers"}]},
    }
    nested = {"$ref": "#/components/schemas/NestedNumbers"}
    seed = {"type": "integer", "minimum": 0, "maximum": (1 << 64) - 1}
    quantize = components.get("QuantizeRequest", {}).get("properties", {})
    if quantize:
        quantize["seed"]["anyOf"] = [seed, {"type": "null"}]
        quantize["vectors"]["anyOf"][1] = nested
    descriptor = components.get("Descriptor", {}).get("properties", {})
    if descriptor:
        descriptor["seed"].update(seed)
        descriptor["fingerprint"]["pattern"] = "^[0-9a-f]{16}$"
        descriptor["format_version"]["enum"] = [FORMAT_VERSION]
    dequantize = components.get("DequantizeRequest", {}).get("properties", {})
    if dequantize:
        dequantize["dtype"]["enum"] = list(settings.dtypes)
        dequantize["reference"]["anyOf"] = [{"$ref": "#/components/schemas/Array"}, nested, {"type": "null"}]
    for parameter in schema.get("paths", {}).get("/quantizer", {}).get("get", {}).get("parameters", []):
        if parameter.get("name") == "seed":
            parameter["schema"]["anyOf"] = [seed, {"type": "null"}]


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
            # Uvicorn has already waited for the open requests (and answered 503 to those it gave up on): jobs
            # still queued have no one waiting, so they are dropped, and this waits only for running ones.
            engine.admission.close()
            await run_in_threadpool(engine.close)

    app = FastAPI(
        title="IsoQuant Service",
        version=__version__,
        description="Block-rotation vector quantization (IsoQuant) as a service: POST /quantize, POST /dequantize. "
        'Every error is {"error": {"type", "message", "field"}}.',
        lifespan=lifespan,
        # FastAPI's OpenTelemetry hooks (0.165 and later; older versions keep the key in app.extra): off, as
        # the service's metrics are Prometheus'. On, they looked the providers up on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.isoquant = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status < 500:
            log.debug("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.type, exc.message)
        return _error(exc.status, exc.type, exc.message, exc.field, exc.headers)

    # Added first, so innermost: the body gate and the request metrics see the op routes as before.
    op_routes = [route for module in (quantize, dequantize) for route in module.router.routes]
    app.add_middleware(OpRoutesMiddleware, routes=op_routes, on_error=api_error)
    # Bodies of /quantize and /dequantize: admitted once read, a minimum rate (service/admission.py).
    app.add_middleware(BodyGateMiddleware, settings=settings)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    # No prefix and no dependencies here or on the app: OpRoutesMiddleware serves the op routes at their own
    # paths with the API-key check only (it sees the routes' own dependencies, not those of an include).
    for module in (quantize, dequantize, info, health):
        app.include_router(module.router)
    if app.router.dependencies:
        raise ValueError("app-level dependencies would be skipped by OpRoutesMiddleware on /quantize, /dequantize")

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
            _request_constraints(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
