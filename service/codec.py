"""Bodies <-> tensors: JSON with base64 arrays (or nested lists) and safetensors containers.

Nothing is ever unpickled: base64 is decoded to raw bytes and viewed with ``torch.frombuffer``; a
safetensors body is a JSON header and raw little-endian data, whose tensors are checked against the
format's rules and then viewed in place (``parse_safetensors``). Sizes are checked before any large
allocation. The container itself (its checks, writer, dtype codes, metadata strings) is the torch-free
``isoquant_format`` package, shared with the clients; the functions here adapt it to torch tensors and
to the service's errors.

Media types: ``application/json`` and ``application/x-safetensors`` (``application/octet-stream`` is
read as safetensors too). See docs/FORMAT.md, "Safetensors container".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import isoquant_format as wire
from service.errors import (
    InvalidInput,
    MalformedBody,
    NotAcceptable,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from service.http_protocol import BODY_BUFFERED
from service.schemas import Array

JSON = "application/json"
SAFETENSORS = "application/x-safetensors"
_BINARY_TYPES = (SAFETENSORS, "application/octet-stream")
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_NDIM = wire.MAX_NDIM  # one bound for JSON arrays and safetensors tensors
# A body not fully received within this many seconds gets 408: a slow client must not hold a queue
# place for ever. (A constant for now; promote it to a setting together with its README row.)
BODY_TIMEOUT_S = 30.0


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


# ------------------------------------------------------------------------------------------------
# Content negotiation


def request_format(content_type: str | None) -> str:
    """'json' or 'safetensors' from a Content-Type header; 415 otherwise."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == JSON or (media.startswith("application/") and media.endswith("+json")):
        return "json"
    if media in _BINARY_TYPES:
        return "safetensors"
    raise UnsupportedMediaType(
        f"Content-Type {media or '(none)'!r} is not supported; send {JSON} or {SAFETENSORS} "
        "(application/octet-stream is read as safetensors)",
        "content-type",
    )


def response_format(accept: str | None, request_fmt: str) -> str:
    """The response follows the request's format unless Accept names the other one (406 if it names
    neither and allows no wildcard)."""
    if not accept:
        return request_fmt
    ranked: list[tuple[float, str]] = []
    for part in accept.split(","):
        pieces = [p.strip() for p in part.split(";")]
        media, quality = pieces[0].lower(), 1.0
        for param in pieces[1:]:
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        if quality > 0:
            ranked.append((quality, media))
    ranked.sort(key=lambda item: -item[0])  # stable: ties keep the client's order
    for _, media in ranked:
        if media in ("*/*", "application/*"):
            return request_fmt
        if media == JSON:
            return "json"
        if media in _BINARY_TYPES:
            return "safetensors"
    raise NotAcceptable(f"Accept {accept!r} allows neither {JSON} nor {SAFETENSORS}", "accept")


def header(scope: dict, name: bytes) -> str | None:
    """The first value of the request header ``name`` (lower case, as ASGI servers give header names), as
    starlette's ``request.headers.get`` reads it, without building the ``Headers`` object and its Mapping
    lookup: three headers a request that way were ~16 of a batched request's ~540 Python calls on the event loop."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(
    request,
    limit: int,
    timeout: float | None = None,
    allocate: Callable[[int], torch.Tensor | bytearray] | None = None,
) -> bytearray | torch.Tensor:
    """The whole body, refusing (413) as soon as it is known to exceed ``limit`` bytes: from
    Content-Length before reading, or while streaming a body without one; 408 if it has not fully
    arrived within ``timeout`` seconds (a slow client must not hold a queue place for ever).

    With a Content-Length, each chunk is copied into one buffer of that size as it arrives and then
    dropped: a ``bytearray``, or, with ``allocate(n) -> uint8 tensor [n] or bytearray``, what it gives (the engine
    gives pinned memory on a GPU, so the device copy of the vectors is one DMA from it). Holding the chunks
    until one join instead (``Request.body()``) cost 3x the server CPU for a 16 MiB body (31 against
    10 ms on our 2-core CPU): each 256 KB chunk is a fresh allocation whose pages fault in, and so is
    the joined copy."""
    if request.scope.get(BODY_BUFFERED):  # all here: nothing to wait for
        return await _read_body(request, limit, allocate)
    timeout = BODY_TIMEOUT_S if timeout is None else timeout
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the coroutine in a task of its own
        async with asyncio.timeout(timeout):
            return await _read_body(request, limit, allocate)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout} s", "body") from None


async def _read_body(request, limit: int, allocate) -> bytearray | torch.Tensor:
    declared = header(request.scope, b"content-length")
    size = None
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise MalformedBody(f"Content-Length {declared!r} is not an integer", "content-length") from None
        if size < 0:
            raise MalformedBody(f"Content-Length {declared!r} is negative", "content-length")
        if size > limit:
            raise PayloadTooLarge(f"body of {size} bytes exceeds the limit of {limit} bytes", "body")
    if size:
        buffer = allocate(size) if allocate is not None else bytearray(size)
        view = memoryview(buffer.numpy()) if isinstance(buffer, torch.Tensor) else memoryview(buffer)
    else:
        buffer, view, chunks = None, None, []
    total = 0
    # The ASGI messages themselves, as starlette's request.stream() reads them, without that async generator: its
    # creation, two steps and finalizer hook were 6 of a batched request's ~540 Python calls on the event loop.
    receive = request.receive
    more_body = True
    while more_body:
        message = await receive()
        kind = message["type"]
        if kind == "http.disconnect":
            # Nobody will read the answer; a 400 keeps it out of the 500s and the error log.
            raise MalformedBody("the client disconnected before the body was complete", "body")
        if kind != "http.request":
            continue
        more_body = message.get("more_body", False)
        chunk = message.get("body", b"")
        if not chunk:
            continue
        end = total + len(chunk)
        if end > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes", "body")
        if view is not None:
            if end > size:  # uvicorn enforces Content-Length; kept for other servers
                raise MalformedBody(f"body is longer than its Content-Length of {size} bytes", "body")
            view[total:end] = chunk
        else:
            chunks.append(chunk)
        total = end
    if total == 0:
        raise MalformedBody("the request body is empty", "body")
    if view is not None:
        if total != size:
            raise MalformedBody(f"body of {total} bytes is shorter than its Content-Length of {size}", "body")
        return buffer
    joined = bytearray(b"".join(chunks))
    if allocate is None:
        return joined
    return torch.frombuffer(joined, dtype=torch.uint8)


def parse_json(body: bytes | bytearray) -> dict:
    """The body as a JSON object (400 if it is not)."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedBody(f"body is not valid JSON: {exc or 'nested too deeply'}", "body") from None
    if not isinstance(value, dict):
        raise MalformedBody(f"body must be a JSON object, got {type(value).__name__}", "body")
    return value


# ------------------------------------------------------------------------------------------------
# Arrays


def _check_shape(shape: Any, field: str) -> tuple[int, ...]:
    if (
        not isinstance(shape, (list, tuple))
        or not 1 <= len(shape) <= MAX_NDIM
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape)
    ):
        raise InvalidInput(
            f"shape must be a list of 1 to {MAX_NDIM} non-negative integers; got {shape!r}", f"{field}.shape"
        )
    return tuple(shape)


def _to_native(array: torch.Tensor) -> torch.Tensor:
    """Wire data is little-endian; swap bytes on a big-endian host."""
    if sys.byteorder == "little" or array.element_size() == 1:
        return array
    swapped = array.view(torch.uint8).reshape(-1, array.element_size()).flip(-1).contiguous()
    return swapped.view(array.dtype).reshape(array.shape)


def array_to_tensor(array: Array, field: str, allowed: tuple[str, ...]) -> torch.Tensor:
    """Decode an ``Array`` into a CPU tensor of its dtype and shape (422 on a bad dtype, shape, base64
    or byte count)."""
    if array.dtype not in allowed:
        raise InvalidInput(
            f"dtype {array.dtype!r} is not allowed here; allowed: {', '.join(allowed)}", f"{field}.dtype"
        )
    shape = _check_shape(array.shape, field)
    dtype = DTYPES[array.dtype]
    expected = math.prod(shape) * dtype.itemsize
    # base64 of n bytes has 4 * ceil(n / 3) characters: refuse a wrong size before decoding anything.
    if len(array.data) != 4 * -(-expected // 3):
        raise InvalidInput(
            f"data holds {len(array.data)} base64 characters but shape {list(shape)} of {array.dtype} needs "
            f"{expected} bytes ({4 * -(-expected // 3)} characters): truncated or extra data",
            f"{field}.data",
        )
    # Fast path: the lenient decoder (about 40% faster than the strict one on megabytes) skips
    # characters outside the alphabet, so with the character count fixed above any such character
    # makes the byte count come out short; only then is the strict decoder run, for its message.
    try:
        raw = binascii.a2b_base64(array.data)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != expected:
        try:
            raw = base64.b64decode(array.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"data is not valid base64: {exc}", f"{field}.data") from None
    if len(raw) != expected:
        raise InvalidInput(
            f"data decodes to {len(raw)} bytes but shape {list(shape)} of {array.dtype} needs {expected}: "
            "truncated or extra data",
            f"{field}.data",
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray: frombuffer wants a writable buffer; the copy is the tensor's own storage.
    return _to_native(torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape))


def nested_to_tensor(value: list, field: str) -> torch.Tensor:
    """Nested lists of numbers [..., dim] -> float32 tensor (422 for ragged lists or non-numbers)."""
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise InvalidInput(f"nested lists must be rectangular (not ragged): {exc}", field) from None
    if array.dtype.kind not in "iuf" or array.ndim == 0:
        what = "ragged or mixed" if array.dtype == object else f"of {array.dtype.kind!r} kind"
        raise InvalidInput(f"nested lists must hold only numbers in a rectangular shape; got values {what}", field)
    if not 1 <= array.ndim <= MAX_NDIM:
        raise InvalidInput(f"nested lists must have 1 to {MAX_NDIM} levels; got {array.ndim}", field)
    with np.errstate(over="ignore"):  # out-of-range numbers become inf, refused later as non-finite
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def tensor_to_array(tensor: torch.Tensor) -> Array:
    """A CPU tensor -> ``Array`` (little-endian, C order)."""
    tensor = _to_native(tensor.detach().cpu().contiguous())
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return Array(data=base64.b64encode(raw).decode("ascii"), dtype=dtype_name(tensor.dtype), shape=list(tensor.shape))


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ------------------------------------------------------------------------------------------------
# Safetensors


def parse_safetensors(body: bytes | bytearray | torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors container (bytes, or a uint8 tensor [n] as ``read_body`` gives) -> (tensors on the
    CPU, metadata). 400 naming ``body`` if the container is malformed, 422 naming the tensor for a dtype
    that is not served (F16, BF16, F32, U8).

    The tensors are views into ``body``, not copies: for a 16 MiB body ``safetensors.torch.load`` spent
    a fresh allocation and a copy, and on a GPU it would also lose the pinned buffer that ``read_body``
    filled. ``isoquant_format.parse`` makes the checks (the format's own, and at most 64 KiB of header,
    16 tensors and 8 dimensions, so that the parse on the event loop stays short) and hands back
    memoryview slices of the body, viewed here with ``torch.frombuffer``. The work is O(header), except
    that a header not padded to the element size costs one copy of the misaligned tensors (writers pad
    to 8 bytes: ours, the safetensors package)."""
    if isinstance(body, torch.Tensor):
        view = memoryview(body.numpy())
    else:  # torch.frombuffer wants writable memory: bytes are copied once
        view = memoryview(body if isinstance(body, bytearray) else bytearray(body))
    try:
        raw, metadata = wire.parse(view, dtypes=wire.WIRE_DTYPES)
    except wire.UnsupportedDtype as exc:
        raise InvalidInput(exc.message, exc.tensor) from None
    except wire.FormatError as exc:
        raise MalformedBody(exc.message, "body") from None
    return {name: _view_tensor(t.data, DTYPES[t.dtype], t.shape) for name, t in raw.items()}, metadata


# The wire dtypes numpy has (bfloat16 it has not).
_NUMPY_VIEWS = {torch.uint8: np.uint8, torch.float16: np.float16, torch.float32: np.float32}


def _view_tensor(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of a container (little-endian) -> a tensor of ``dtype`` and ``shape`` sharing them. Through numpy where
    it has the dtype: ``np.frombuffer(...).reshape`` and ``torch.from_numpy`` took 1.4-1.7 us against 3.2-4.6 for
    torch's ``frombuffer``, ``view`` and ``reshape`` (a [1, 128] float16 tensor, our 2-core CPU), on the event loop
    of every safetensors request; the tensor is the same (dtype, shape, strides, memory)."""
    if not data.nbytes:
        return torch.empty(shape, dtype=dtype)  # torch.frombuffer refuses an empty buffer
    np_dtype = _NUMPY_VIEWS.get(dtype)
    if np_dtype is not None:
        array = np.frombuffer(data, np_dtype)
        if array.flags.aligned:  # as data_ptr() % itemsize below
            return _to_native(torch.from_numpy(array.reshape(shape)))
    piece = torch.frombuffer(data, dtype=torch.uint8)
    if piece.data_ptr() % dtype.itemsize:
        piece = piece.clone()  # a header not padded to the element size: views must be aligned
    return _to_native(piece.view(dtype).reshape(shape))


def safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> list[bytes | memoryview]:
    """Host tensors and scalar metadata -> a safetensors container as a list of buffers: the 8-byte
    little-endian header length and the JSON header (dtype, shape, data_offsets; padded with spaces to
    a multiple of 8 so that the data is aligned), then each tensor's raw little-endian bytes as a view
    of its memory (no copy); ``isoquant_format.write_parts`` writes it. The service sends the parts one
    after another (``BodyPartsResponse``): joining them cost a fresh allocation and a copy of every byte
    (``safetensors.torch.save`` copied each tensor twice: 20 ms for 16 MiB on our CPU)."""
    raw = {name: wire.RawTensor(dtype_name(t.dtype), tuple(t.shape), _host_bytes(t)) for name, t in tensors.items()}
    return wire.write_parts(raw, metadata)


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> bytes:
    """The first part of ``safetensors_parts(tensors, metadata)``: it reads only the tensors' dtypes and
    shapes, so tensors on the meta device will do (no memory)."""
    return wire.write_header({name: (dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()}, metadata)


def tensor_parts(*tensors: torch.Tensor) -> list[memoryview]:
    """The parts that follow the header in ``safetensors_parts`` of these tensors, in order: each non-empty
    tensor's bytes (for an answer whose header is kept by the caller)."""
    return [view for view in map(_host_bytes, tensors) if view.nbytes]


_NUMPY_DTYPES = frozenset({torch.uint8, torch.float16, torch.float32})


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's little-endian C-order bytes as a flat memoryview: of its own memory where it is a contiguous
    CPU tensor (the service's results are), else of a contiguous host copy. As few torch calls as can be: on
    the event loop of a small request they are a noticeable part of the answer's cost."""
    # detach() makes a new tensor object (2 of the 10 torch calls on the loop of a batched /quantize); the
    # service's results have no autograd graph to leave.
    t = tensor.detach() if tensor.requires_grad else tensor
    if not t.is_cpu:  # not t.device.type != "cpu": that makes a device object (0.1 us against 0.6, our CPU)
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    t = _to_native(t)
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype not in _NUMPY_DTYPES:  # bfloat16: numpy has no such dtype
        t = t.reshape(-1).view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


def dump_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> bytes:
    """``safetensors_parts`` joined into one bytes object; ``parse_safetensors`` reads it back."""
    return b"".join(safetensors_parts(tensors, metadata))


_meta_str = wire.meta_str  # metadata value -> string, as the format writes it


def meta_int(metadata: dict[str, str], key: str, default: int | None = None) -> int | None:
    """An integer metadata value (422 naming the key if it is not one)."""
    try:
        return wire.meta_int(metadata, key, default)
    except wire.FormatError as exc:
        raise InvalidInput(exc.message, exc.field) from None


def meta_bool(metadata: dict[str, str], key: str) -> bool:
    """A boolean metadata value, False if absent (422 naming the key if it is not one)."""
    try:
        return wire.meta_bool(metadata, key)
    except wire.FormatError as exc:
        raise InvalidInput(exc.message, exc.field) from None
