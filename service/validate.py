"""Cheap checks of request options against what this server serves, done before any work is queued.
Every refusal names the field and lists the allowed values."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ValidationError

from kernels import INPUT_DTYPES, MAX_BITS, MAX_DIM, MIN_BITS, MIN_DIM, VARIANTS
from kernels.packing import packed_bytes
from kernels.quantizer import MAX_SEED
from kernels.rotations import coded_dim
from service.codec import dtype_name
from service.errors import ApiError, InvalidInput
from service.settings import Settings


def _listing(values) -> str:
    return ", ".join(str(v) for v in values)


def _refuse(what: str, value: object, served: str, setting: str, supported: bool, field: str) -> InvalidInput:
    """422 unsupported_value: the value, what is served, and, for a value the library supports but this server
    does not serve, the setting that would serve it (an operator's fix, not the client's)."""
    message = f"{what} {value!r} is not served; allowed: {served}"
    if supported:
        message += f" (the library supports it: add it to the server's {setting} setting to serve it)"
    return InvalidInput(message, field, type="unsupported_value")


def _among(value: object, names) -> bool:
    return isinstance(value, str) and value in names  # a JSON list or object as a value is not hashable


def variant(settings: Settings, value: object, field: str = "variant") -> str:
    if not isinstance(value, str) or value not in settings.variants:
        served = _listing(settings.variants)
        raise _refuse("variant", value, served, "ISOQUANT_VARIANTS", _among(value, VARIANTS), field)
    return value


def bits(settings: Settings, value: object, field: str = "bits") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in settings.bits:
        supported = isinstance(value, int) and not isinstance(value, bool) and MIN_BITS <= value <= MAX_BITS
        raise _refuse("bits", value, _listing(settings.bits), "ISOQUANT_BITS", supported, field)
    return value


def dim(settings: Settings, value: object, field: str = "dim") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not settings.serves_dim(value):
        supported = isinstance(value, int) and not isinstance(value, bool) and MIN_DIM <= value <= MAX_DIM
        raise _refuse("dim", value, settings.dims_text(), "ISOQUANT_DIMS", supported, field)
    return value


def seed(settings: Settings, value: object, field: str = "seed") -> int:
    if value is None:
        return settings.default_seed
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InvalidInput(f"seed must be an integer from 0 to 2^64-1; got {value!r}", field)
    return value


def dtype(settings: Settings, value: object, field: str = "dtype") -> str:
    if not isinstance(value, str) or value not in settings.dtypes:
        raise _refuse("dtype", value, _listing(settings.dtypes), "ISOQUANT_DTYPES", _among(value, INPUT_DTYPES), field)
    return value


def vectors(settings: Settings, x: torch.Tensor, field: str = "vectors") -> int:
    """x [..., dim]: a served float dtype, a served dim, 1..max_vectors vectors. Returns the count.
    (NaN/Inf are refused by the quantizer itself, on the device, in the same pass as the norms.)"""
    name = dtype_name(x.dtype)
    if name not in settings.dtypes:
        served = _listing(settings.dtypes)
        raise _refuse("vectors dtype", name, served, "ISOQUANT_DTYPES", _among(name, INPUT_DTYPES), field)
    if x.ndim < 1:
        raise InvalidInput("vectors must have at least one dimension [..., dim]", field)
    if x.numel() == 0:
        # Before the dim check: {"vectors": []} has shape [0], whose "dim 0" is not the problem.
        raise InvalidInput(f"the request holds no vectors (shape {list(x.shape)}); send at least one", field)
    dim(settings, int(x.shape[-1]), field)
    return count(settings, math.prod(x.shape[:-1]), field)


def count(settings: Settings, n: int, field: str) -> int:
    if n < 1:
        raise InvalidInput("the request holds no vectors; send at least one", field)
    if n > settings.max_vectors:
        raise ApiError(
            f"{n} vectors exceed the limit of {settings.max_vectors} per request; split the batch",
            field,
            status=413,
            type="too_many_vectors",
        )
    return n


def code_bytes(variant_name: str, d: int, b: int) -> int:
    """Bytes of packed codes per vector for (variant, dim, bits), as docs/FORMAT.md lays them out."""
    return packed_bytes(coded_dim(variant_name, d), b)


def model(cls: type[BaseModel], data: object, prefix: str = ""):
    """Validate ``data`` with a pydantic model; the first error becomes a 422 naming its field."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc, prefix) from None


def from_pydantic(exc: ValidationError, prefix: str = "") -> InvalidInput:
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"])
    field = ".".join(p for p in (prefix, loc) if p) or None
    kind = (
        "missing_field"
        if first["type"] == "missing"
        else ("unknown_field" if first["type"] == "extra_forbidden" else "invalid_value")
    )
    message = f"{field}: {first['msg']}" if field else first["msg"]
    if kind == "unknown_field":
        message = f"{field} is not a known field"
    return InvalidInput(message, field, type=kind)
