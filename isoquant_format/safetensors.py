r"""The safetensors container on plain buffers: ``parse`` and ``write_parts`` (standard library only).

A container is an 8-byte little-endian header length N, N bytes of UTF-8 JSON header, then the tensors'
raw little-endian bytes in C order. The header maps each tensor name to ``{"dtype": code, "shape": [...],
"data_offsets": [begin, end]}`` (offsets counted from the first byte after the header) and may hold
``"__metadata__"``, a map of strings to strings. docs/FORMAT.md, "Safetensors container", says which
tensors and metadata an IsoQuant container holds.

Worked example: one tensor ``x``, U8 [3] = 1, 2, 3, and the metadata {"bits": "3"} (99 bytes in all):

    >>> container = b"".join(write_parts({"x": RawTensor("uint8", (3,), b"\x01\x02\x03")}, {"bits": 3}))
    >>> container[:8].hex(" ")  # the header length, 88, little-endian
    '58 00 00 00 00 00 00 00'
    >>> container[8:96]  # the JSON header, padded with spaces to a multiple of 8 so that the data is aligned
    b'{"__metadata__":{"bits":"3"},"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}       '
    >>> container[96:]  # the data of x
    b'\x01\x02\x03'
    >>> tensors, metadata = parse(container)
    >>> tensors["x"].dtype, tensors["x"].shape, bytes(tensors["x"].data), metadata
    ('uint8', (3,), b'\x01\x02\x03', {'bits': '3'})

``parse`` never copies tensor data: each tensor comes back as a memoryview slice of the buffer it was
given, for the caller to view with ``torch.frombuffer`` or ``numpy.frombuffer``. ``write_parts`` returns
the header and then each tensor's own buffer, which a server sends one after another and a file writer
joins. Every problem is a ``FormatError`` whose ``field`` says where it is.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import reprlib
import struct
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

# Bytes to read or write: these, or any other exporter of the buffer protocol (a numpy array, say).
Buffer = bytes | bytearray | memoryview

# safetensors dtype code -> (name, bytes per element). The names are numpy's and torch's ("float16").
# The dtypes the clients can read; the service reads only WIRE_DTYPES.
_DTYPES: dict[str, tuple[str, int]] = {
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "BOOL": ("bool", 1),
}
DTYPE_NAMES: dict[str, str] = {code: name for code, (name, _) in _DTYPES.items()}  # "F16" -> "float16"
DTYPE_CODES: dict[str, str] = {name: code for code, name in DTYPE_NAMES.items()}  # "float16" -> "F16"
ITEMSIZES: dict[str, int] = {name: size for name, size in _DTYPES.values()}  # "float16" -> 2
# The dtypes of IsoQuant containers (docs/FORMAT.md): input vectors F16/BF16/F32, codes U8, norms and
# reconstructions F32. What ``parse`` accepts unless told otherwise.
WIRE_DTYPES = ("F16", "BF16", "F32", "U8")

# Bounds beyond the format's own rules, ``parse``'s defaults. A header for the few tensors of a request
# is well under 1 KiB; the service parses it on its event loop, so these keep that parse short
# whatever a client sends.
MAX_HEADER_BYTES = 64 << 10
MAX_TENSORS = 16
MAX_NDIM = 8
# The largest dimension of a tensor without elements (whose shape has a 0): such a tensor takes no bytes,
# so the body's size cannot bound its other dimensions.
MAX_EMPTY_DIM = 1 << 32

# Values from the header are shown in messages through _show: a bounded length and nesting depth, so that
# a hostile header can neither make a message huge nor make repr() recurse past the interpreter's limit.
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxstring, _repr.maxlong = 3, 10, 60, 40


def _show(value: Any, limit: int = 200) -> str:
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FormatError(ValueError):
    """A container or metadata value that breaks the format.

    Attributes:
        message: what is wrong and what is allowed, one line.
        field: where: "header" (length, JSON, tensor count), "__metadata__", "<tensor>.dtype",
            "<tensor>.shape", "<tensor>.data_offsets", "data" (the tensors do not cover it),
            "<tensor>.data" (``write_parts``: a byte count that is not the shape's), or a metadata key
            (``meta_int`` / ``meta_bool``).
    """

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message = message
        self.field = field


class UnsupportedDtype(FormatError):
    """A tensor whose dtype is not one the reader accepts (or not a string). Its own class because the
    container may be well formed: the service answers 422 naming ``tensor`` rather than 400."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message, f"{tensor}.dtype")
        self.tensor = tensor


class RawTensor(NamedTuple):
    """One tensor of a container.

    dtype: its name ("float32"; ``DTYPE_NAMES`` lists them). shape: tuple of ints. data: its raw
    little-endian bytes in C order, ``math.prod(shape) * ITEMSIZES[dtype]`` of them (from ``parse``, a
    memoryview slice of the container)."""

    dtype: str
    shape: tuple[int, ...]
    data: Buffer


# ------------------------------------------------------------------------------------------------
# Reading


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"key {_show(repeated[0])} appears more than once")
    return dict(pairs)


def parse(
    container: Buffer,
    *,
    dtypes: Collection[str] = WIRE_DTYPES,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int | None = MAX_TENSORS,
    max_ndim: int = MAX_NDIM,
) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """A safetensors container (bytes-like, C-contiguous) -> ({name: RawTensor}, metadata).

    The tensors come in data order, each a memoryview slice of ``container`` (no copy; writable if the
    container is). The checks are the format's own, as the safetensors package makes them: the header is a
    JSON object of entries {dtype, shape, data_offsets}; each entry's byte count is its shape's; the
    entries cover the data after the header exactly, without gaps or overlaps. Beyond the format: at most
    ``max_header_bytes`` of header, ``max_tensors`` tensors (None: any number), ``max_ndim`` dimensions
    a tensor, each dimension at most the container's size, and a dtype among ``dtypes`` (safetensors
    codes, keys of ``DTYPE_NAMES``). The work is O(header), whatever the data's size.

    Raises ``FormatError`` naming the field at fault; ``UnsupportedDtype`` (a subclass) for a dtype
    outside ``dtypes``. The checks run in this order: header length, JSON, __metadata__, tensor count,
    every dtype, then each tensor's shape and offsets, then the coverage of the data."""
    view = memoryview(container).cast("B")  # bytes of any exporter, indexed by byte
    size = view.nbytes
    if size < 8:
        raise FormatError(f"safetensors body of {size} bytes is shorter than its 8-byte header length", "header")
    (header_len,) = struct.unpack_from("<Q", view)
    if header_len > min(max_header_bytes, size - 8):
        raise FormatError(
            f"safetensors header length {header_len} exceeds the body ({size} bytes) or {max_header_bytes} bytes",
            "header",
        )
    header = bytes(view[8 : 8 + header_len])
    # A service sees the same few headers over and over (same shapes, same options): their checked layout is
    # kept, keyed by the header's bytes and the container's size, which are all it depends on. Errors are not
    # kept. Only headers up to 2 KiB (the service's own are ~400 bytes): 256 of them full of one-letter metadata
    # pairs held ~6 MiB (tracemalloc: 24 MiB for 1,024), whatever a client sends.
    read = _read_header_cached if header_len <= _CACHED_HEADER_BYTES else _read_header
    spans, metadata = read(header, size, tuple(dtypes), max_tensors, max_ndim)
    data = view[8 + header_len :]
    tensors = {name: RawTensor(dtype, shape, data[begin:stop]) for begin, stop, name, dtype, shape in spans}
    return tensors, dict(metadata)


_CACHED_HEADER_BYTES = 2048


def _read_header(
    header_bytes: bytes, size: int, dtypes: tuple[str, ...], max_tensors: int | None, max_ndim: int
) -> tuple[tuple[tuple[int, int, str, str, tuple[int, ...]], ...], tuple[tuple[str, str], ...]]:
    """``parse``'s checks of a header (``size``: the whole container's bytes) -> the tensors' spans
    (begin, end, name, dtype name, shape), in data order, and the metadata's items."""
    try:
        # Strict UTF-8 (json.loads would also guess UTF-16 and UTF-32 from bytes); RecursionError is
        # what a deeply nested header raises. JSON as RFC 8259 has it, as the safetensors library reads it:
        # no NaN/Infinity literals, no repeated key, no unpaired surrogate escape.
        text = header_bytes.decode("utf-8")
        header = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
        if "\\u" in text:  # only an escape can make a surrogate: valid UTF-8 holds none
            json.dumps(header, ensure_ascii=False).encode("utf-8")  # raises on an unpaired surrogate (\ud800)
    except (ValueError, UnicodeError, RecursionError) as exc:
        reason = "it holds an unpaired surrogate" if isinstance(exc, UnicodeEncodeError) else exc or "nested too deeply"
        raise FormatError(f"safetensors header is not valid JSON: {reason}", "header") from None
    if not isinstance(header, dict):
        raise FormatError("safetensors header must be a JSON object", "header")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("safetensors __metadata__ must map strings to strings", "__metadata__")
    if max_tensors is not None and len(header) > max_tensors:
        raise FormatError(f"safetensors body holds {len(header)} tensors; at most {max_tensors} are read", "header")
    # Every dtype before any layout: a container of a dtype the reader does not take is refused as such
    # even if its layout is also wrong.
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype, str) or dtype not in dtypes:
            allowed = ", ".join(DTYPE_NAMES[code] for code in dtypes)
            raise UnsupportedDtype(f"tensor {name!r} has dtype {_show(dtype)}; allowed: {allowed}", name)
    spans = []
    for name, info in header.items():
        shape, offsets = info.get("shape"), info.get("data_offsets")
        # Each dimension at most the container's size (a tensor with elements cannot have a larger one), or
        # MAX_EMPTY_DIM in a tensor without elements ([0, 768]: an empty batch of 768-dim vectors, which a
        # small body holds and which must reach the reader's own "no vectors" answer): bounds the product
        # below and keeps huge integers out of the arithmetic and the messages.
        bound = size
        if isinstance(shape, list) and 0 in shape and not any(isinstance(d, bool) for d in shape):
            bound = max(size, MAX_EMPTY_DIM)
        if (
            not isinstance(shape, list)
            or len(shape) > max_ndim
            or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= bound for d in shape)
        ):
            raise FormatError(
                f"malformed safetensors body: tensor {name!r} needs a shape of at most {max_ndim} dimensions, each "
                f"from 0 to the body's size (to {MAX_EMPTY_DIM} in a tensor without elements); got {_show(shape)}",
                f"{name}.shape",
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= size
        ):
            raise FormatError(
                f"malformed safetensors body: tensor {name!r} has data_offsets {_show(offsets)}",
                f"{name}.data_offsets",
            )
        nbytes = math.prod(shape) * ITEMSIZES[DTYPE_NAMES[info["dtype"]]]
        if offsets[1] - offsets[0] != nbytes:
            raise FormatError(
                f"malformed safetensors body: tensor {name!r} of shape {shape} and dtype {info['dtype']} needs "
                f"{nbytes} bytes, its data_offsets {offsets} span {offsets[1] - offsets[0]}",
                f"{name}.data_offsets",
            )
        spans.append((offsets[0], offsets[1], name, DTYPE_NAMES[info["dtype"]], tuple(shape)))
    spans.sort()
    data_bytes = size - 8 - len(header_bytes)
    end = 0
    for begin, stop, name, _, _ in spans:
        if begin != end:
            raise FormatError(
                f"malformed safetensors body: tensor {name!r} starts at byte {begin} of the data, expected {end} "
                "(the tensors must cover the data without gaps or overlaps)",
                f"{name}.data_offsets",
            )
        end = stop
    if end != data_bytes:
        raise FormatError(
            f"malformed safetensors body: the tensors cover {end} bytes of data, the body holds {data_bytes}",
            "data",
        )
    return tuple(spans), tuple(metadata.items())


_read_header_cached = functools.lru_cache(maxsize=256)(_read_header)


# ------------------------------------------------------------------------------------------------
# Writing


def write_parts(
    tensors: Mapping[str, RawTensor | tuple[str, Sequence[int], Buffer]], metadata: Mapping[str, Any] | None = None
) -> list[bytes | memoryview]:
    """Tensors and metadata -> a container as a list of buffers: first the 8-byte header length and the
    JSON header together (bytes), then each non-empty tensor's data as a memoryview of the buffer given
    (no copy). ``b"".join`` of the list is the container; a server can send the parts one after another.

    ``tensors`` maps a name to (dtype name, shape, little-endian C-order bytes), written in that order.
    Metadata values become strings by ``meta_str``; None values are left out. The header is padded with
    spaces to a multiple of 8 bytes, so the data starts 8-byte aligned in a buffer that is; each tensor
    then is aligned if those before it end on a multiple of its element size (list larger elements
    first for that). Raises ``FormatError`` for an unknown dtype or a byte count that is not the shape's."""
    specs = []
    parts: list[bytes | memoryview] = []
    for name, (dtype, shape, data) in tensors.items():
        spec = _spec(name, dtype, shape)
        view = memoryview(data).cast("B")
        if view.nbytes != spec[3]:
            raise FormatError(
                f"tensor {name!r} of shape {list(spec[2])} and dtype {dtype} needs {spec[3]} bytes; got {view.nbytes}",
                f"{name}.data",
            )
        specs.append(spec)
        if spec[3]:
            parts.append(view)
    return [_header(tuple(specs), _meta(metadata)), *parts]


def write_header(
    tensors: Mapping[str, tuple[str, Sequence[int]]], metadata: Mapping[str, Any] | None = None
) -> bytes:
    """The first part of ``write_parts`` (the 8-byte header length and the JSON header) for tensors of these
    (dtype name, shape), in that order, without their data: a writer that keeps the header of answers of one
    layout builds it from the layout alone. Raises ``FormatError`` as ``write_parts`` does for a name or dtype."""
    return _header(tuple(_spec(name, dtype, shape) for name, (dtype, shape) in tensors.items()), _meta(metadata))


def _spec(name: str, dtype: str, shape: Sequence[int]) -> tuple[str, str, tuple[int, ...], int]:
    """(name, dtype code, shape, bytes) of a tensor entry, checked."""
    if name == "__metadata__":
        raise FormatError("a tensor cannot be named __metadata__ (the header's metadata key)", name)
    if dtype not in DTYPE_CODES:
        raise FormatError(f"tensor {name!r} has dtype {dtype!r}; known: {', '.join(DTYPE_CODES)}", f"{name}.dtype")
    # Plain ints: a shape of numpy integers writes as one of ints, and a float dimension is refused (TypeError)
    # rather than sharing a cached header with the int shape it equals.
    shape = tuple(operator.index(d) for d in shape)
    return name, DTYPE_CODES[dtype], shape, math.prod(shape) * ITEMSIZES[dtype]


def _meta(metadata: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """Metadata as the header's (key, string) pairs: values by ``meta_str``, None values left out."""
    return tuple((str(k), meta_str(v)) for k, v in (metadata or {}).items() if v is not None)


@functools.lru_cache(maxsize=256)
def _header(specs: tuple[tuple[str, str, tuple[int, ...], int], ...], meta: tuple[tuple[str, str], ...]) -> bytes:
    """The 8-byte length and the padded JSON header of tensors (name, dtype code, shape, bytes) and metadata
    (strings). Kept: a service writes the same few headers over and over, and on its event loop the JSON
    encoding took 6% of the event loop's time for a 1-vector /quantize (cProfile, our 2-core CPU)."""
    header: dict[str, Any] = {"__metadata__": dict(meta)} if meta else {}
    offset = 0
    for name, code, shape, nbytes in specs:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


# ------------------------------------------------------------------------------------------------
# Metadata values (every value in a container is a string)


def meta_str(value: Any) -> str:
    """A metadata value as the format writes it (docs/FORMAT.md): booleans "true" / "false", floats by
    ``repr`` (the shortest string that reads back the same float), lists and tuples as JSON lists
    (``shape``: "[2, 64]"), everything else (integers, strings) by ``str``."""
    if type(value) is str:  # the common case first: descriptors are mostly strings
        return value
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(float(value))  # float(): numpy's float64 repr is "np.float64(0.5)"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def meta_int(metadata: Mapping[str, str], key: str, default: int | None = None) -> int | None:
    """The integer at ``key`` (surrounding spaces allowed), or ``default`` if the key is absent.
    FormatError naming the key if the value is not an integer."""
    if key not in metadata:
        return default
    try:
        return int(metadata[key].strip())
    except ValueError:
        raise FormatError(f"metadata {key!r} must be an integer; got {metadata[key]!r}", key) from None


def meta_bool(metadata: Mapping[str, str], key: str) -> bool:
    """The boolean at ``key``: true / 1 / yes or false / 0 / no / empty, any case; False if absent.
    FormatError naming the key otherwise."""
    value = metadata.get(key, "false").strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise FormatError(f"metadata {key!r} must be true or false; got {metadata[key]!r}", key)
