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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from isoquant_format import (
    DEFAULT_VECTOR_DTYPE,
    DESCRIPTOR_FIELDS,
    DTYPE_NAMES,
    FORMAT_VERSION,
    VECTOR_DTYPES,
    FormatError,
    RawTensor,
    parse,
    vector_dtype,
    write_parts,
)
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


@dataclass(frozen=True)
class Origin:
    """What the caller's vectors were before ``as_vectors`` made them wire-ready: ``dtype``, the dtype a
    decoder restores (the caller's if the service takes it, bfloat16 included; else float32, the dtype they
    were quantized in), and ``nbytes``, their size as given (a float64 array counts 8 bytes a coordinate: the
    compression ratio is against what the caller holds, not against the float32 copy that was sent)."""

    dtype: str
    nbytes: int
    source_dtype: str


def origin(vectors: Any, sent: np.ndarray) -> Origin:
    """The ``Origin`` of ``vectors``, whose wire-ready form is ``sent`` (``as_vectors(vectors)``)."""
    if hasattr(vectors, "detach") and hasattr(vectors, "element_size") and hasattr(vectors, "numel"):
        source = str(getattr(vectors, "dtype", "")).removeprefix("torch.")
        nbytes = int(vectors.numel()) * int(vectors.element_size())
    elif isinstance(vectors, np.ndarray):
        source, nbytes = vectors.dtype.name, int(vectors.nbytes)
    else:  # nested lists and other sequences: what was sent is all there is to compare with
        source, nbytes = sent.dtype.name, int(sent.nbytes)
    return Origin(source if source in VECTOR_DTYPES else DEFAULT_VECTOR_DTYPE, nbytes, source)


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


def check_writable(path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path`` if its folder does not exist or is not writable: checked before any
    request, so that the server's work is not lost on a typo (and the error names the path asked for, not a
    temporary file's)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise ValueError(f"{os.fspath(path)}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{os.fspath(path)}: the folder {folder} is not writable")
    if os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)} is a folder; give a file name")


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:  # name the file asked for, not the temporary one
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------------------------
# Safetensors


def write_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> bytes:
    """Tensors and metadata -> safetensors bytes (metadata values become strings by
    ``isoquant_format.meta_str``; None values are dropped). Tensors are written larger elements first
    (as the safetensors package orders them), so that every tensor's data is aligned in the container."""
    raw = {}
    for name, value in sorted(tensors.items(), key=lambda item: -item[1].dtype.itemsize):  # stable: ties keep order
        # np.require, not ascontiguousarray: that one makes a 0-d array (the norm of a single vector) 1-d.
        array = np.require(value, dtype=value.dtype.newbyteorder("<"), requirements="C")
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

_NPY_MAGIC = b"\x93NUMPY"


class NotCodesError(ValueError):
    """A file of vectors (.npy, or a container with a 'vectors' tensor and no codes) where codes were expected."""

_STATS = ("mse", "mean_relative_error", "max_relative_error", "mean_cosine_similarity", "min_cosine_similarity")


@dataclass(eq=False)
class PackedCodes:
    """Codes of a batch of vectors [..., dim] with everything a decoder needs (docs/FORMAT.md).

    Attributes:
        codes: uint8 [..., code_bytes], the FORMAT.md bit layout, one row per vector.
        norms: float32 [...], the vectors' L2 norms (leading shape of the input).
        variant, dim, bits, seed, fingerprint, format_version: the quantizer descriptor.
        bytes_in: bytes of the vectors as the caller held them (None if unknown).
        dtype: the vectors' dtype (float16, bfloat16 or float32), which ``dequantize`` restores by default;
            the container records it (metadata ``dtype``; float32 for a container written before it did).
        distortion: the round trip's error statistics when quantize asked for them (``return_distortion``).

    Like an array of vectors: ``shape`` is the vectors' shape [..., dim] (as the /quantize answer's), ``len``
    the first axis, ``packed[i]``, ``packed[2:5]``, ``packed[mask]`` select vectors (any index of the leading
    axes; the codes of a selection are the same bytes), and ``PackedCodes.concatenate`` joins batches of one
    quantizer. ``to_bytes()`` / ``save(path)`` write the same safetensors container as the service's binary
    /quantize answer; ``from_bytes`` / ``load`` read it (or the service's answer itself). The container can be
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
    dtype: str = DEFAULT_VECTOR_DTYPE
    distortion: Distortion | None = field(default=None)

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
        if self.dtype not in VECTOR_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(VECTOR_DTYPES)}; got {self.dtype!r}")

    # -- an array of vectors ------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the vectors the codes stand for, [..., dim]: the input's shape, as the /quantize answer's
        ``shape``."""
        return (*self.norms.shape, self.dim)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading shape of the batch: ``shape`` without the dim axis (the shape of ``norms``)."""
        return tuple(self.norms.shape)

    @property
    def n_vectors(self) -> int:
        return int(math.prod(self.batch_shape))

    def __len__(self) -> int:
        """Length of the first axis, as ``len`` of the vectors array would be (a single vector has none)."""
        if not self.batch_shape:
            raise TypeError("len() of the codes of a single vector (shape [dim])")
        return self.batch_shape[0]

    def __getitem__(self, key: Any) -> PackedCodes:
        """The codes of the vectors ``key`` selects: any numpy index of the leading axes (int, slice, Ellipsis,
        None, integer or boolean arrays). The last codes axis, a vector's bytes, is never indexed, so each
        selected vector keeps its exact code bytes and norm. ``distortion`` (of the whole batch) is dropped."""
        key_tuple = key if isinstance(key, tuple) else (key,)
        try:
            norms = self.norms[key_tuple]
            codes = self.codes[(*key_tuple, slice(None))]  # the bytes axis whole; Ellipsis spans leading axes only
        except IndexError as exc:
            raise IndexError(f"{exc} (codes of vectors {list(self.shape)}: index the leading axes)") from None
        norms = np.asarray(norms, dtype=np.float32)
        return self._with(codes.reshape(*norms.shape, self.code_bytes), norms, int(math.prod(norms.shape)))

    @classmethod
    def concatenate(cls, parts: Sequence[PackedCodes], axis: int = 0) -> PackedCodes:
        """Join the codes of several batches along leading axis ``axis`` (numpy's rules; negative counts from the
        last leading axis). Every part must come from the same quantizer (descriptor) and hold the same dtype;
        the result is byte for byte the codes of the joined vectors."""
        parts = list(parts)
        if not parts:
            raise ValueError("concatenate needs at least one PackedCodes")
        first = parts[0]
        for other in parts[1:]:
            if not isinstance(other, PackedCodes):
                raise TypeError(f"concatenate joins PackedCodes; got {type(other).__name__}")
            if other.descriptor() != first.descriptor() or other.dtype != first.dtype:
                raise ValueError(f"codes of different quantizers or dtypes cannot be joined: "
                                 f"{first.descriptor()} ({first.dtype}) and {other.descriptor()} ({other.dtype})")
        ndim = len(first.batch_shape)
        if ndim == 0:
            raise ValueError("the codes of single vectors (shape [dim]) have no axis to join; index them with [None]")
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis {axis} is out of range for codes of {ndim} leading axes")
        axis %= ndim
        norms = np.concatenate([p.norms for p in parts], axis=axis)
        codes = np.concatenate([p.codes for p in parts], axis=axis)
        bytes_in = None if any(p.bytes_in is None for p in parts) else sum(p.bytes_in for p in parts)
        return cls(codes=codes, norms=norms, **first.descriptor(), bytes_in=bytes_in, dtype=first.dtype)

    def _with(self, codes: np.ndarray, norms: np.ndarray, n: int) -> PackedCodes:
        """A PackedCodes of the same quantizer over ``n`` of this batch's vectors."""
        per_vector = self.bytes_in // self.n_vectors if self.bytes_in is not None and self.n_vectors else None
        return PackedCodes(codes=codes, norms=norms, **self.descriptor(),
                           bytes_in=per_vector * n if per_vector is not None else None, dtype=self.dtype)

    # -- sizes --------------------------------------------------------------------------------------

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

    # -- the container ------------------------------------------------------------------------------

    def descriptor(self) -> dict[str, Any]:
        """{variant, dim, bits, seed, fingerprint, format_version}: the /dequantize ``quantizer`` object."""
        return {k: getattr(self, k) for k in DESCRIPTOR_KEYS}

    def metadata(self) -> dict[str, Any]:
        """The container's metadata, with the keys of the service's /quantize answer (and its ``dtype``, which
        /dequantize answers in)."""
        meta: dict[str, Any] = {**self.descriptor(), "shape": list(self.shape), "dtype": self.dtype}
        if self.bytes_in is not None:
            meta.update(bytes_in=self.bytes_in, bytes_out=self.nbytes, compression_ratio=self.compression_ratio)
        if self.distortion is not None:
            meta.update({k: v for k, v in self.distortion.as_dict().items() if k in _STATS and v is not None})
        return meta

    def to_bytes(self) -> bytes:
        """The safetensors container: tensors ``codes`` and ``norms``, the descriptor in the metadata."""
        return write_safetensors({"codes": self.codes, "norms": self.norms}, self.metadata())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "codes container") -> PackedCodes:
        """Read a container written by ``to_bytes`` or answered by the service's /quantize. A file of vectors
        (.npy, or a container without codes) is refused as such, with what to do with it."""
        if bytes(data[:6]) == _NPY_MAGIC:
            raise NotCodesError(f"{source} is a .npy array (vectors), not codes: quantize it with `isoquant "
                                "quantize` first; codes are the .safetensors container it writes")
        tensors, meta = read_safetensors(data, source)
        if "codes" not in tensors and "vectors" in tensors:
            v = tensors["vectors"]
            raise NotCodesError(f"{source} is a vectors file (tensor 'vectors' {v.dtype} {list(v.shape)}), not "
                                "codes: quantize it with `isoquant quantize`, or give the codes file it wrote")
        missing = [k for k in ("codes", "norms") if k not in tensors]
        missing += [k for k in DESCRIPTOR_KEYS if k not in meta and k != "format_version"]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(missing)}: not an IsoQuant codes container")
        try:
            ints = {k: int(meta[k]) for k in ("dim", "bits", "seed")}
            version = int(meta.get("format_version", FORMAT_VERSION))
            bytes_in = int(meta["bytes_in"]) if "bytes_in" in meta else None
            dtype = vector_dtype(meta)
            distortion = Distortion.from_mapping(meta, int(math.prod(tensors["norms"].shape)))
        except (ValueError, FormatError) as exc:
            raise ValueError(f"{source}: bad metadata: {exc}") from None
        return cls(codes=tensors["codes"], norms=tensors["norms"], variant=meta["variant"], **ints,
                   fingerprint=meta["fingerprint"], format_version=version, bytes_in=bytes_in, dtype=dtype,
                   distortion=distortion)

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
        return (f"PackedCodes(shape={list(self.shape)}, dtype={self.dtype!r}, variant={self.variant!r}, "
                f"dim={self.dim}, bits={self.bits}, seed={self.seed}, fingerprint={self.fingerprint!r}, "
                f"nbytes={self.nbytes})")


@dataclass(frozen=True)
class Distortion:
    """Error statistics of a reconstruction x_hat against the reference x it approximates.

    mse: mean over all elements of (x - x_hat)^2; mean_relative_error / max_relative_error: mean / max
    over vectors of ||x - x_hat|| / ||x|| (0 for x = 0); n_vectors: how many vectors they cover;
    mean_cosine_similarity / min_cosine_similarity: mean / min over vectors of <x, x_hat> / (||x|| ||x_hat||),
    the measure of embedding search (None from a server older than them)."""

    mse: float
    mean_relative_error: float
    max_relative_error: float
    n_vectors: int
    mean_cosine_similarity: float | None = None
    min_cosine_similarity: float | None = None

    @staticmethod
    def from_mapping(stats: Any, n_vectors: int) -> Distortion | None:
        """From the service's statistics (a JSON ``distortion`` object, or container metadata of strings); None
        when they are absent. ValueError for a value that is not a number."""
        if not stats or not all(k in stats for k in _STATS[:3]):
            return None
        cosine = [float(stats[k]) if stats.get(k) is not None else None for k in _STATS[3:]]
        return Distortion(float(stats["mse"]), float(stats["mean_relative_error"]),
                          float(stats["max_relative_error"]), n_vectors, *cosine)

    @staticmethod
    def combine(parts: list[Distortion]) -> Distortion:
        """Statistics of the union of disjoint batches (all of the same dim): count-weighted means, max of maxima
        (min of minima)."""
        n = sum(p.n_vectors for p in parts)
        if n == 0:
            return Distortion(0.0, 0.0, 0.0, 0)
        cosine = all(p.mean_cosine_similarity is not None for p in parts)
        return Distortion(
            mse=sum(p.mse * p.n_vectors for p in parts) / n,
            mean_relative_error=sum(p.mean_relative_error * p.n_vectors for p in parts) / n,
            max_relative_error=max(p.max_relative_error for p in parts),
            n_vectors=n,
            mean_cosine_similarity=sum(p.mean_cosine_similarity * p.n_vectors for p in parts) / n if cosine else None,
            min_cosine_similarity=min(p.min_cosine_similarity for p in parts) if cosine else None,
        )

    def as_dict(self) -> dict[str, float]:
        return {"mse": self.mse, "mean_relative_error": self.mean_relative_error,
                "max_relative_error": self.max_relative_error, "n_vectors": self.n_vectors,
                "mean_cosine_similarity": self.mean_cosine_similarity,
                "min_cosine_similarity": self.min_cosine_similarity}
