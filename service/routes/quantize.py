"""POST /quantize: vectors -> codes, norms and the quantizer descriptor (JSON or safetensors)."""

from __future__ import annotations

import functools
import json

import torch
from fastapi import APIRouter, Depends, Request, Response

from service import codec, validate
from service.engine import QuantizeResult
from service.errors import InvalidInput
from service.routes.common import BODY_RESPONSES, admitted, answer, authorized, offload
from service.schemas import Array, Descriptor, Distortion, QuantizeRequest, QuantizeResponse
from service.settings import Settings

router = APIRouter(tags=["quantize"])

BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            codec.JSON: {"schema": {"$ref": "#/components/schemas/QuantizeRequest"}},
            codec.SAFETENSORS: {
                "schema": {"type": "string", "format": "binary"},
                "description": "safetensors with tensor 'vectors' [..., dim]; options in metadata (docs/FORMAT.md)",
            },
        },
    }
}


class Parsed:
    __slots__ = ("x", "variant", "bits", "seed", "want_reconstruction", "want_distortion")


def parse(body: bytes, fmt: str, settings: Settings) -> Parsed:
    """Body -> validated options and the vectors tensor (CPU). Runs in a thread: decoding is O(body)."""
    p = Parsed()
    if fmt == "json":
        request = validate.model(QuantizeRequest, codec.parse_json(body))
        if isinstance(request.vectors, dict):
            p.x = codec.array_to_tensor(
                validate.model(Array, request.vectors, "vectors"), "vectors", tuple(settings.dtypes)
            )
        elif isinstance(request.vectors, list):
            p.x = codec.nested_to_tensor(request.vectors, "vectors")
        else:
            raise InvalidInput(
                "vectors must be an array object {data, dtype, shape} or nested lists of numbers", "vectors"
            )
        variant, bits, seed = request.variant, request.bits, request.seed
        p.want_reconstruction, p.want_distortion = request.return_reconstruction, request.return_distortion
    else:
        tensors, meta = codec.parse_safetensors(body)
        if "vectors" not in tensors:
            raise InvalidInput(
                f"the container has no tensor 'vectors' (it has {sorted(tensors)})", "vectors", type="missing_field"
            )
        p.x = tensors["vectors"]
        variant = meta.get("variant", "full")
        bits = codec.meta_int(meta, "bits", 3)
        seed = codec.meta_int(meta, "seed")
        p.want_reconstruction = codec.meta_bool(meta, "return_reconstruction")
        p.want_distortion = codec.meta_bool(meta, "return_distortion")
    p.variant = validate.variant(settings, variant)
    p.bits = validate.bits(settings, bits)
    p.seed = validate.seed(settings, seed)
    validate.vectors(settings, p.x)
    return p


def encode(result: QuantizeResult, x: torch.Tensor, fmt: str) -> tuple[bytes | list, int]:
    """Result -> (JSON body or safetensors parts, tensor bytes returned)."""
    bytes_in = codec.tensor_nbytes(x)
    bytes_out = codec.tensor_nbytes(result.codes) + codec.tensor_nbytes(result.norms)
    ratio = bytes_in / bytes_out
    returned = bytes_out + (codec.tensor_nbytes(result.reconstruction) if result.reconstruction is not None else 0)
    if fmt == "json":
        response = QuantizeResponse(
            quantizer=Descriptor(**result.descriptor),
            codes=codec.tensor_to_array(result.codes),
            norms=codec.tensor_to_array(result.norms),
            shape=list(x.shape),
            dtype=codec.dtype_name(x.dtype),
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            compression_ratio=ratio,
            reconstruction=codec.tensor_to_array(result.reconstruction) if result.reconstruction is not None else None,
            distortion=Distortion(**result.stats.as_dict()) if result.stats is not None else None,
        )
        return response.model_dump_json(exclude_none=True).encode(), returned
    if result.reconstruction is None and result.stats is None:
        # Codes only (every batched request): the header comes from _codes_answer_header's cache.
        header = _codes_answer_header(
            tuple(result.descriptor.items()),
            x.shape,
            x.dtype,
            result.codes.shape,
            result.codes.dtype,
            result.norms.shape,
            result.norms.dtype,
        )
        return [header, *codec.tensor_parts(result.codes, result.norms)], returned
    return codec.safetensors_parts(*_container(result, x, bytes_in, bytes_out, ratio)), returned


def _container(
    result: QuantizeResult, x: torch.Tensor, bytes_in: int, bytes_out: int, ratio: float
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The tensors and metadata of a safetensors answer."""
    tensors = {"codes": result.codes, "norms": result.norms}
    if result.reconstruction is not None:
        tensors["reconstruction"] = result.reconstruction
    metadata = {
        **result.descriptor,
        "shape": json.dumps(list(x.shape)),
        # The input's dtype (docs/FORMAT.md): /dequantize reads this key as the dtype to answer in, so the
        # container posted back as it is restores float16 vectors as float16, not float32 at twice the size.
        "dtype": codec.dtype_name(x.dtype),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "compression_ratio": ratio,
    }
    if result.stats is not None:
        metadata.update(result.stats.as_dict())
    return tensors, metadata


# (Keyed by equality: the descriptor's values are strictly typed (Descriptor, Quantizer), so no 1 and True or
# 1.0, which the header would write differently, can share an entry.)
@functools.lru_cache(maxsize=256)
def _codes_answer_header(
    descriptor: tuple[tuple[str, object], ...],
    shape: torch.Size,
    dtype: torch.dtype,
    codes_shape: torch.Size,
    codes_dtype: torch.dtype,
    norms_shape: torch.Size,
    norms_dtype: torch.dtype,
) -> bytes:
    """The first part (length and JSON header) of a codes-only safetensors answer, which depends on nothing but
    these arguments: the same bytes for every request of one quantizer, shape and dtype. Built by the general
    path's ``_container`` from stand-ins of those shapes and dtypes on the meta device (no memory), and
    ``codec.safetensors_header``, the header ``codec.safetensors_parts`` writes. Why kept: building the metadata
    and its strings on every answer was ~60 of a batched 1-vector /quantize's ~540 Python calls on the event loop
    (cProfile, our 2-core CPU)."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    codes = torch.empty(codes_shape, dtype=codes_dtype, device="meta")
    norms = torch.empty(norms_shape, dtype=norms_dtype, device="meta")
    bytes_in = codec.tensor_nbytes(x)
    bytes_out = codec.tensor_nbytes(codes) + codec.tensor_nbytes(norms)
    stand_in = QuantizeResult(codes, norms, dict(descriptor), None, None)
    return codec.safetensors_header(*_container(stand_in, x, bytes_in, bytes_out, bytes_in / bytes_out))


@router.post(
    "/quantize",
    response_model=QuantizeResponse,
    summary="Quantize a batch of vectors",
    description="Body: JSON (QuantizeRequest) or safetensors; the answer follows the request's format "
    "unless Accept asks for the other. Errors use the one error shape.",
    openapi_extra=BODY_DOC,
    dependencies=[Depends(authorized)],
    responses=BODY_RESPONSES,
)
async def quantize(request: Request) -> Response:
    a = await admitted(request, parse)
    p = a.parsed
    with a.ticket:
        result = await a.engine.quantize(
            p.variant,
            p.bits,
            p.seed,
            p.x,
            p.want_reconstruction,
            p.want_distortion,
            ticket=a.ticket,
        )
    bytes_in = codec.tensor_nbytes(p.x)
    content, returned = await offload(a.out_fmt, bytes_in, encode, result, p.x, a.out_fmt)
    a.state.metrics.observe_op("quantize", result.norms.numel(), bytes_in, returned)
    return answer(content, a.out_fmt)
