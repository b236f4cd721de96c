"""The IsoQuant wire format, torch-free and numpy-free: one package that the service and the clients
both import, so that the container's rules, the descriptor and the dtype tables live in one place.

- ``FORMAT_VERSION`` and ``DESCRIPTOR_FIELDS``: the quantizer descriptor (docs/FORMAT.md, "A quantizer");
  ``VARIANT_IDS`` / ``VARIANTS``: the variants' names and stable ids.
- The dtype tables: safetensors codes <-> names <-> item sizes.
- ``parse`` / ``write_parts``: the safetensors container on bytes, bytearray or memoryview, without copies.
- ``meta_str`` / ``meta_int`` / ``meta_bool``: metadata values to and from their strings.
- ``FormatError`` (and ``UnsupportedDtype``): what the above raise, with the field at fault.

Standard library only: the clients' install must not need torch (tests/clients/test_no_torch.py), and
the adapters (``service.codec`` for torch, ``clients._codec`` for numpy) view the bytes this package
hands them.
"""

from isoquant_format.safetensors import (
    DTYPE_CODES,
    DTYPE_NAMES,
    ITEMSIZES,
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

__all__ = [
    "DESCRIPTOR_FIELDS",
    "DTYPE_CODES",
    "DTYPE_NAMES",
    "FORMAT_VERSION",
    "ITEMSIZES",
    "MAX_HEADER_BYTES",
    "MAX_NDIM",
    "MAX_TENSORS",
    "WIRE_DTYPES",
    "FormatError",
    "RawTensor",
    "UnsupportedDtype",
    "VARIANTS",
    "VARIANT_IDS",
    "meta_bool",
    "meta_int",
    "meta_str",
    "parse",
    "write_parts",
]
