"""What every route needs: the app's state, the API-key check and the readiness gate."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from service import codec
from service.engine import Engine, Ticket
from service.errors import Unauthorized, Unavailable
from service.metrics import Metrics
from service.schemas import ErrorBody
from service.settings import Settings

ERROR_RESPONSES = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "malformed JSON or safetensors body",
        401: "missing or invalid API key",
        406: "Accept allows neither JSON nor safetensors",
        408: "the headers or the body arrived too slowly (ISOQUANT_HEADER_TIMEOUT_S, ISOQUANT_BODY_MIN_RATE)",
        413: "body or vector count over the limit",
        415: "Content-Type is neither JSON nor safetensors",
        422: "a field's value is not served or not valid (the message lists the allowed values)",
        429: "queue full; retry after Retry-After seconds",
        503: "warming up, shutting down, device failure or timeout; retry after Retry-After seconds",
    }.items()
}


# /quantize and /dequantize answer in either media type (the request's, or the one Accept asks for).
BODY_RESPONSES = {
    **ERROR_RESPONSES,
    200: {
        "description": "JSON (the response model) or safetensors, as the request's format or Accept says",
        "content": {"application/x-safetensors": {"schema": {"type": "string", "format": "binary"}}},
    },
}


# JSON bodies below this are decoded and encoded on the event loop: a thread hop costs more than the
# work. (Safetensors bodies are always handled on the loop: parsing and encoding them make views, not
# copies, and a hop to the thread pool and back took 3-9 ms on our loaded 2-core CPU.)
INLINE_BYTES = 64 << 10


async def offload(fmt: str, nbytes: int, fn, *args):
    """Run ``fn(*args)``, which decodes or encodes a body of format ``fmt``: inline for safetensors and for
    small JSON, in the thread pool for large JSON (so that the loop keeps answering /health and /metrics
    while megabytes of base64 are decoded)."""
    if fmt == "safetensors" or nbytes < INLINE_BYTES:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


# Bodies up to this size are joined and sent as one message: for a 1-vector answer (~300 bytes in 3 parts) each
# further message cost a pass through every middleware's send (their socket writes are joined anyway, by
# service.http_protocol.HeldWrites).
JOIN_BELOW_BYTES = 64 << 10


class BodyPartsResponse(Response):
    """A response whose body is several buffers sent one after another with the Content-Length of their
    sum: a safetensors header, then each tensor's bytes straight from its host memory
    (``codec.safetensors_parts``), so no byte of a large body is copied into one body first. A small body
    (under ``JOIN_BELOW_BYTES``) is joined and sent in one message."""

    def __init__(self, parts: list[bytes | memoryview], media_type: str) -> None:
        length = 0
        for part in parts:  # a loop, not sum() of a generator: each of its steps is a Python call
            length += memoryview(part).nbytes
        self.parts = [b"".join(parts)] if length < JOIN_BELOW_BYTES else parts
        # What Response.__init__(None, media_type=media_type, headers={"content-length": str(length)}) sets, the same
        # header list (no charset: not a text/ type), without its header building: the response took 1.0 us against 2.2
        # (a 1-vector answer, our 2-core CPU).
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.body = b""
        self.raw_headers = [(b"content-length", b"%d" % length), (b"content-type", media_type.encode("latin-1"))]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < len(self.parts) - 1})


def answer(content: bytes | list, out_fmt: str) -> Response:
    """The op routes' 200: JSON bytes, or safetensors parts."""
    if out_fmt == "json":
        return Response(content, media_type=codec.JSON)
    return BodyPartsResponse(content, codec.SAFETENSORS)


@dataclass
class Admitted:
    """An op request that holds a place in the queue: the app's state, its engine, queue ticket (to enter with
    ``with``), parsed body and answer format."""

    state: AppState
    engine: Engine
    ticket: Ticket
    parsed: Any
    out_fmt: str


async def admitted(request: Request, parse: Callable[[bytes, str, Settings], Any]) -> Admitted:
    """The common start of /quantize and /dequantize: readiness, Content-Type and Accept, then a queue
    ticket (429 at once when the queue is full), the body read (the ticket takes its place only once the
    last byte has arrived: service.admission.BodyGateMiddleware) and parsed (``parse(body, fmt, settings)``, in
    a thread when large). The route runs the device job inside ``with admitted.ticket:``, which gives the
    place back unless the job took it over; if the read or the parse fails, the place is given back here.

    A plain coroutine, not an ``asynccontextmanager``: that one's async generator (its creation, the enter and
    exit steps and the loop's finalizer hook) was 9 of a batched request's ~540 Python calls on the event loop."""
    state = get_state(request)
    settings = state.settings
    engine = _ready_engine(state)
    scope = request.scope
    fmt = codec.request_format(codec.header(scope, b"content-type"))
    out_fmt = codec.response_format(codec.header(scope, b"accept"), fmt)
    ticket = engine.admit()  # the body counts against max_queue while it is read and decoded
    try:
        # Binary bodies land in the engine's host buffer (pinned on a GPU) and are parsed in place.
        allocate = engine.host_buffer if fmt == "safetensors" else None
        body = await codec.read_body(request, settings.max_request_bytes, allocate=allocate)
        # numel, not len: a tensor's __len__ is Python (4 calls), its numel one C call.
        nbytes = body.numel() if isinstance(body, torch.Tensor) else len(body)
        parsed = await offload(fmt, nbytes, parse, body, fmt, settings)
    except BaseException:
        ticket.leave()
        raise
    return Admitted(state, engine, ticket, parsed, out_fmt)


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    version: str
    engine: Engine | None = None
    extra: dict = field(default_factory=dict)


def get_state(request: Request) -> AppState:
    return request.app.state.isoquant


def ready_engine(request: Request) -> Engine:
    """The engine, if warm-up is done (503 with Retry-After otherwise)."""
    return _ready_engine(get_state(request))


def _ready_engine(state: AppState) -> Engine:
    engine = state.engine
    if engine is not None and not engine.accepting:
        raise Unavailable("the service is shutting down", type="shutting_down")
    if engine is None or not engine.warmed:
        # Draining (after SIGTERM) still serves: load balancers need a moment to see not-ready.
        raise Unavailable(
            "the service is warming up; retry shortly (GET /health/ready turns 200 when ready)", type="not_ready"
        )
    return engine


async def authorized(request: Request) -> None:
    """Dependency: when an API key is configured, require ``Authorization: Bearer <key>`` (401 otherwise)."""
    key = get_state(request).settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <api key>'")
    # Constant-time comparison: the key must not leak through response timing.
    if not secrets.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        get_state(request).metrics.rejected.labels("unauthorized").inc()
        raise Unauthorized("invalid API key")
