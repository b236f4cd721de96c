"""The IsoQuant wire format, torch-free and numpy-free: one package that the service and the clients
both import, so that the container's rules, the descriptor and the dtype tables live in one place.

- ``FORMAT_VERSION`` and ``DESCRIPTOR_FIELDS``: the quantizer descriptor (docs/FORMAT.md, "A quantizer");
  ``VARIANT_IDS`` / ``VARIANTS``: the variants' names and stable ids.
- The dtype tables: safetensors codes <-> names <-> item sizes.
- ``parse`` / ``write_parts``: the safetensors container on bytes, bytearray or memoryview, without copies;
  ``write_header``: its header alone, from the tensors' dtypes and shapes.
- ``meta_str`` / ``meta_int`` / ``meta_bool``: metadata values to and from their strings.
- ``VECTOR_DTYPES`` / ``vector_dtype``: the dtypes vectors travel in, and the one a codes container records
  (metadata ``dtype``: the vectors' dtype, restored by decoding; float32 when absent).
- ``FormatError`` (and ``UnsupportedDtype``): what the above raise, with the field at fault.

Standard library only: the clients' install must not need torch (tests/clients/test_no_torch.py), and
the adapters (``service.codec`` for torch, ``clients._codec`` for numpy) view the bytes this package
hands them.
"""

from isoquant_format.safetensors import (
    DTYPE_CODES,
    DTYPE_NAMES,
    ITEMSIZES,
    MAX_EMPTY_DIM,
    MAX_HEADER_BYTES,
    MAX_NDIM,
    MAX_TENSORS,
    WIRE_DTYPES,
    FormatError,
    RawTensor,
    UnsupportedDtype,
    meta_bool,
    meta_int,
    meta_str,
    parse,
    write_header,
    write_parts,
)

FORMAT_VERSION = 1
# The variants and their stable ids (part of the parameter generator's stream tag, docs/FORMAT.md): never
# renumber. A new rotation gets the next id here and its module in kernels/rotations/.
VARIANT_IDS = {"full": 1, "fast": 2, "2d": 3, "dense": 4, "hadamard": 5, "identity": 6, "kronecker": 7}
VARIANTS = tuple(VARIANT_IDS)
# The keys that name a quantizer, in the order docs/FORMAT.md lists them: the /dequantize ``quantizer``
# object and the metadata of every codes container.
DESCRIPTOR_FIELDS = ("variant", "dim", "bits", "seed", "fingerprint", "format_version")
# The dtypes of vectors on the wire: /quantize inputs, /dequantize outputs, and the metadata ``dtype`` of a
# codes container, the dtype of the vectors that were quantized, which decoding restores by default.
VECTOR_DTYPES = ("float16", "bfloat16", "float32")
# What a container without ``dtype`` decodes to: files written before the key existed came back float32.
DEFAULT_VECTOR_DTYPE = "float32"


def vector_dtype(metadata: dict[str, str], key: str = "dtype") -> str:
    """The vectors' dtype a container's metadata records at ``key`` (docs/FORMAT.md, "Safetensors
    container"): one of ``VECTOR_DTYPES``, ``DEFAULT_VECTOR_DTYPE`` if the key is absent. FormatError naming
    the key for any other value."""
    value = metadata.get(key)
    if value is None:
        return DEFAULT_VECTOR_DTYPE
    if value.strip() not in VECTOR_DTYPES:
        raise FormatError(f"metadata {key!r} must be one of {', '.join(VECTOR_DTYPES)}; got {value!r}", key)
    return value.strip()


__all__ = [
    "DEFAULT_VECTOR_DTYPE",
    "DESCRIPTOR_FIELDS",
    "DTYPE_CODES",
    "DTYPE_NAMES",
    "FORMAT_VERSION",
    "ITEMSIZES",
    "MAX_EMPTY_DIM",
    "MAX_HEADER_BYTES",
    "MAX_NDIM",
    "MAX_TENSORS",
    "WIRE_DTYPES",
    "FormatError",
    "RawTensor",
    "UnsupportedDtype",
    "VARIANTS",
    "VARIANT_IDS",
    "VECTOR_DTYPES",
    "meta_bool",
    "meta_int",
    "meta_str",
    "parse",
    "vector_dtype",
    "write_header",
    "write_parts",
]
