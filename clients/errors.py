"""Exceptions of the IsoQuant client.

Every failure of a call to the service raises an :class:`IsoQuantError`. When the server answered, the
exception carries its HTTP status and the service's one error body ``{"error": {"type", "message",
"field"}}`` as ``status``, ``type``, ``message`` and ``field``:

=====================  =========================  ===================================================
class                  when                       examples of ``type``
=====================  =========================  ===================================================
BadRequestError        any other 4xx              malformed_body (400), not_acceptable (406), 408, ...
UnauthorizedError      401                        unauthorized (field ``authorization``)
PayloadTooLargeError   413                        payload_too_large, too_many_vectors
ValidationError        422                        invalid_value, unsupported_value, shape_mismatch,
                                                  fingerprint_mismatch, non_finite, missing_field
OverloadedError        429 / 503 after retries    queue_full, not_ready, timeout, out_of_memory, ...
ServerError            500 and other 5xx          internal_error
TransportError         no answer (connect/timeout)  connect_error, timeout
ProtocolError          an answer the client cannot read  bad_response
=====================  =========================  ===================================================

``UnauthorizedError``, ``PayloadTooLargeError`` and ``ValidationError`` are ``BadRequestError``s, so
``except BadRequestError`` catches every "fix the request" case.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "BadRequestError",
    "IsoQuantError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ProtocolError",
    "ServerError",
    "TransportError",
    "UnauthorizedError",
    "ValidationError",
    "error_from_response",
]


class IsoQuantError(Exception):
    """A call to the service failed.

    Attributes:
        status: HTTP status code, or None when no answer came back (TransportError).
        type: the service's machine-readable error class (e.g. ``"unsupported_value"``).
        message: the service's explanation (what is wrong and what is allowed).
        field: dotted path of the offending request field or header, or None.
        attempts: how many times the request was sent (more than 1 after retries on 429/503).
        body: the decoded error body (dict) when the server sent one.
    """

    def __init__(self, message: str, *, status: int | None = None, type: str = "error", field: str | None = None,
                 attempts: int = 1, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        self.attempts = attempts
        self.body = body

    def __str__(self) -> str:
        head = f"HTTP {self.status} {self.type}" if self.status is not None else self.type
        where = f" (field {self.field})" if self.field else ""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{head}{where}{tries}: {self.message}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(status={self.status!r}, type={self.type!r}, field={self.field!r}, "
                f"message={self.message!r})")


class BadRequestError(IsoQuantError):
    """4xx: the request must change before it can succeed."""


class UnauthorizedError(BadRequestError):
    """401: missing or wrong API key (pass ``api_key=`` or set ISOQUANT_API_KEY)."""


class PayloadTooLargeError(BadRequestError):
    """413: body or vector count over the server's limits (the client splits batches to avoid this)."""


class ValidationError(BadRequestError):
    """422: a field's value is not valid or not served; ``field`` names it, ``message`` lists what is allowed."""


class OverloadedError(IsoQuantError):
    """429 (queue full) or 503 (warming up, shutting down, device busy or failed) after the retries ran out."""


class ServerError(IsoQuantError):
    """500 or another 5xx the client does not retry."""


class TransportError(IsoQuantError):
    """No HTTP answer: connection refused, DNS failure, read/write timeout."""


class ProtocolError(IsoQuantError):
    """The server answered 2xx with a body the client cannot read (wrong media type, missing tensors)."""


def _class_for(status: int) -> type[IsoQuantError]:
    if status == 401:
        return UnauthorizedError
    if status == 413:
        return PayloadTooLargeError
    if status == 422:
        return ValidationError
    if status in (429, 503):
        return OverloadedError
    if 400 <= status < 500:
        return BadRequestError
    return ServerError


def error_from_response(status: int, content: bytes, attempts: int = 1) -> IsoQuantError:
    """An HTTP error answer -> the matching exception, with the service's type, message and field when the
    body has the one error shape (otherwise type ``http_error`` and the start of the body as message)."""
    body: Any = None
    type_, message, field = "http_error", content[:300].decode("utf-8", "replace").strip() or f"HTTP {status}", None
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        pass
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        type_ = str(error.get("type") or type_)
        message = str(error.get("message") or message)
        field = error.get("field")
    return _class_for(status)(message, status=status, type=type_, field=field, attempts=attempts, body=body)
