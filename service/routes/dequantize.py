"""POST /dequantize: codes + norms + descriptor -> reconstruction (JSON or safetensors)."""

from __future__ import annotations

import functools

import torch
from fastapi import APIRouter, Depends, Request, Response

from service import codec, validate
from service.engine import DequantizeResult, Stats
from service.errors import InvalidInput
from service.routes.common import BODY_RESPONSES, admitted, answer, authorized, offload
from service.schemas import Array, DequantizeRequest, DequantizeResponse, Descriptor, Distortion
from service.settings import Settings

router = APIRouter(tags=["quantize"])

BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            codec.JSON: {"schema": {"$ref": "#/components/schemas/DequantizeRequest"}},
            codec.SAFETENSORS: {
                "schema": {"type": "string", "format": "binary"},
                "description": "the /quantize container: tensors 'codes', 'norms' (+ optional 'reference'), "
                "descriptor in metadata (docs/FORMAT.md)",
            },
        },
    }
}


class Parsed:
    __slots__ = ("descriptor", "codes", "norms", "reference", "dtype")


def parse(body: bytes, fmt: str, settings: Settings) -> Parsed:
    """Body -> validated descriptor, codes uint8 [..., code_bytes], norms float32 [...], optional reference
    [..., dim] and the output dtype. Runs in a thread."""
    p = Parsed()
    if fmt == "json":
        request = validate.model(DequantizeRequest, codec.parse_json(body))
        descriptor = request.quantizer
        p.codes = codec.array_to_tensor(request.codes, "codes", ("uint8",))
        p.norms = codec.array_to_tensor(request.norms, "norms", ("float32",))
        reference = request.reference
        if isinstance(reference, dict):
            p.reference = codec.array_to_tensor(
                validate.model(Array, reference, "reference"), "reference", tuple(settings.dtypes)
            )
        elif isinstance(reference, list):
            p.reference = codec.nested_to_tensor(reference, "reference")
        elif reference is None:
            p.reference = None
        else:
            raise InvalidInput("reference must be an array object or nested lists of numbers", "reference")
        dtype = request.dtype
    else:
        tensors, meta = codec.parse_safetensors(body)
        for name in ("codes", "norms"):
            if name not in tensors:
                raise InvalidInput(
                    f"the container has no tensor {name!r} (it has {sorted(tensors)})", name, type="missing_field"
                )
        p.codes, p.norms, p.reference = tensors["codes"], tensors["norms"], tensors.get("reference")
        if len(meta) <= _CACHED_METADATA_KEYS:
            descriptor, dtype = _cached_descriptor(tuple(meta.items()))
        else:
            descriptor, dtype = _metadata_descriptor(meta)
        for name, tensor, want in (("codes", p.codes, torch.uint8), ("norms", p.norms, torch.float32)):
            if tensor.dtype != want:
                raise InvalidInput(
                    f"{name} must be {codec.dtype_name(want)}; got {codec.dtype_name(tensor.dtype)}", name
                )
    variant = validate.variant(settings, descriptor.variant, "quantizer.variant")
    dim = validate.dim(settings, descriptor.dim, "quantizer.dim")
    bits = validate.bits(settings, descriptor.bits, "quantizer.bits")
    seed = validate.seed(settings, descriptor.seed, "quantizer.seed")
    p.dtype = codec.DTYPES[validate.dtype(settings, dtype)]
    p.descriptor = {
        "variant": variant,
        "dim": dim,
        "bits": bits,
        "seed": seed,
        "fingerprint": descriptor.fingerprint,
        "format_version": descriptor.format_version,
    }
    need = validate.code_bytes(variant, dim, bits)
    if p.codes.ndim < 1 or p.codes.shape[-1] != need:
        raise InvalidInput(
            f"codes must be [..., {need}] ({need} bytes a vector for {variant}, dim={dim}, bits={bits}); got shape "
            f"{list(p.codes.shape)}: truncated codes or codes of another dim/bits",
            "codes.shape" if fmt == "json" else "codes",
            type="shape_mismatch",
        )
    lead = list(p.codes.shape[:-1])
    if list(p.norms.shape) != lead:
        raise InvalidInput(
            f"norms must have shape {lead} (the codes' leading shape); got {list(p.norms.shape)}",
            "norms.shape" if fmt == "json" else "norms",
            type="shape_mismatch",
        )
    validate.count(settings, p.norms.numel(), "codes")
    if p.reference is not None:
        name = codec.dtype_name(p.reference.dtype)
        if name not in settings.dtypes:
            raise InvalidInput(
                f"reference dtype {name!r} is not served; allowed: {', '.join(settings.dtypes)}",
                "reference",
                type="unsupported_value",
            )
        if list(p.reference.shape) != lead + [dim]:
            raise InvalidInput(
                f"reference must have shape {lead + [dim]}; got {list(p.reference.shape)}",
                "reference",
                type="shape_mismatch",
            )
        # NaN/Inf in the reference are refused on the device (Engine.dequantize_job): parsing stays O(1).
    return p


def _metadata_descriptor(meta: dict[str, str]) -> tuple[Descriptor, str]:
    """A container's metadata -> its quantizer descriptor (checked as a ``Descriptor``, not yet against what this
    server serves) and the dtype it asks for; 422 naming the key at fault."""
    fields = {key: meta.get(key) for key in ("variant", "fingerprint")}
    for key in ("dim", "bits", "seed", "format_version"):
        fields[key] = codec.meta_int(meta, key)
    missing = [k for k, v in fields.items() if v is None and k != "format_version"]
    if missing:
        raise InvalidInput(
            f"metadata lacks {', '.join(missing)} (the quantizer descriptor)", missing[0], type="missing_field"
        )
    if fields["format_version"] is None:
        fields.pop("format_version")
    return validate.model(Descriptor, fields, "quantizer"), meta.get("dtype", "float32")


# Metadata of at most this many keys is looked up in _cached_descriptor (a /quantize answer posted back has 11).
_CACHED_METADATA_KEYS = 16


@functools.lru_cache(maxsize=64)
def _cached_descriptor(items: tuple[tuple[str, str], ...]) -> tuple[Descriptor, str]:
    """``_metadata_descriptor`` of the metadata with these items, kept: a client sends the same descriptor over and
    over, and reading it (four integers, the model's validation) took 3.0 us of the event loop a request, a lookup
    here 0.5 (our 2-core CPU). It depends on nothing else (what the server serves
    is checked after, on every request), and errors are not kept. The descriptor is only read. At most 64 entries
    of at most 16 keys each, whose strings fit in the 64 KiB header (codec.parse_safetensors): a few MiB whatever a
    client sends."""
    return _metadata_descriptor(dict(items))


def encode(result: DequantizeResult, p: Parsed, fmt: str) -> bytes | list:
    """Result -> JSON body or safetensors parts."""
    if fmt == "json":
        response = DequantizeResponse(
            vectors=codec.tensor_to_array(result.vectors),
            distortion=Distortion(**result.stats.as_dict()) if result.stats is not None else None,
        )
        return response.model_dump_json(exclude_none=True).encode()
    if result.stats is None:
        # No reference (every batched request): the header comes from _vectors_answer_header's cache.
        header = _vectors_answer_header(tuple(p.descriptor.items()), result.vectors.shape, result.vectors.dtype)
        return [header, *codec.tensor_parts(result.vectors)]
    return codec.safetensors_parts(*_container(p.descriptor, result.vectors, result.stats))


def _container(
    descriptor: dict, vectors: torch.Tensor, stats: Stats | None
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The tensors and metadata of a safetensors answer."""
    metadata = {**descriptor, "dtype": codec.dtype_name(vectors.dtype)}
    if stats is not None:
        metadata.update(stats.as_dict())
    return {"vectors": vectors}, metadata


# (Keyed by equality: the descriptor's values are strictly typed (Descriptor, Quantizer), so no 1 and True or
# 1.0, which the header would write differently, can share an entry.)
@functools.lru_cache(maxsize=256)
def _vectors_answer_header(descriptor: tuple[tuple[str, object], ...], shape: torch.Size, dtype: torch.dtype) -> bytes:
    """The first part (length and JSON header) of a safetensors answer without distortion, which depends on
    nothing but these arguments: the same bytes for every request of one quantizer, shape and dtype. Built by
    the general path's ``_container`` from a stand-in of that shape and dtype on the meta device (no memory), and
    ``codec.safetensors_header``, the header ``codec.safetensors_parts`` writes. Why kept: building the metadata
    and its strings on every answer was ~35 of a batched 1-vector /dequantize's ~515 Python calls on the event
    loop (cProfile, our 2-core CPU)."""
    vectors = torch.empty(shape, dtype=dtype, device="meta")
    return codec.safetensors_header(*_container(dict(descriptor), vectors, None))


@router.post(
    "/dequantize",
    response_model=DequantizeResponse,
    summary="Reconstruct vectors from codes",
    description="Body: JSON (DequantizeRequest; a /quantize JSON response is valid as is) or the safetensors "
    "container /quantize returns. The descriptor's fingerprint must match this server's quantizer.",
    openapi_extra=BODY_DOC,
    dependencies=[Depends(authorized)],
    responses=BODY_RESPONSES,
)
async def dequantize(request: Request) -> Response:
    a = await admitted(request, parse)
    p = a.parsed
    with a.ticket:
        result = await a.engine.dequantize(p.descriptor, p.codes, p.norms, p.reference, p.dtype, ticket=a.ticket)
    content = await offload(a.out_fmt, codec.tensor_nbytes(result.vectors), encode, result, p, a.out_fmt)
    bytes_in = codec.tensor_nbytes(p.codes) + codec.tensor_nbytes(p.norms)
    a.state.metrics.observe_op("dequantize", p.norms.numel(), bytes_in, codec.tensor_nbytes(result.vectors))
    return answer(content, a.out_fmt)
