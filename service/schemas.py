"""Request/response models of the JSON API and the one error model.

Arrays travel as ``Array``: ``{"data": <base64 of little-endian bytes>, "dtype": "float16", "shape": [...]}``
(row-major). /quantize also takes ``vectors`` as nested lists of numbers (read as float32). A /quantize
JSON response is itself a valid /dequantize request: /dequantize ignores the fields it does not use.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kernels import FORMAT_VERSION


# Requests validate strictly: JSON true is not the integer 1, "3" and 3.0 are not the integer 3, "yes" is not a
# boolean. Each is a 422 naming the field, never a silent coercion.
class Array(BaseModel):
    """A tensor as base64 of its raw little-endian bytes, C order."""

    model_config = ConfigDict(extra="forbid", strict=True)

    data: str = Field(..., description="base64 (standard alphabet, padded) of the raw little-endian bytes")
    dtype: str = Field(..., description="float16 | bfloat16 | float32 | uint8 (codes)")
    shape: list[int] = Field(..., description="row-major shape; the product times the dtype size is the byte count")


class Descriptor(BaseModel):
    """Identifies the quantizer that made a set of codes (docs/FORMAT.md)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    variant: str
    dim: int
    bits: int
    seed: int
    fingerprint: str = Field(..., description="16 hex digits; must match the server's quantizer for these parameters")
    format_version: int = FORMAT_VERSION


class Distortion(BaseModel):
    """Error statistics of a reconstruction x_hat against the vectors x it approximates."""

    mse: float = Field(..., description="mean over all elements of (x - x_hat)^2")
    mean_relative_error: float = Field(..., description="mean over vectors of ||x - x_hat|| / ||x|| (0 for x = 0)")
    max_relative_error: float = Field(..., description="max over vectors of ||x - x_hat|| / ||x||")
    mean_cosine_similarity: float = Field(
        ..., description="mean over vectors of <x, x_hat> / (||x|| ||x_hat||) (1 when both are 0)"
    )
    min_cosine_similarity: float = Field(..., description="min over vectors of the cosine similarity")


class QuantizeRequest(BaseModel):
    """POST /quantize (application/json)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Any: an Array object or nested lists, told apart and validated by the route so that errors name
    # the exact field (the OpenAPI schema says Array | array, see app.py).
    vectors: Any = Field(..., description="[..., dim] as an Array or nested lists of numbers (read as float32)")
    variant: str = Field("full", description="one of the served variants (GET /info)")
    bits: int = Field(3, description="bits per coordinate, one of the served bit widths")
    seed: int | None = Field(None, description="rotation seed, 0..2^64-1; default: the server's default seed")
    return_reconstruction: bool = Field(False, description="also return the round trip's reconstruction")
    return_distortion: bool = Field(False, description="also return error statistics of the round trip")


class QuantizeResponse(BaseModel):
    quantizer: Descriptor
    codes: Array = Field(..., description="uint8 [..., code_bytes], FORMAT.md bit layout")
    norms: Array = Field(..., description="float32 [...]")
    shape: list[int] = Field(..., description="shape of the input vectors [..., dim]")
    dtype: str = Field(
        ..., description="dtype of the input vectors (float32 for nested lists): /dequantize returns this dtype when "
        "the response is posted back as it is"
    )
    bytes_in: int = Field(..., description="bytes of the input vectors in their dtype")
    bytes_out: int = Field(..., description="bytes of codes plus norms")
    compression_ratio: float = Field(..., description="bytes_in / bytes_out")
    reconstruction: Array | None = Field(None, description="[..., dim] in the input's dtype, when asked")
    distortion: Distortion | None = None


class DequantizeRequest(BaseModel):
    """POST /dequantize (application/json). Unknown fields are ignored so that a /quantize response is valid."""

    model_config = ConfigDict(extra="ignore", strict=True)

    quantizer: Descriptor
    codes: Array
    norms: Array
    reference: Any = Field(None, description="original vectors [..., dim] to compare against (Array or nested lists)")
    dtype: str = Field(
        "float32",
        description="dtype of the returned vectors; a /quantize response holds its input's dtype here, so posted "
        "back as it is it comes back in the dtype it was sent in",
    )


class DequantizeResponse(BaseModel):
    vectors: Array
    distortion: Distortion | None = None


class ErrorDetail(BaseModel):
    type: str = Field(..., description="machine-readable class, e.g. unsupported_value, payload_too_large")
    message: str = Field(..., description="what is wrong and what is allowed")
    field: str | None = Field(None, description="dotted path of the offending field or header, if any")


class ErrorBody(BaseModel):
    """The one error shape of every 4xx/5xx answer."""

    error: ErrorDetail


def served_constraints(settings) -> dict[str, dict]:
    """JSON-schema constraints of variant, dim and bits for what ``settings`` serves: an ``enum`` of the served
    values, except for dims served as one contiguous range (the default, 2..4096), which get ``minimum`` and
    ``maximum`` rather than an enum of 4,095 numbers. For the OpenAPI schema (service/app.py)."""
    dims = settings.dims
    dim = {"minimum": dims[0], "maximum": dims[-1]} if dims[-1] - dims[0] + 1 == len(dims) else {"enum": list(dims)}
    return {"variant": {"enum": list(settings.variants)}, "dim": dim, "bits": {"enum": list(settings.bits)}}
