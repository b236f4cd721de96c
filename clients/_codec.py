"""Arrays <-> wire bodies for the client: safetensors containers and JSON base64 arrays, and
``PackedCodes``, the codes of a batch with their quantizer descriptor.

numpy and the torch-free ``isoquant_format`` package (the container, the descriptor and the dtype
tables, shared with the service) only: nothing here imports torch or ``kernels``. Nothing is ever
unpickled (``.npy`` files are read with ``allow_pickle=False``).
"""

from __future__ import annotations

import base64
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from isoquant_format import DESCRIPTOR_FIELDS, DTYPE_NAMES, FORMAT_VERSION, FormatError, RawTensor, parse, write_parts
from isoquant_format import meta_str as _meta_str  # noqa: F401  (the name this module had)

DESCRIPTOR_KEYS = DESCRIPTOR_FIELDS  # the SDK's name for them
# dtypes the service takes as input vectors (bfloat16 arrives widened: numpy has no bfloat16).
WIRE_FLOATS = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}
_NAME_TO_NP = {"float16": np.float16, "float32": np.float32, "uint8": np.uint8}
# The client reads files too (``load_array``), not only the service's answers: every dtype of the table,
# and bounds of a reader of files rather than the service's (64 KiB, 16 tensors, 8 dimensions): the
# safetensors package's own header bound, any number of tensors, numpy's dimension bound.
_READ_LIMITS: dict[str, Any] = {
    "dtypes": tuple(DTYPE_NAMES), "max_header_bytes": 100_000_000, "max_tensors": None, "max_ndim": 64}


# ------------------------------------------------------------------------------------------------
# Inputs


def as_vectors(vectors: Any, name: str = "vectors") -> np.ndarray:
    """numpy array, torch tensor (duck-typed: anything with ``.detach().cpu().numpy()``) or nested lists
    [..., dim] -> a C-contiguous little-endian float16 or float32 numpy array of the same shape.

    float16 and float32 are kept; bfloat16 tensors are widened to float32 (exact); float64 and integer
    arrays become float32. Booleans, complex numbers and objects raise TypeError; a 0-d value raises
    ValueError."""
    if hasattr(vectors, "detach") and hasattr(vectors, "cpu") and hasattr(vectors, "numpy"):
        tensor = vectors.detach().cpu()
        if str(getattr(tensor, "dtype", "")) == "torch.bfloat16":
            tensor = tensor.float()  # numpy has no bfloat16; widening is exact
        array = tensor.numpy()
    else:
        array = np.asarray(vectors)
    if array.dtype.kind == "f" and array.dtype.itemsize in (2, 4):
        target = array.dtype
    elif array.dtype.kind in "fiu":
        target = np.dtype(np.float32)
    else:
        raise TypeError(f"{name} must hold real numbers (float16/float32, or anything castable to float32); "
                        f"got dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{name} must have shape [..., dim]; got a scalar")
    with np.errstate(over="ignore"):  # float64 out of float32 range -> inf, which the server refuses by field
        return np.ascontiguousarray(array, dtype=target.newbyteorder("<"))


def load_array(path: str | os.PathLike, tensor: str | None = None) -> np.ndarray:
    """An array from ``.npy`` (no pickle) or ``.safetensors`` (the tensor named ``tensor``; by default the
    only tensor, else one named ``vectors``). Raises ValueError with a one-line reason on a bad file."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:  # object arrays need pickle: refused
            raise ValueError(f"{path}: cannot read as .npy without pickle: {exc}") from None
    if path.endswith(".safetensors"):
        with open(path, "rb") as f:
            tensors, _ = read_safetensors(f.read(), source=path)
        if tensor is None:
            if len(tensors) == 1:
                return next(iter(tensors.values()))
            if "vectors" in tensors:
                return tensors["vectors"]
            raise ValueError(f"{path} holds tensors {sorted(tensors)}; name one with --tensor")
        if tensor not in tensors:
            raise ValueError(f"{path} has no tensor {tensor!r}; it holds {sorted(tensors)}")
        return tensors[tensor]
    raise ValueError(f"{path}: unknown file type; use .npy or .safetensors")


def save_array(path: str | os.PathLike, array: np.ndarray, name: str = "vectors",
               metadata: dict[str, str] | None = None) -> None:
    """Write ``array`` to ``.npy`` or to ``.safetensors`` (as tensor ``name``)."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        np.save(path, array, allow_pickle=False)
    elif path.endswith(".safetensors"):
        _write_atomically(path, write_safetensors({name: array}, metadata or {}))
    else:
        raise ValueError(f"{path}: unknown file type; use .npy or .safetensors")


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Safetensors


def write_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> bytes:
    """Tensors and metadata -> safetensors bytes (metadata values become strings by
    ``isoquant_format.meta_str``; None values are dropped). Tensors are written larger elements first
    (as the safetensors package orders them), so that every tensor's data is aligned in the container."""
    raw = {}
    for name, value in sorted(tensors.items(), key=lambda item: -item[1].dtype.itemsize):  # stable: ties keep order
        array = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        raw[name] = RawTensor(array.dtype.name, array.shape, array.reshape(-1).view(np.uint8))
    return b"".join(write_parts(raw, metadata))


def read_safetensors(data: bytes | bytearray | memoryview,
                     source: str = "safetensors body") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """safetensors bytes -> (numpy arrays, metadata). BF16 tensors are widened to float32 (exact).
    Raises ValueError naming ``source`` when the container is malformed or holds a dtype numpy lacks.

    The arrays view ``data`` (``numpy.frombuffer`` on ``isoquant_format.parse``'s slices); immutable
    ``bytes`` are first copied once into a bytearray, so that the arrays are writable as before."""
    if isinstance(data, bytes):
        data = bytearray(data)
    try:
        entries, metadata = parse(data, **_READ_LIMITS)
    except FormatError as exc:
        raise ValueError(f"{source}: not a valid safetensors container: {exc}") from None
    tensors: dict[str, np.ndarray] = {}
    for name, (dtype, shape, raw) in entries.items():
        if dtype == "bfloat16":  # numpy has none: the high 16 bits of a float32
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            tensors[name] = bits.view(np.float32).reshape(shape)
        else:
            tensors[name] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return tensors, metadata


# ------------------------------------------------------------------------------------------------
# JSON arrays ({"data": base64, "dtype", "shape"})


def to_json_array(array: np.ndarray) -> dict:
    """numpy array (float16 | float32 | uint8) -> the service's JSON array object (little-endian, C order)."""
    name = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32", np.dtype(np.uint8): "uint8"}[
        np.dtype(array.dtype.newbyteorder("="))]
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return {"data": base64.b64encode(raw).decode("ascii"), "dtype": name, "shape": list(array.shape)}


def from_json_array(obj: Any, name: str) -> np.ndarray:
    """The service's JSON array object -> numpy array (ValueError if it is not one)."""
    try:
        dtype = np.dtype(_NAME_TO_NP[obj["dtype"]]).newbyteorder("<")
        shape = [int(s) for s in obj["shape"]]
        raw = bytearray(base64.b64decode(obj["data"], validate=True))  # bytearray: a writable array
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not a readable array object: {exc!r}") from None


# ------------------------------------------------------------------------------------------------
# Packed codes


@dataclass(eq=False)
class PackedCodes:
    """Codes of a batch of vectors with everything a decoder needs (docs/FORMAT.md).

    Attributes:
        codes: uint8 [..., code_bytes], the FORMAT.md bit layout, one row per vector.
        norms: float32 [...], the vectors' L2 norms (leading shape of the input).
        variant, dim, bits, seed, fingerprint, format_version: the quantizer descriptor.
        bytes_in: bytes of the vectors that were quantized, in the dtype they were sent (None if unknown).

    ``to_bytes()`` / ``save(path)`` write the same safetensors container as the service's binary /quantize
    answer; ``from_bytes`` / ``load`` read it (or the service's answer itself). The container can be
    POSTed to /dequantize as it is. ``kernels.Packed(codes=torch.from_numpy(p.codes),
    norms=torch.from_numpy(p.norms), **p.descriptor())`` decodes it offline.
    """

    codes: np.ndarray
    norms: np.ndarray
    variant: str
    dim: int
    bits: int
    seed: int
    fingerprint: str
    format_version: int = FORMAT_VERSION
    bytes_in: int | None = field(default=None)

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes)
        self.norms = np.asarray(self.norms)
        if self.codes.dtype != np.uint8 or self.codes.ndim < 1:
            raise ValueError(f"codes must be uint8 [..., code_bytes]; got {self.codes.dtype} {list(self.codes.shape)}")
        if self.norms.dtype != np.float32:
            raise ValueError(f"norms must be float32; got {self.norms.dtype}")
        if self.codes.shape[:-1] != self.norms.shape:
            raise ValueError(f"codes {list(self.codes.shape)} and norms {list(self.norms.shape)} must share the "
                             "leading shape")

    @property
    def shape(self) -> tuple[int, ...]:
        """Leading shape of the batch: the input's shape without its last (dim) axis."""
        return tuple(self.norms.shape)

    @property
    def n_vectors(self) -> int:
        return int(math.prod(self.shape))

    @property
    def code_bytes(self) -> int:
        """Bytes of packed codes per vector: ceil(n_coded * bits / 8)."""
        return int(self.codes.shape[-1])

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes plus float32 norms."""
        return int(self.codes.nbytes + self.norms.nbytes)

    @property
    def compression_ratio(self) -> float | None:
        """bytes_in / nbytes, when bytes_in is known."""
        return self.bytes_in / self.nbytes if self.bytes_in is not None and self.nbytes else None

    def descriptor(self) -> dict[str, Any]:
        """{variant, dim, bits, seed, fingerprint, format_version}: the /dequantize ``quantizer`` object."""
        return {k: getattr(self, k) for k in DESCRIPTOR_KEYS}

    def metadata(self) -> dict[str, Any]:
        """The container's metadata, with the keys of the service's /quantize answer."""
        meta: dict[str, Any] = {**self.descriptor(), "shape": [*self.shape, self.dim]}
        if self.bytes_in is not None:
            meta.update(bytes_in=self.bytes_in, bytes_out=self.nbytes, compression_ratio=self.compression_ratio)
        return meta

    def to_bytes(self) -> bytes:
        """The safetensors container: tensors ``codes`` and ``norms``, the descriptor in the metadata."""
        return write_safetensors({"codes": self.codes, "norms": self.norms}, self.metadata())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "codes container") -> PackedCodes:
        """Read a container written by ``to_bytes`` or answered by the service's /quantize."""
        tensors, meta = read_safetensors(data, source)
        missing = [k for k in ("codes", "norms") if k not in tensors]
        missing += [k for k in DESCRIPTOR_KEYS if k not in meta and k != "format_version"]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(missing)}: not an IsoQuant codes container")
        try:
            ints = {k: int(meta[k]) for k in ("dim", "bits", "seed")}
            version = int(meta.get("format_version", FORMAT_VERSION))
            bytes_in = int(meta["bytes_in"]) if "bytes_in" in meta else None
        except ValueError as exc:
            raise ValueError(f"{source}: bad integer in metadata: {exc}") from None
        return cls(codes=tensors["codes"], norms=tensors["norms"], variant=meta["variant"], **ints,
                   fingerprint=meta["fingerprint"], format_version=version, bytes_in=bytes_in)

    def save(self, path: str | os.PathLike) -> None:
        """Write the container to ``path`` (atomically: a temporary file, then rename)."""
        _write_atomically(os.fspath(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PackedCodes:
        path = os.fspath(path)
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), source=path)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(codes uint8 [N, code_bytes], norms float32 [N]): the batch flattened to rows."""
        return self.codes.reshape(-1, self.code_bytes), self.norms.reshape(-1)

    def __repr__(self) -> str:
        return (f"PackedCodes(shape={list(self.shape)}, variant={self.variant!r}, dim={self.dim}, bits={self.bits}, "
                f"seed={self.seed}, fingerprint={self.fingerprint!r}, nbytes={self.nbytes})")


@dataclass(frozen=True)
class Distortion:
    """Error statistics of a reconstruction x_hat against the reference x it approximates.

    mse: mean over all elements of (x - x_hat)^2; mean_relative_error / max_relative_error: mean / max
    over vectors of ||x - x_hat|| / ||x|| (0 for x = 0); n_vectors: how many vectors they cover."""

    mse: float
    mean_relative_error: float
    max_relative_error: float
    n_vectors: int

    @staticmethod
    def combine(parts: list[Distortion]) -> Distortion:
        """Statistics of the union of disjoint batches (all of the same dim): count-weighted means, max of maxima."""
        n = sum(p.n_vectors for p in parts)
        if n == 0:
            return Distortion(0.0, 0.0, 0.0, 0)
        return Distortion(
            mse=sum(p.mse * p.n_vectors for p in parts) / n,
            mean_relative_error=sum(p.mean_relative_error * p.n_vectors for p in parts) / n,
            max_relative_error=max(p.max_relative_error for p in parts),
            n_vectors=n,
        )

    def as_dict(self) -> dict[str, float]:
        return {"mse": self.mse, "mean_relative_error": self.mean_relative_error,
                "max_relative_error": self.max_relative_error, "n_vectors": self.n_vectors}
