"""``IsoQuantClient`` (sync) and ``AsyncIsoQuantClient`` (asyncio): the IsoQuant service from Python.

numpy in, numpy out, over httpx; torch tensors are accepted by duck typing (``.detach().cpu().numpy()``)
and torch is never imported. Bodies are safetensors containers by default (``format="json"`` sends the
JSON/base64 API instead). Batches larger than the server's limits (GET /info: ``max_vectors``,
``max_request_bytes``) are split into requests that fit and reassembled in order; since every vector is
coded on its own, the result is byte-identical to one call. 429 and 503 answers, and connections closed
before any answer (a stopping server), are retried with exponential backoff, never sooner than the server's
Retry-After, at most ``max_retries`` times; every
other failure raises an :mod:`clients.errors` exception carrying the server's type, message and field.

    >>> from clients import IsoQuantClient
    >>> with IsoQuantClient("http://127.0.0.1:8000") as client:
    ...     client.wait_ready(timeout=60)                             # while the server starts or warms up
    ...     packed = client.quantize(x, variant="full", bits=3)      # x: [..., dim] float16/float32
    ...     x_hat, stats = client.dequantize(packed, reference=x)     # x_hat: [..., dim] in x's dtype
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from clients._codec import (
    DESCRIPTOR_KEYS,
    Distortion,
    Origin,
    PackedCodes,
    as_vectors,
    from_json_array,
    origin,
    read_safetensors,
    to_json_array,
    write_safetensors,
)
from clients.errors import IsoQuantError, OverloadedError, ProtocolError, TransportError, error_from_response

__all__ = ["AsyncIsoQuantClient", "IsoQuantClient", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:8000"
SAFETENSORS = "application/x-safetensors"
JSON = "application/json"
USER_AGENT = "isoquant-client/0.1"
# Bytes kept free in every request for the container header / JSON fields around the arrays.
_OVERHEAD = 4096
_OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}


def default_url() -> str:
    """$ISOQUANT_URL, else http://127.0.0.1:8000."""
    return os.environ.get("ISOQUANT_URL") or DEFAULT_URL


@dataclass(frozen=True)
class _Plan:
    """A batch flattened to rows [N, ...] and split into slices that each fit one request."""

    lead: tuple[int, ...]
    slices: list[slice]


class _Core:
    """What the sync and async clients share: request bodies, answer parsing, chunk planning and the retry
    policy. No I/O happens here."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float, format: str, max_retries: int,
                 backoff: float, max_backoff: float, max_retry_wait: float, max_batch_vectors: int | None) -> None:
        if format not in ("safetensors", "json"):
            raise ValueError(f"format must be 'safetensors' or 'json'; got {format!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0; got {max_retries}")
        if max_batch_vectors is not None and max_batch_vectors < 1:
            raise ValueError(f"max_batch_vectors must be >= 1; got {max_batch_vectors}")
        self.base_url = (base_url or default_url()).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("ISOQUANT_API_KEY") or None
        self.timeout = timeout
        self.format = format
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_wait = max_retry_wait
        self.max_batch_vectors = max_batch_vectors
        self.limits: dict[str, int] | None = None

    # -- HTTP --------------------------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def media_type(self) -> str:
        return SAFETENSORS if self.format == "safetensors" else JSON

    def transport_error(self, method: str, path: str, exc: httpx.TransportError, attempts: int) -> TransportError:
        """The client's error for an httpx transport failure: ``timeout`` or ``connect_error``."""
        if isinstance(exc, httpx.TimeoutException):
            return TransportError(f"{method} {path}: timed out after {self.timeout} s ({exc})",
                                  type="timeout", attempts=attempts)
        return TransportError(f"{method} {self.base_url}{path}: {exc or type(exc).__name__}",
                              type="connect_error", attempts=attempts)

    def retry_delay(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before retry number ``attempt + 1`` of a 429/503 answer, or None to give up
        (retries used up, or the server asks for a longer wait than ``max_retry_wait``).

        The wait is the exponential backoff ``backoff * 2**attempt`` (capped at ``max_backoff``, with
        jitter in [50%, 100%]) but never less than the Retry-After header (seconds or an HTTP date)."""
        if attempt >= self.max_retries:
            return None
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is not None and retry_after > self.max_retry_wait:
            return None
        delay = min(self.max_backoff, self.backoff * (2**attempt)) * random.uniform(0.5, 1.0)
        return max(delay, retry_after or 0.0)

    def dropped_retry_delay(self, attempt: int, exc: httpx.TransportError) -> float | None:
        """Seconds to wait before retrying a request whose connection closed before any answer arrived, or None
        to raise. That is what a client sees from a server process or pod that is stopping (no load balancer
        in front, or one that has not noticed yet); every route is a pure function of its body, so sending it
        again gets the answer the first would have had. Timeouts and refused connections are not retried: the
        work may still be running, or nothing is listening."""
        if attempt >= self.max_retries or not isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
            return None
        return min(self.max_backoff, self.backoff * (2**attempt)) * random.uniform(0.5, 1.0)

    @staticmethod
    def check(response: httpx.Response, attempts: int) -> httpx.Response:
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, attempts)
        return response

    # -- limits and chunks --------------------------------------------------------------------------

    def set_limits(self, info: dict) -> dict[str, int]:
        limits = info.get("limits") if isinstance(info, dict) else None
        try:
            self.limits = {"max_vectors": int(limits["max_vectors"]),
                           "max_request_bytes": int(limits["max_request_bytes"])}
        except (TypeError, KeyError, ValueError):
            raise ProtocolError("GET /info has no limits.max_vectors / limits.max_request_bytes", type="bad_response",
                                body=info) from None
        return self.limits

    def plan(self, lead: tuple[int, ...], row_bytes: int) -> _Plan:
        """Split N = prod(lead) rows of ``row_bytes`` bytes each (as they travel) into requests within the
        server's limits and ``max_batch_vectors``. An empty batch is one (empty) request, so that the
        server answers it."""
        assert self.limits is not None
        n = math.prod(lead)
        wire = row_bytes if self.format == "safetensors" else math.ceil(row_bytes * 4 / 3) + 1
        per_request = max(1, (self.limits["max_request_bytes"] - _OVERHEAD) // max(wire, 1))
        per_request = min(per_request, self.limits["max_vectors"], self.max_batch_vectors or per_request)
        if n == 0:
            return _Plan(lead, [slice(0, 0)])
        return _Plan(lead, [slice(i, min(i + per_request, n)) for i in range(0, n, per_request)])

    # -- /quantize ---------------------------------------------------------------------------------

    def quantize_body(self, rows: np.ndarray, variant: str, bits: int, seed: int | None,
                      return_distortion: bool = False) -> tuple[bytes, dict]:
        """rows float16|float32 [n, dim] -> (body, headers) of one POST /quantize."""
        headers = {**self.headers(), "Content-Type": self.media_type(), "Accept": self.media_type()}
        if self.format == "safetensors":
            meta = {"variant": variant, "bits": bits, "seed": seed}
            if return_distortion:
                meta["return_distortion"] = True
            return write_safetensors({"vectors": rows}, meta), headers
        body = {"vectors": to_json_array(rows), "variant": variant, "bits": bits}
        if seed is not None:
            body["seed"] = seed
        if return_distortion:
            body["return_distortion"] = True
        return json.dumps(body).encode(), headers

    def quantize_answer(self, response: httpx.Response, n: int,
                        want_stats: bool = False) -> tuple[np.ndarray, np.ndarray, dict, Distortion | None]:
        """A /quantize answer for n rows -> (codes uint8 [n, code_bytes], norms float32 [n], descriptor,
        Distortion of the round trip when ``want_stats``)."""
        try:
            if _is_json(response):
                body = response.json()
                descriptor = {k: body["quantizer"][k] for k in DESCRIPTOR_KEYS}
                codes = from_json_array(body["codes"], "codes")
                norms = from_json_array(body["norms"], "norms")
                stats = body.get("distortion")
            else:
                tensors, meta = read_safetensors(response.content, "the /quantize answer")
                codes, norms = tensors["codes"], tensors["norms"]
                descriptor = {k: meta[k] for k in DESCRIPTOR_KEYS}
                stats = meta
            for key in ("dim", "bits", "seed", "format_version"):
                descriptor[key] = int(descriptor[key])
            distortion = Distortion.from_mapping(stats, n) if want_stats else None
            if want_stats and distortion is None:
                raise KeyError("distortion")
        except (KeyError, ValueError, TypeError) as exc:
            raise ProtocolError(f"cannot read the /quantize answer: {exc!r}", status=response.status_code,
                                type="bad_response") from None
        if codes.dtype != np.uint8 or norms.dtype != np.float32 or codes.ndim != 2 or codes.shape[0] != n \
                or norms.shape != (n,):
            raise ProtocolError(f"the /quantize answer for {n} vectors has codes {codes.dtype} {list(codes.shape)} "
                                f"and norms {norms.dtype} {list(norms.shape)}", status=response.status_code,
                                type="bad_response")
        return codes, norms, descriptor, distortion

    def assemble_codes(self, plan: _Plan, source: Origin,
                       parts: Sequence[tuple[np.ndarray, np.ndarray, dict, Distortion | None]]) -> PackedCodes:
        descriptor = parts[0][2]
        for _, _, other, _ in parts[1:]:
            if other != descriptor:
                raise ProtocolError(f"chunks of one batch came back from different quantizers: {descriptor} vs "
                                    f"{other} (did the server change between requests?)", type="bad_response")
        codes = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        norms = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        stats = [p[3] for p in parts if p[3] is not None]
        distortion = Distortion.combine(stats) if stats else None
        return PackedCodes(codes=codes.reshape(*plan.lead, codes.shape[-1]), norms=norms.reshape(plan.lead),
                           bytes_in=source.nbytes, dtype=source.dtype, distortion=distortion, **descriptor)

    # -- /dequantize -------------------------------------------------------------------------------

    def dequantize_body(self, packed: PackedCodes, rows: slice, codes: np.ndarray, norms: np.ndarray,
                        reference: np.ndarray | None, dtype: str) -> tuple[bytes, dict]:
        """Rows ``rows`` of (codes [N, code_bytes], norms [N], reference [N, dim] or None) -> one POST
        /dequantize."""
        headers = {**self.headers(), "Content-Type": self.media_type(), "Accept": self.media_type()}
        if self.format == "safetensors":
            tensors = {"codes": codes[rows], "norms": norms[rows]}
            if reference is not None:
                tensors["reference"] = reference[rows]
            return write_safetensors(tensors, {**packed.descriptor(), "dtype": dtype}), headers
        body: dict[str, Any] = {"quantizer": packed.descriptor(), "codes": to_json_array(codes[rows]),
                                "norms": to_json_array(norms[rows]), "dtype": dtype}
        if reference is not None:
            body["reference"] = to_json_array(reference[rows])
        return json.dumps(body).encode(), headers

    def dequantize_answer(self, response: httpx.Response, n: int, dim: int,
                          want_stats: bool) -> tuple[np.ndarray, Distortion | None]:
        """A /dequantize answer for n rows -> (vectors [n, dim], Distortion or None)."""
        try:
            if _is_json(response):
                body = response.json()
                vectors = from_json_array(body["vectors"], "vectors")
                stats = body.get("distortion")
            else:
                tensors, meta = read_safetensors(response.content, "the /dequantize answer")
                vectors = tensors["vectors"]
                stats = meta
            distortion = None
            if want_stats:
                distortion = Distortion.from_mapping(stats, n)
                if distortion is None:
                    raise KeyError("distortion")
        except (KeyError, ValueError, TypeError) as exc:
            raise ProtocolError(f"cannot read the /dequantize answer: {exc!r}", status=response.status_code,
                                type="bad_response") from None
        if vectors.shape != (n, dim):
            raise ProtocolError(f"the /dequantize answer for {n} vectors has shape {list(vectors.shape)}",
                                status=response.status_code, type="bad_response")
        return vectors, distortion

    def prepare_dequantize(self, packed: PackedCodes, reference: Any, dtype: str):
        if not isinstance(packed, PackedCodes):
            raise TypeError(f"packed must be a PackedCodes (from quantize() or PackedCodes.load); got "
                            f"{type(packed).__name__}")
        if dtype not in _OUTPUT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_OUTPUT_DTYPES)} (numpy has no bfloat16); got {dtype!r}")
        codes, norms = packed.rows()
        ref = None
        if reference is not None:
            ref = as_vectors(reference, "reference")
            if ref.shape != packed.shape:
                raise ValueError(f"reference must have shape {list(packed.shape)} (the shape of the vectors the codes "
                                 f"stand for); got {list(ref.shape)}")
            ref = ref.reshape(-1, packed.dim)
        row_bytes = packed.code_bytes + 4 + (packed.dim * ref.itemsize if ref is not None else 0)
        plan = self.plan(packed.batch_shape, row_bytes)
        return codes, norms, ref, plan

    @staticmethod
    def assemble_vectors(plan: _Plan, dim: int, dtype: str, parts: Sequence[tuple[np.ndarray, Distortion | None]],
                         want_stats: bool):
        vectors = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        vectors = vectors.astype(_OUTPUT_DTYPES[dtype], copy=False).reshape(*plan.lead, dim)
        if not want_stats:
            return vectors
        return vectors, Distortion.combine([p[1] for p in parts if p[1] is not None])


def _is_json(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").split(";")[0].strip().lower() == JSON


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a non-negative number, or an HTTP date (seconds from now). None if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _prepare_quantize(vectors: Any) -> tuple[np.ndarray, tuple[int, ...], Origin]:
    x = as_vectors(vectors)
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]), lead, origin(vectors, x)


def output_dtype(packed: PackedCodes, dtype: str | None) -> str:
    """The dtype to reconstruct in: ``dtype`` if given, else the one the codes record (restored by default);
    bfloat16, which numpy cannot hold, comes back as float32 (exactly what the server computes before rounding)."""
    if dtype is not None:
        return dtype
    return packed.dtype if packed.dtype in _OUTPUT_DTYPES else "float32"


def _ready_deadline_error(base_url: str, timeout: float, last: IsoQuantError | None) -> IsoQuantError:
    if isinstance(last, TransportError):
        return TransportError(f"nothing answered at {base_url} for {timeout:g} s: {last.message}", type=last.type)
    detail = last.message if last is not None else "no answer"
    return OverloadedError(f"not ready after {timeout:g} s: {detail}", status=getattr(last, "status", None),
                           type=getattr(last, "type", "not_ready"))


def _ready_answer(response: httpx.Response) -> tuple[dict | None, Exception | None]:
    """GET /health/ready's answer -> (its body when 200, else None; the error to report if the wait ends)."""
    if response.status_code == 200:
        try:
            return response.json(), None
        except ValueError:
            return {}, None
    return None, error_from_response(response.status_code, response.content)


class IsoQuantClient:
    """Synchronous client of one IsoQuant service.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` (default: $ISOQUANT_URL or that address).
        api_key: sent as ``Authorization: Bearer <key>`` (default: $ISOQUANT_API_KEY, if set).
        timeout: seconds for connecting and for each read/write of one request.
        format: ``"safetensors"`` (binary, default) or ``"json"`` (base64 arrays).
        max_retries: retries of a request answered 429 or 503, or whose connection closed before any answer
            (0 disables retries).
        backoff, max_backoff: the exponential backoff, in seconds: ``backoff * 2**attempt`` up to ``max_backoff``.
        max_retry_wait: give up at once when the server's Retry-After asks for more seconds than this.
        max_batch_vectors: split batches into requests of at most this many vectors (besides /info's limits).
        http_client: an ``httpx.Client`` to use instead of one the client makes (its base_url is ignored:
            ``base_url`` is prepended to every path).

    The client is thread-safe: share one across threads. ``retries`` counts the retries it made.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0, *,
                 format: str = "safetensors", max_retries: int = 5, backoff: float = 0.25, max_backoff: float = 8.0,
                 max_retry_wait: float = 60.0, max_batch_vectors: int | None = None,
                 http_client: httpx.Client | None = None) -> None:
        self._core = _Core(base_url, api_key, timeout, format, max_retries, backoff, max_backoff, max_retry_wait,
                           max_batch_vectors)
        self._http = http_client or httpx.Client(timeout=timeout)
        self._owns_http = http_client is None
        self._lock = threading.Lock()
        self.retries = 0

    @property
    def base_url(self) -> str:
        return self._core.base_url

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> IsoQuantClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, content: bytes | None = None, headers: dict | None = None,
                 params: dict | None = None) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, self._core.base_url + path, content=content,
                                              headers=headers or self._core.headers(), params=params)
            except httpx.TransportError as exc:  # timeouts included
                delay = self._core.dropped_retry_delay(attempt, exc)
                if delay is None:
                    raise self._core.transport_error(method, path, exc, attempt + 1) from None
                with self._lock:
                    self.retries += 1
                time.sleep(delay)
                attempt += 1
                continue
            if response.status_code in (429, 503):
                delay = self._core.retry_delay(attempt, response)
                if delay is not None:
                    with self._lock:
                        self.retries += 1
                    time.sleep(delay)
                    attempt += 1
                    continue
            return self._core.check(response, attempt + 1)

    def _limits(self) -> dict[str, int]:
        return self._core.limits or self._core.set_limits(self.info())

    def info(self) -> dict:
        """GET /info: device, versions, served variants/dims/bits/dtypes, warm set and ``limits``. The limits
        are cached for splitting batches (read on the first quantize/dequantize); calling info() refreshes
        them."""
        info = self._request("GET", "/info").json()
        self._core.set_limits(info)
        return info

    def ready(self) -> bool:
        """GET /health/ready: True when the server has warmed up and is not shutting down, False while it
        answers 503. Raises TransportError when nothing answers."""
        try:
            response = self._http.get(self._core.base_url + "/health/ready", headers=self._core.headers())
        except httpx.TransportError as exc:
            raise TransportError(f"GET {self._core.base_url}/health/ready: {exc or type(exc).__name__}",
                                 type="connect_error") from None
        if response.status_code == 503:
            return False
        return self._core.check(response, 1).status_code == 200

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> dict:
        """Wait until GET /health/ready answers 200 and return its body (device, backend, warmup_seconds).

        While the server is starting (connection refused) or warming up (503) it asks again every ``interval``
        seconds. After ``timeout`` seconds it raises OverloadedError with the server's last reason ("warming
        up: 12 of 27 quantizers built and run") or TransportError if nothing ever answered; any other answer
        (401, 404: not this service) is raised at once. A first start on a GPU compiles kernels for minutes:
        give it the time your deployment's start period allows."""
        deadline = time.monotonic() + timeout
        last: IsoQuantError | None = None
        while True:
            try:
                response = self._http.get(self._core.base_url + "/health/ready", headers=self._core.headers(),
                                          timeout=min(self._core.timeout, max(interval, 1.0)))
                body, last = _ready_answer(response)
                if body is not None:
                    return body
                if response.status_code != 503:
                    raise last
            except httpx.TransportError as exc:
                last = self._core.transport_error("GET", "/health/ready", exc, 1)
            if time.monotonic() + interval > deadline:
                raise _ready_deadline_error(self._core.base_url, timeout, last)
            time.sleep(interval)

    def quantizer(self, variant: str, dim: int, bits: int, seed: int | None = None) -> dict:
        """GET /quantizer: one quantizer's descriptor, rotation parameters and codebook (JSON numbers)."""
        params = {"variant": variant, "dim": dim, "bits": bits, **({"seed": seed} if seed is not None else {})}
        return self._request("GET", "/quantizer", params=params).json()

    def quantize(self, vectors: Any, *, variant: str = "full", bits: int = 3, seed: int | None = None,
                 return_distortion: bool = False) -> PackedCodes:
        """Quantize vectors [..., dim] (numpy array, torch tensor or nested lists; float16 and float32 are
        sent as they are, other real dtypes as float32).

        Returns PackedCodes: codes uint8 [..., code_bytes], norms float32 [...], the quantizer descriptor and
        the vectors' dtype, which ``dequantize`` restores. ``seed=None`` takes the server's default seed.
        ``return_distortion=True`` has the server also run the round trip and fills ``packed.distortion``
        (mse, relative errors, cosine similarities). Large batches are split to fit the server's limits."""
        rows, lead, source = _prepare_quantize(vectors)
        self._limits()
        plan = self._core.plan(lead, rows.shape[1] * rows.itemsize)
        parts = []
        for chunk in plan.slices:
            body, headers = self._core.quantize_body(rows[chunk], variant, bits, seed, return_distortion)
            response = self._request("POST", "/quantize", content=body, headers=headers)
            parts.append(self._core.quantize_answer(response, chunk.stop - chunk.start, return_distortion))
        return self._core.assemble_codes(plan, source, parts)

    def dequantize(self, packed: PackedCodes, reference: Any = None, *,
                   dtype: str | None = None) -> np.ndarray | tuple[np.ndarray, Distortion]:
        """Reconstruct vectors from ``packed``.

        Returns the reconstruction, a numpy array [..., dim] of ``dtype`` (float32 or float16; by default the
        dtype the codes record, so float16 vectors come back float16; bfloat16 as float32). With a
        ``reference`` [..., dim] (the original vectors), returns ``(reconstruction, Distortion)``, the
        server's error statistics of the reconstruction against it."""
        self._limits()
        dtype = output_dtype(packed, dtype)
        codes, norms, ref, plan = self._core.prepare_dequantize(packed, reference, dtype)
        parts = []
        for chunk in plan.slices:
            body, headers = self._core.dequantize_body(packed, chunk, codes, norms, ref, dtype)
            response = self._request("POST", "/dequantize", content=body, headers=headers)
            parts.append(self._core.dequantize_answer(response, chunk.stop - chunk.start, packed.dim, ref is not None))
        return self._core.assemble_vectors(plan, packed.dim, dtype, parts, ref is not None)


class AsyncIsoQuantClient:
    """asyncio client of one IsoQuant service: the same arguments and methods as :class:`IsoQuantClient`,
    as coroutines, plus ``max_concurrency``: how many requests of one split batch are in flight at once
    (the parts are reassembled in order)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0, *,
                 format: str = "safetensors", max_retries: int = 5, backoff: float = 0.25, max_backoff: float = 8.0,
                 max_retry_wait: float = 60.0, max_batch_vectors: int | None = None, max_concurrency: int = 4,
                 http_client: httpx.AsyncClient | None = None) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1; got {max_concurrency}")
        self._core = _Core(base_url, api_key, timeout, format, max_retries, backoff, max_backoff, max_retry_wait,
                           max_batch_vectors)
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._owns_http = http_client is None
        self.max_concurrency = max_concurrency
        self.retries = 0

    @property
    def base_url(self) -> str:
        return self._core.base_url

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncIsoQuantClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, *, content: bytes | None = None, headers: dict | None = None,
                       params: dict | None = None) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, self._core.base_url + path, content=content,
                                                    headers=headers or self._core.headers(), params=params)
            except httpx.TransportError as exc:  # timeouts included
                delay = self._core.dropped_retry_delay(attempt, exc)
                if delay is None:
                    raise self._core.transport_error(method, path, exc, attempt + 1) from None
                self.retries += 1
                await asyncio.sleep(delay)
                attempt += 1
                continue
            if response.status_code in (429, 503):
                delay = self._core.retry_delay(attempt, response)
                if delay is not None:
                    self.retries += 1
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
            return self._core.check(response, attempt + 1)

    async def _limits(self) -> dict[str, int]:
        return self._core.limits or self._core.set_limits(await self.info())

    async def _gather(self, jobs: list) -> list:
        """Run coroutine factories with at most ``max_concurrency`` in flight; results in order. On the first
        failure the others are cancelled and the failure is raised."""
        semaphore = asyncio.Semaphore(self.max_concurrency)

        async def run(job):
            async with semaphore:
                return await job()

        tasks = [asyncio.ensure_future(run(job)) for job in jobs]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def info(self) -> dict:
        """GET /info (see IsoQuantClient.info)."""
        info = (await self._request("GET", "/info")).json()
        self._core.set_limits(info)
        return info

    async def ready(self) -> bool:
        """GET /health/ready: True when ready, False while the server answers 503."""
        try:
            response = await self._http.get(self._core.base_url + "/health/ready", headers=self._core.headers())
        except httpx.TransportError as exc:
            raise TransportError(f"GET {self._core.base_url}/health/ready: {exc or type(exc).__name__}",
                                 type="connect_error") from None
        if response.status_code == 503:
            return False
        return self._core.check(response, 1).status_code == 200

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> dict:
        """See IsoQuantClient.wait_ready: wait until GET /health/ready answers 200; return its body."""
        deadline = time.monotonic() + timeout
        last: IsoQuantError | None = None
        while True:
            try:
                response = await self._http.get(self._core.base_url + "/health/ready", headers=self._core.headers(),
                                                timeout=min(self._core.timeout, max(interval, 1.0)))
                body, last = _ready_answer(response)
                if body is not None:
                    return body
                if response.status_code != 503:
                    raise last
            except httpx.TransportError as exc:
                last = self._core.transport_error("GET", "/health/ready", exc, 1)
            if time.monotonic() + interval > deadline:
                raise _ready_deadline_error(self._core.base_url, timeout, last)
            await asyncio.sleep(interval)

    async def quantizer(self, variant: str, dim: int, bits: int, seed: int | None = None) -> dict:
        """GET /quantizer (see IsoQuantClient.quantizer)."""
        params = {"variant": variant, "dim": dim, "bits": bits, **({"seed": seed} if seed is not None else {})}
        return (await self._request("GET", "/quantizer", params=params)).json()

    async def quantize(self, vectors: Any, *, variant: str = "full", bits: int = 3,
                       seed: int | None = None, return_distortion: bool = False) -> PackedCodes:
        """See IsoQuantClient.quantize: vectors [..., dim] -> PackedCodes."""
        rows, lead, source = _prepare_quantize(vectors)
        await self._limits()
        plan = self._core.plan(lead, rows.shape[1] * rows.itemsize)

        def job(chunk: slice):
            async def send():
                body, headers = self._core.quantize_body(rows[chunk], variant, bits, seed, return_distortion)
                response = await self._request("POST", "/quantize", content=body, headers=headers)
                return self._core.quantize_answer(response, chunk.stop - chunk.start, return_distortion)
            return send

        parts = await self._gather([job(chunk) for chunk in plan.slices])
        return self._core.assemble_codes(plan, source, parts)

    async def dequantize(self, packed: PackedCodes, reference: Any = None, *,
                         dtype: str | None = None) -> np.ndarray | tuple[np.ndarray, Distortion]:
        """See IsoQuantClient.dequantize: vectors [..., dim] (by default in the dtype the codes record), or
        (vectors, Distortion) with a reference."""
        await self._limits()
        dtype = output_dtype(packed, dtype)
        codes, norms, ref, plan = self._core.prepare_dequantize(packed, reference, dtype)

        def job(chunk: slice):
            async def send():
                body, headers = self._core.dequantize_body(packed, chunk, codes, norms, ref, dtype)
                response = await self._request("POST", "/dequantize", content=body, headers=headers)
                return self._core.dequantize_answer(response, chunk.stop - chunk.start, packed.dim, ref is not None)
            return send

        parts = await self._gather([job(chunk) for chunk in plan.slices])
        return self._core.assemble_vectors(plan, packed.dim, dtype, parts, ref is not None)

