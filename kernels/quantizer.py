"""``Quantizer``: validates input, picks the backend, owns the rotation parameters and the codebook.

>>> import torch
>>> from kernels import Quantizer
>>> q = Quantizer(variant="full", dim=128, bits=3, seed=0)
>>> packed = q.quantize(torch.randn(10, 128))
>>> packed.codes.shape, packed.codes.dtype, packed.norms.shape
(torch.Size([10, 48]), torch.uint8, torch.Size([10]))
>>> q.dequantize(packed).shape
torch.Size([10, 128])
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from isoquant_format import DESCRIPTOR_FIELDS, FORMAT_VERSION
from kernels import ops as custom_ops  # noqa: F401  (registers torch.ops.isoquant.*)
from kernels import reference
from kernels.codebook import Codebook, lloyd_max
from kernels.errors import QuantizerError
from kernels.plan import Plan
from kernels.rotations import ROTATIONS, RotationParams, make_rotation

MIN_DIM, MAX_DIM = 2, 4096
MIN_BITS, MAX_BITS = 1, 8
MAX_SEED = (1 << 64) - 1
INPUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BACKENDS = ("auto", "torch", "triton")
# Values are hashed on a grid of 2^-24 so that the last-ulp differences of float64 libm/LAPACK between
# machines do not change the fingerprint (docs/FORMAT.md, "Fingerprint").
_HASH_GRID = float(1 << 24)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _allowed_dtypes() -> str:
    return ", ".join(INPUT_DTYPES)


@dataclass(frozen=True)
class Packed:
    """Codes of a batch of vectors with everything a decoder needs.

    codes uint8 [..., code_bytes] (FORMAT.md bit layout); norms float32 [...]; the quantizer descriptor.
    """

    codes: torch.Tensor
    norms: torch.Tensor
    variant: str
    dim: int
    bits: int
    seed: int
    fingerprint: str
    format_version: int = FORMAT_VERSION

    @property
    def shape(self) -> torch.Size:
        """Leading shape of the batch (the shape of the input without its last dimension)."""
        return self.norms.shape

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: the packed codes plus the float32 norms."""
        return self.codes.numel() * self.codes.element_size() + self.norms.numel() * self.norms.element_size()

    def descriptor(self) -> dict:
        """variant, dim, bits, seed, fingerprint, format_version: what a decoder needs to find its quantizer."""
        return _descriptor(self)


def _descriptor(obj: Packed | Quantizer) -> dict:
    return {name: getattr(obj, name) for name in DESCRIPTOR_FIELDS}


class Quantizer:
    """An IsoQuant (or baseline) quantizer for vectors of ``dim`` coordinates at ``bits`` bits a coordinate.

    variant: full | fast | 2d | dense | hadamard | identity; dim: 2..4096; bits: 1..8; seed: 0..2^64-1;
    device: where parameters live and inputs must be; backend: auto | torch | triton.
    """

    def __init__(
        self,
        variant: str = "full",
        dim: int = 128,
        bits: int = 3,
        seed: int = 0,
        device: str | torch.device = "cpu",
        backend: str = "auto",
    ) -> None:
        if not isinstance(variant, str) or variant not in ROTATIONS:  # the registry, not an import-time list
            raise QuantizerError(
                f"variant must be one of {', '.join(ROTATIONS)}; got {variant!r}", field="variant", kind="value"
            )
        if isinstance(dim, bool) or not isinstance(dim, int) or not MIN_DIM <= dim <= MAX_DIM:
            raise QuantizerError(
                f"dim must be an integer from {MIN_DIM} to {MAX_DIM}; got {dim!r}", field="dim", kind="value"
            )
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise QuantizerError(
                f"bits must be an integer from {MIN_BITS} to {MAX_BITS}; got {bits!r}", field="bits", kind="value"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise QuantizerError(f"seed must be an integer from 0 to 2^64-1; got {seed!r}", field="seed", kind="value")
        if backend not in BACKENDS:
            raise QuantizerError(
                f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}", field="backend", kind="value"
            )
        self.variant, self.dim, self.bits, self.seed = variant, dim, bits, seed
        self.device = torch.device(device)
        self.rotation: RotationParams = make_rotation(variant, dim, seed)
        self.codebook: Codebook = lloyd_max(self.rotation.n_coded, bits)
        self.plan = Plan.build(self.rotation, self.codebook, self.device)
        self.backend = self._resolve_backend(backend)
        self._ops = reference if self.backend == "torch" else _triton_ops()
        if self.backend == "triton":
            self._ops.prepare(self.plan)  # the kernels' derived forms, once, before any call or trace
        # What the custom ops take (kernels.ops), and the fingerprint every Packed carries: built here, outside
        # any torch.compile trace (cached_property takes a lock that the compiler cannot trace in 3.11).
        self._op_tensors = self.plan.op_tensors()
        self.plan.symmetric  # noqa: B018
        self._descriptor_fields = _descriptor(self)  # every Packed carries it; built once (it builds the fingerprint)
        # Each calling thread's bad-row flag in pinned host memory (_HostFlag; the Triton backend only).
        self._host_flags = threading.local() if self.backend == "triton" else None

    def _resolve_backend(self, backend: str) -> str:
        if backend == "torch":
            return "torch"
        available = self.device.type == "cuda" and _triton_available()
        if backend == "triton" and not available:
            raise QuantizerError(
                "backend 'triton' needs a CUDA device and an importable triton with kernels for this build; "
                f"device is {self.device}. Allowed here: auto, torch",
                field="backend",
                kind="value",
            )
        return "triton" if available else "torch"

    # -- identity ----------------------------------------------------------------------------------

    @property
    def n_coded(self) -> int:
        """Coded coordinates per vector (dim padded to the variant's block)."""
        return self.plan.n_coded

    @property
    def code_bytes(self) -> int:
        """Bytes of packed codes per vector: ceil(n_coded * bits / 8)."""
        return self.plan.code_bytes

    @cached_property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the format version, the descriptor and the actual parameter
        and codebook values (docs/FORMAT.md)."""
        digest = hashlib.sha256()
        header = f"isoquant\0{FORMAT_VERSION}\0{self.variant}\0{self.dim}\0{self.bits}\0{self.seed}\0"
        digest.update(header.encode())
        values = [t.double().numpy() for t in self.rotation.hashed_values()]
        values.append(self.codebook.centroids.astype(np.float32).astype(np.float64))  # as applied
        for array in values:
            digest.update(np.round(array.reshape(-1) * _HASH_GRID).astype("<i8").tobytes())
        return digest.hexdigest()[:16]

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION

    def descriptor(self) -> dict:
        """variant, dim, bits, seed, fingerprint, format_version (the fields of ``Packed`` that name it)."""
        return dict(self._descriptor_fields)

    def __repr__(self) -> str:
        return (
            f"Quantizer(variant={self.variant!r}, dim={self.dim}, bits={self.bits}, seed={self.seed}, "
            f"device='{self.device}', backend={self.backend!r}, fingerprint={self.fingerprint!r})"
        )

    def warm_batches(self, max_rows: int) -> list[int]:
        """Batch sizes (rows, ascending, the first 1) that between them reach every kernel this quantizer
        launches for batches of 1..max_rows: the Triton backend picks its tile by batch size
        (``kernels.triton.launch_batches``), so running each op once at each size compiles everything
        such batches need before traffic. [1] for the torch backend, which compiles nothing. Checked calls
        (the default) and ``check=False`` calls run different kernels (the first also set a bad-row flag): warm
        with the mode you will call, e.g. ``check=False`` before capturing a CUDA graph."""
        if self.backend != "triton":
            return [1]
        return self._ops.launch_batches(self.plan, max_rows)

    # -- ops ---------------------------------------------------------------------------------------

    def quantize(self, x: torch.Tensor, *, check: bool = True) -> Packed:
        """x [..., dim] float16 | bfloat16 | float32 -> Packed(codes uint8 [..., code_bytes], norms float32 [...]).

        Rows with NaN/Inf, or whose norm overflows float32, are found from the op's own norms (no extra pass
        over the input) and refused with a QuantizerError naming them: one host sync. ``check=False`` skips
        that (no sync at all, e.g. inside a CUDA graph): such rows then have a non-finite norm in the result."""
        rows, lead = self._rows(x, "x")
        flag = None
        if torch.compiler.is_compiling():  # one opaque op for the compiler; no host check (as check=False)
            codes, norms = torch.ops.isoquant.quantize(rows, *self._op_args())
        elif check and self._host_flags is not None:  # the kernel flags bad rows; one sync (last), no extra launch
            flag = self._host_flag()
            codes, norms = self._ops.quantize(rows, self.plan, flag=flag.tensor)
        else:
            codes, norms = self._ops.quantize(rows, self.plan)
            if check:
                self._refuse_bad_rows(norms, rows, "x")
        if len(lead) == 1:  # rows in, rows out: no reshape (~5 us of host time each)
            packed = Packed(codes=codes, norms=norms, **self._descriptor_fields)
        else:
            packed = Packed(
                codes=codes.reshape(*lead, self.code_bytes), norms=norms.reshape(lead), **self._descriptor_fields
            )
        if flag is not None and flag.raised():  # (_HostFlag: why the sync comes last)
            self._refuse_bad_rows(norms, rows, "x")
        return packed

    def dequantize(self, packed: Packed, dtype: torch.dtype = torch.float32, *, check: bool = True) -> torch.Tensor:
        """Packed codes -> reconstruction [..., dim] in ``dtype`` (float16 | bfloat16 | float32). Non-finite
        norms are refused (one host sync); ``check=False`` skips that check and its sync."""
        self._check_output_dtype(dtype)
        if not isinstance(packed, Packed):
            raise QuantizerError(
                f"packed must be a kernels.Packed, got {type(packed).__name__}", field="packed", kind="type"
            )
        if packed.fingerprint != self.fingerprint or packed.format_version != FORMAT_VERSION:
            raise QuantizerError(
                f"fingerprint {packed.fingerprint!r} (format {packed.format_version}) does not match this "
                f"quantizer's {self.fingerprint!r} (format {FORMAT_VERSION}): the codes were made by "
                f"another quantizer ({packed.variant}, dim={packed.dim}, bits={packed.bits}, seed={packed.seed})",
                field="fingerprint",
                kind="fingerprint",
            )
        codes, norms = packed.codes, packed.norms
        if codes.dtype != torch.uint8:
            raise QuantizerError(f"codes must be uint8, got {_dtype_name(codes.dtype)}", field="codes", kind="dtype")
        if codes.ndim < 1 or codes.shape[-1] != self.code_bytes:
            raise QuantizerError(
                f"codes must have {self.code_bytes} bytes per vector (dim={self.dim}, bits={self.bits}); "
                f"got shape {list(codes.shape)}",
                field="codes",
                kind="shape",
            )
        if norms.dtype != torch.float32 or norms.shape != codes.shape[:-1]:
            raise QuantizerError(
                f"norms must be float32 of shape {list(codes.shape[:-1])}; "
                f"got {_dtype_name(norms.dtype)} of shape {list(norms.shape)}",
                field="norms",
                kind="dtype" if norms.dtype != torch.float32 else "shape",  # one check covers both
            )
        self._check_device(codes, "codes")
        self._check_device(norms, "norms")
        lead = norms.shape
        if len(lead) != 1:
            codes, norms = codes.reshape(-1, self.code_bytes), norms.reshape(-1)
        flag = None
        if torch.compiler.is_compiling():
            out = torch.ops.isoquant.dequantize(codes, norms, *self._op_args(), dtype)
        elif check and self._host_flags is not None:  # the kernel flags non-finite norms, as in quantize
            flag = self._host_flag()
            out = self._ops.dequantize(codes, norms, self.plan, dtype, flag=flag.tensor)
        else:
            if check:
                self._check_finite(norms.reshape(-1, 1), "norms")
            out = self._ops.dequantize(codes, norms, self.plan, dtype)
        if len(lead) != 1:
            out = out.reshape(*lead, self.dim)
        if flag is not None and flag.raised():
            self._check_finite(norms.reshape(-1, 1), "norms")
        return out

    def roundtrip(
        self, x: torch.Tensor, dtype: torch.dtype = torch.float32, *, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., dim] -> (reconstruction [..., dim] in ``dtype`` (float16 | bfloat16 | float32), squared
        error ||x - x_hat||^2 float32 [...] of the float32 reconstruction, whatever ``dtype`` is). Bad rows
        are found from the op's own squared errors, as in ``quantize``; ``check=False`` skips it (no sync)."""
        self._check_output_dtype(dtype)
        rows, lead = self._rows(x, "x")
        flag = None
        if torch.compiler.is_compiling():
            x_hat, sq_err = torch.ops.isoquant.roundtrip(rows, *self._op_args(), dtype)
        elif check and self._host_flags is not None:
            flag = self._host_flag()
            x_hat, sq_err = self._ops.roundtrip(rows, self.plan, dtype, flag=flag.tensor)
        else:
            x_hat, sq_err = self._ops.roundtrip(rows, self.plan, dtype)
            if check:
                self._refuse_bad_rows(sq_err, rows, "x")
        result = (x_hat, sq_err) if len(lead) == 1 else (x_hat.reshape(*lead, self.dim), sq_err.reshape(lead))
        if flag is not None and flag.raised():
            self._refuse_bad_rows(sq_err, rows, "x")
        return result

    def check(self, per_row: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """The default call's check, run later by the caller: raise the QuantizerError that a checked call
        would have raised, after a ``check=False`` call, at a moment the caller chooses (after its own sync,
        say, or on copies already on the host, where it costs no device sync at all).

        - after ``quantize(x, check=False)``: ``check(packed.norms, x)``;
        - after ``roundtrip(x, check=False)``: ``check(sq_err, x)``;
        - before or after ``dequantize(packed, check=False)``: ``check(packed.norms)``.

        per_row: float32 [...], the per-vector result of that call (or the norms given to dequantize); x:
        that call's input [..., dim] (needed to tell a NaN/Inf row from one whose norm overflows), on the
        same device as per_row. The work is one float32 sum of per_row unless something is not finite.

        >>> q = Quantizer("full", 8, 2)
        >>> x = torch.ones(3, 8); x[1, 0] = float("nan")
        >>> q.check(q.quantize(x, check=False).norms, x)
        Traceback (most recent call last):
        ...
        kernels.errors.QuantizerError: x holds NaN or Inf in vectors [1] (flat row indices)
        """
        if x is None:
            self._check_finite(per_row.reshape(-1, 1), "norms")
            return
        if x.device != per_row.device:
            raise QuantizerError(
                f"per_row is on {per_row.device} but x is on {x.device}: give both on one device",
                field="per_row",
                kind="device",
            )
        if x.ndim < 1 or x.shape[-1] != self.dim or per_row.numel() * self.dim != x.numel():
            raise QuantizerError(
                f"x must be [..., {self.dim}] with one vector per value of per_row ({per_row.numel()}); "
                f"got shape {list(x.shape)}",
                field="x",
                kind="shape",
            )
        rows = x.reshape(-1, self.dim)
        self._refuse_bad_rows(per_row.reshape(-1), rows, "x")

    def _host_flag(self) -> _HostFlag:
        """This thread's bad-row flag (Triton backend): a thread's calls are sequential, and each waits for its
        kernel before it returns, so one flag a thread is never written by two calls at once."""
        flag = getattr(self._host_flags, "flag", None)
        if flag is None:
            flag = self._host_flags.flag = _HostFlag(self.device)
        return flag

    def _op_args(self) -> tuple:
        """(tensors, names, symmetric, variant, dim, bits, backend): the plan as kernels.ops' custom ops take it."""
        plan = self.plan
        return self._op_tensors, plan.op_names, plan.symmetric, self.variant, self.dim, self.bits, self.backend

    # -- validation --------------------------------------------------------------------------------

    def _rows(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Size]:
        """Check x [..., dim] and view it as rows [N, dim] (no copy when the rows are already strided)."""
        if not isinstance(x, torch.Tensor):
            raise QuantizerError(f"{name} must be a torch.Tensor, got {type(x).__name__}", field=name, kind="type")
        if x.dtype not in INPUT_DTYPES.values():
            raise QuantizerError(
                f"{name} dtype must be one of {_allowed_dtypes()}; got {_dtype_name(x.dtype)}", field=name, kind="dtype"
            )
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise QuantizerError(
                f"{name} must have last dimension {self.dim} (this quantizer's dim); got shape {list(x.shape)}",
                field=name,
                kind="shape",
            )
        self._check_device(x, name)
        if x.ndim == 2:
            return x, x.shape[:1]  # rows already (reshape costs ~2 us of host time a call)
        return x.reshape(-1, self.dim), x.shape[:-1]

    def _refuse_bad_rows(self, per_row: torch.Tensor, rows: torch.Tensor, name: str) -> None:
        """Raise for the rows whose float32 norm is not finite (NaN/Inf inside, or squares that overflow),
        found from a per-row float32 result of the op itself (its norms or squared errors) [N]: a row's
        result is finite whenever its norm is, so only a non-finite one sends us back to the input (one
        host sync otherwise; the input is read again only on the error path)."""
        if _all_finite(per_row):
            return
        suspect = ~torch.isfinite(per_row)
        if not bool(suspect.any()):
            return  # the sum overflowed
        # A squared error can overflow just above a finite norm (||x - x_hat||^2 <= 4 ||x||^2): recheck.
        bad = suspect & ~torch.isfinite(torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32))
        if not bool(bad.any()):
            return
        self._check_finite(rows, name)
        raise QuantizerError(
            f"{name}: the norm of vectors {_index_list(bad)} overflows float32; scale the input down",
            field=name,
            kind="overflow",
        )

    def _check_device(self, t: torch.Tensor, name: str) -> None:
        if t.device != self.device and not (t.device.type == self.device.type == "cuda" and self.device.index is None):
            raise QuantizerError(
                f"{name} is on {t.device} but this quantizer lives on {self.device}", field=name, kind="device"
            )

    @staticmethod
    def _check_finite(rows: torch.Tensor, name: str) -> None:
        if _all_finite(rows):
            return
        bad = ~torch.isfinite(rows).all(-1)
        if bool(bad.any()):
            raise QuantizerError(
                f"{name} holds NaN or Inf in vectors {_index_list(bad)} (flat row indices)",
                field=name,
                kind="non_finite",
            )

    @staticmethod
    def _check_output_dtype(dtype: torch.dtype) -> None:
        if dtype not in INPUT_DTYPES.values():
            raise QuantizerError(f"dtype must be one of {_allowed_dtypes()}; got {dtype}", field="dtype", kind="dtype")


class _HostFlag:
    """An int32 in pinned host memory that the Triton kernels set to 1 when a row's norm is not finite (their
    ``flag`` argument). ``raised`` waits for the current stream (the one sync of a checked call) and reads the
    word in place: no reduction kernel and no device-to-host copy, which the check needed before (a float32 sum
    and ``.item()``: BENCHMARKS.md §10).

    The calls build their results before ``raised``: whatever runs between the kernel's end and the call's
    return adds to its time (the sync already costs ~24 us over the bare kernel, median, H200: §10)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"  # (else the Triton interpreter: ordinary memory, nothing to wait for)
        self.tensor = torch.zeros(1, dtype=torch.int32, pin_memory=self.cuda)
        self._word = self.tensor.numpy()  # the same memory: reading it costs no torch op
        # torch.cuda.current_stream() builds a Stream object each call: 9 us of the host's time on the H200
        # machine, against 0.2 us for the raw handle and 1.3 us to synchronize a Stream already built.
        self._streams: dict[tuple[int, int], torch.cuda.Stream] = {}

    def raised(self) -> bool:
        """Whether a kernel launched on the current stream since the last True set the flag (then cleared)."""
        if self.cuda:
            # Where the launchers (as Triton) launched, whatever self.index is; CUDA is initialised by the launch,
            # so the raw query, without torch.cuda.current_device()'s lazy-init check.
            index = torch._C._cuda_getDevice()
            key = (index, torch._C._cuda_getCurrentRawStream(index))
            stream = self._streams.get(key)
            if stream is None:
                if len(self._streams) >= 64:  # a stream per request (ExternalStream) must not grow it forever
                    self._streams.clear()
                stream = self._streams[key] = torch.cuda.current_stream(index)
            # (Polling stream.query() instead, with sched_yield between polls, measured no better: H200, N = 2^20,
            # dims 128 and 512, 18 cells, default call / raw median 1.135 polling, 1.145 blocking, same run.)
            stream.synchronize()
        if not self._word[0]:
            return False
        self._word[0] = 0
        return True


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element of t is finite, as one reduction and one host sync: the float32 sum is NaN or
    Inf when any element is (and, rarely, when finite values overflow it, which the caller's exact test
    then clears). isfinite + any is three launches on CUDA (isfinite, not, any), each ~5-10 us of host time."""
    return math.isfinite(t.sum(dtype=torch.float32).item())


def _index_list(mask: torch.Tensor, limit: int = 10) -> str:
    indices = torch.nonzero(mask.reshape(-1)).reshape(-1)
    shown = ", ".join(str(i) for i in indices[:limit].tolist())
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return f"[{shown}]{more}"


def _triton_available() -> bool:
    try:
        import kernels.triton  # noqa: F401  (imports triton; fails cleanly where it is missing)
    except ImportError:
        return False
    return True


def _triton_ops():
    import kernels.triton as triton_ops

    return triton_ops
