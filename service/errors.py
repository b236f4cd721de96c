"""The service's exceptions. Each carries what the one error body needs:
``{"error": {"type": ..., "message": ..., "field": ...}}`` plus the HTTP status and extra headers."""

from __future__ import annotations


class ApiError(Exception):
    """An answer other than 2xx, with the one error shape."""

    status = 400
    type = "bad_request"

    def __init__(
        self,
        message: str,
        field: str | None = None,
        *,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        # Message and field can quote the client's own strings; an unpaired surrogate in them (a JSON
        # "\ud800" escape) cannot be encoded as UTF-8, so such characters are shown escaped.
        return {"error": {"type": self.type, "message": _printable(self.message), "field": _printable(self.field)}}


class MalformedBody(ApiError):
    """400: the body is not parseable JSON or safetensors."""

    status, type = 400, "malformed_body"


class InvalidInput(ApiError):
    """422: parseable, but a field's value is not acceptable (the message says what is allowed)."""

    status, type = 422, "invalid_value"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, "authorization", headers={"WWW-Authenticate": 'Bearer realm="isoquant"'})


class PayloadTooLarge(ApiError):
    status, type = 413, "payload_too_large"


class RequestTimeout(ApiError):
    status, type = 408, "request_timeout"


class UnsupportedMediaType(ApiError):
    status, type = 415, "unsupported_media_type"


class NotAcceptable(ApiError):
    status, type = 406, "not_acceptable"


class QueueFull(ApiError):
    status, type = 429, "queue_full"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, None, headers={"Retry-After": str(retry_after)})


class Unavailable(ApiError):
    """503: not ready yet, shutting down, device failure or timeout; the client may retry."""

    status, type = 503, "unavailable"

    def __init__(self, message: str, type: str = "unavailable", retry_after: int = 1) -> None:
        super().__init__(message, None, type=type, headers={"Retry-After": str(retry_after)})


def _printable(text: str | None) -> str | None:
    """``text`` with any character UTF-8 cannot encode (lone surrogates) written as a backslash escape."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")

