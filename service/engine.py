"""The device side of the service: the ``Engine`` coordinates the parts it holds (the quantizers resident
on one device, ``service.quantizers``; the counted admission to the work queue, ``service.admission``; the
pinned or pageable host buffers, ``service.host_buffers``), runs the ops on worker threads with per-op
device timing, and maps failures to HTTP-level errors: the library's typed ``QuantizerError`` by its
``field`` and ``kind``, never by its wording.

Why threads: the ops are torch calls that release the GIL for their heavy parts, and a CUDA stream is
naturally serialised, so one worker (the default) keeps the GPU busy while the event loop goes on
answering /health and /metrics. Admission is counted, not queued blindly: at most ``max_queue``
requests are admitted (waiting or running); the next one gets 429 at once instead of waiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kernels import FORMAT_VERSION, INPUT_DTYPES, Packed, Quantizer, QuantizerError
from service.admission import Admission, Ticket
from service.errors import ApiError, InvalidInput, Unavailable
from service.host_buffers import HostBuffers
from service.metrics import Metrics
from service.quantizers import QuantizerCache
from service.settings import Settings

log = logging.getLogger("service.engine")
T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device that exists here (ValueError otherwise)."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use auto or cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", index)
    return device


@dataclass(frozen=True)
class Stats:
    """Error statistics of x_hat against x (see schemas.Distortion)."""

    mse: float
    mean_relative_error: float
    max_relative_error: float

    def as_dict(self) -> dict[str, float]:
        return {
            "mse": self.mse,
            "mean_relative_error": self.mean_relative_error,
            "max_relative_error": self.max_relative_error,
        }


def distortion(x: torch.Tensor, x_hat: torch.Tensor, sq_err: torch.Tensor | None = None) -> Stats:
    """x, x_hat [..., dim] (any float dtype, same device) -> Stats, computed in float64.

    mse: mean over all elements of (x - x_hat)^2; relative error of a vector: ||x - x_hat|| / ||x||,
    defined as 0 for x = 0 (whose reconstruction is exactly 0). ``sq_err`` [...] may be given when
    the fused round trip already computed it."""
    dim = x.shape[-1]
    xd = x.reshape(-1, dim).double()
    if sq_err is None:
        sq_err = (xd - x_hat.reshape(-1, dim).double()).square().sum(-1)
    else:
        sq_err = sq_err.reshape(-1).double()
    norms = torch.linalg.vector_norm(xd, dim=-1)
    relative = torch.where(norms > 0, sq_err.sqrt() / norms.clamp_min(1e-300), torch.zeros_like(norms))
    n = max(xd.shape[0], 1)
    return Stats(
        mse=float(sq_err.sum()) / (n * dim),
        mean_relative_error=float(relative.sum()) / n,
        max_relative_error=float(relative.max()) if relative.numel() else 0.0,
    )


@dataclass
class QuantizeResult:
    """CPU tensors: codes uint8 [..., code_bytes], norms float32 [...], optional reconstruction float32
    [..., dim]; the descriptor; optional Stats."""

    codes: torch.Tensor
    norms: torch.Tensor
    descriptor: dict
    reconstruction: torch.Tensor | None
    stats: Stats | None


@dataclass
class DequantizeResult:
    """CPU tensor vectors [..., dim] in the requested dtype; optional Stats against the reference."""

    vectors: torch.Tensor
    stats: Stats | None


# The request field each library argument comes from, where the API names one (the library calls the input
# vectors x). Arguments no request field carries (backend, packed) give an error without a field.
_REQUEST_FIELD = {
    "x": "vectors",
    "codes": "codes",
    "norms": "norms",
    "dtype": "dtype",
    "variant": "variant",
    "dim": "dim",
    "bits": "bits",
    "seed": "seed",
    "fingerprint": "quantizer.fingerprint",
}
# The error type (docs/OPERATIONS.md, "Errors") of each QuantizerError kind that has its own; the other kinds
# (value, type, dtype, device, overflow) are "invalid_value", the type those refusals have always had.
_ERROR_TYPE = {
    "non_finite": "non_finite",
    "shape": "shape_mismatch",
    "fingerprint": "fingerprint_mismatch",
}


def invalid_input(exc: QuantizerError) -> InvalidInput:
    """The 422 for input the library refused, from the error's ``field`` and ``kind`` alone. The message is
    the library's, its subject re-worded where the request calls it otherwise (x -> vectors)."""
    field = _REQUEST_FIELD.get(exc.field) if exc.field is not None else None
    message = exc.message_calling("vectors") if exc.field == "x" else exc.message
    return InvalidInput(message, field, type=_ERROR_TYPE.get(exc.kind, "invalid_value"))


class Engine:
    """Quantizers on one device and the workers that run them: coordinates the quantizer cache, the
    admission counters and the host buffers it holds, each of which keeps its own state under its own lock,
    and owns the life cycle (warm-up, draining, shutdown)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = resolve_device(settings.device)
        self._executor = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="isoquant-device", initializer=self._init_worker
        )
        self.quantizers = QuantizerCache(self.device, settings.default_seed, settings.seed_cache_size, metrics)
        self.admission = Admission(settings.max_queue, metrics)
        self.host_buffers = HostBuffers(self.device, settings.pinned_host_bytes)
        # warmed and draining change together with the readiness gauge: a draining process must never be
        # marked ready (start_warm_up's callback against begin_shutdown).
        self._state_lock = threading.Lock()
        self.warmed = False  # warm-up finished successfully
        self.draining = False  # shutdown began: not ready, still serving
        self.accepting = True  # false once the workers are shut down
        self.warm_progress = (0, len(settings.warm_set()))
        self.warmup_error: str | None = None
        self.warmup_seconds: float | None = None
        self.backend = Quantizer("identity", 4, 1, device=self.device).backend
        metrics.set_build_info(self.device, self.backend)
        metrics.set_ready(False)

    def _init_worker(self) -> None:
        if self.device.type == "cuda":
            # Triton launches on the thread's current device: make it the service's (cuda:N).
            torch.cuda.set_device(self.device)
        # Intra-op threads are set per worker: on a small shared CPU an OpenMP team larger than the free
        # cores spins at its barriers and can run several times slower than one thread.
        if self.settings.torch_threads is not None:
            torch.set_num_threads(self.settings.torch_threads)

    @property
    def ready(self) -> bool:
        """What GET /health/ready reports: warmed up and not draining."""
        return self.warmed and not self.draining

    # -- host buffers -----------------------------------------------------------------------------

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 [nbytes] host buffer for a request body (``HostBuffers.empty``): pinned on a GPU, so the
        vectors parsed in place go to the device in one DMA. 503 if no host memory can be had."""
        try:
            return self.host_buffers.empty((nbytes,), torch.uint8)
        except (MemoryError, RuntimeError) as exc:
            self.metrics.device_errors.labels("out_of_memory").inc()
            raise Unavailable(
                f"no host memory for a body of {nbytes} bytes; retry later or with a smaller batch",
                type="out_of_memory",
            ) from exc

    def pinned_bytes_in_use(self) -> int:
        """Bytes of this process's pinned host storage still alive (``HostBuffers``)."""
        return self.host_buffers.pinned_bytes_in_use()

    # -- quantizers -------------------------------------------------------------------------------

    def quantizer(self, variant: str, dim: int, bits: int, seed: int) -> Quantizer:
        """The resident quantizer for these parameters, built on first use (call from a worker)."""
        return self.quantizers.get(variant, dim, bits, seed)

    def resident_count(self) -> dict[str, int]:
        """Resident quantizers: {"default_seed": n, "other_seeds": m}."""
        return self.quantizers.counts()

    # -- queue ------------------------------------------------------------------------------------

    def admit(self) -> Ticket:
        """Reserve one of the ``max_queue`` places (429 at once if none is free). A request takes its
        ticket before it reads its body, so bodies in flight count against the bound too; the ticket is
        released when its device job ends, or by ``Ticket.__exit__`` if no job was started."""
        if not self.accepting:
            raise Unavailable("the service is shutting down", type="shutting_down")
        return self.admission.admit()

    async def run(self, fn: Callable[..., T], *args: Any, ticket: Ticket | None = None) -> T:
        """Run ``fn(*args)`` on a device worker under ``ticket`` (admitted now if none is given): 429 if
        the queue is full, 503 if it does not finish within ``job_timeout_s`` or the device fails."""
        if ticket is None:
            with self.admit() as own:
                return await self.run(fn, *args, ticket=own)
        if not self.accepting:
            raise Unavailable("the service is shutting down", type="shutting_down")
        try:
            future = self._executor.submit(self._job, fn, args)
        except RuntimeError:  # the executor is shut down; the ticket's exit releases the place
            raise Unavailable("the service is shutting down", type="shutting_down") from None
        ticket.handed_off = True  # the job releases the place when it ends
        try:
            # shield: a timed-out or cancelled request leaves its job to finish; the place is released
            # by the job itself, so the queue bound stays honest.
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.settings.job_timeout_s)
        except asyncio.TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise Unavailable(
                f"the device did not finish within {self.settings.job_timeout_s} s", type="timeout"
            ) from None

    def _job(self, fn: Callable[..., T], args: tuple) -> T:
        """A worker runs an admitted request's ``fn``; its queue place is given back when it ends."""
        self.admission.job_started()
        try:
            return self._guard(fn, *args)
        finally:
            self.admission.job_finished()
            self.metrics.job_done()

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Map failures: the library's QuantizerError -> 422 by its field and kind (``invalid_input``); out
        of memory and other device errors -> 503 (after releasing cached memory, so the next request can
        run)."""
        try:
            return fn(*args)
        except ApiError:
            raise
        except QuantizerError as exc:
            raise invalid_input(exc) from None
        except ValueError as exc:
            # Every refusal of input by the Quantizer is a QuantizerError, and the Quantizer checks its input
            # before the layers below it would: an untyped ValueError here has no field or kind to map. It
            # stays the 422 it always was, and is logged so that the raise that lacks a type gets one.
            log.warning("untyped ValueError from a device job (%s): %s", type(exc).__name__, exc)
            raise InvalidInput(str(exc)) from None
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self._release_memory()
            self.metrics.device_errors.labels("out_of_memory").inc()
            log.warning("out of memory on %s: %s", self.device, exc)
            raise Unavailable(
                f"out of memory on {self.device}; retry with a smaller batch or later", type="out_of_memory"
            ) from None
        except RuntimeError as exc:  # CUDA/accelerator errors are RuntimeError subclasses
            self._release_memory()
            self.metrics.device_errors.labels("runtime").inc()
            log.exception("device error on %s", self.device)
            raise Unavailable(f"device error on {self.device}: {exc}", type="device_error") from None

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError:
                log.exception("empty_cache failed")

    # -- timing -----------------------------------------------------------------------------------

    def _timed(self, op: str, q: Quantizer, dtype: torch.dtype, fn: Callable[[], T]) -> T:
        """Run one library op and record its device time (CUDA events on GPU: the kernels' time on the
        stream, not the host's; wall clock on CPU)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            t0 = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - t0
        name = str(dtype).removeprefix("torch.")
        labels = self.metrics.kernel_labels(op, q.variant, q.dim, q.bits, name)
        self.metrics.kernel_duration.labels(**labels).observe(seconds)
        return result

    def _count(self, op: str, q: Quantizer, vectors: int) -> None:
        m = self.metrics
        m.vectors.labels(
            m.label("op", op), m.label("variant", q.variant), m.label("dim", q.dim), m.label("bits", q.bits)
        ).inc(vectors)

    # -- ops (run on a worker) --------------------------------------------------------------------

    def quantize_job(
        self, variant: str, bits: int, seed: int, x: torch.Tensor, want_reconstruction: bool, want_distortion: bool
    ) -> QuantizeResult:
        """x [..., dim] CPU float16|bfloat16|float32 -> QuantizeResult (codes, norms; with the fused
        round trip's float32 reconstruction and Stats when asked)."""
        q = self.quantizer(variant, x.shape[-1], bits, seed)
        xd = x.to(self.device, non_blocking=True)  # ordered before the kernel on the stream
        packed = self._timed("quantize", q, x.dtype, lambda: q.quantize(xd))
        n = packed.norms.numel()
        self._count("quantize", q, n)
        reconstruction = stats = None
        if want_reconstruction or want_distortion:
            x_hat, sq_err = self._timed("roundtrip", q, x.dtype, lambda: q.roundtrip(xd))
            self._count("roundtrip", q, n)
            if want_distortion:
                stats = distortion(xd, x_hat, sq_err)
                self._observe_error(q, stats)
            if want_reconstruction:
                reconstruction = x_hat
        codes, norms, reconstruction = self._to_host(packed.codes, packed.norms, reconstruction)
        return QuantizeResult(codes, norms, q.descriptor(), reconstruction, stats)

    def dequantize_job(
        self,
        descriptor: dict,
        codes: torch.Tensor,
        norms: torch.Tensor,
        reference: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> DequantizeResult:
        """codes uint8 [..., code_bytes], norms float32 [...] (CPU) and a descriptor -> vectors [..., dim]
        in ``dtype``; Stats of those vectors against ``reference`` [..., dim] when given.

        The descriptor's fingerprint is checked by the library (``Quantizer.dequantize`` refuses a Packed
        whose fingerprint is not its own: a QuantizerError of kind "fingerprint", 422 fingerprint_mismatch on
        quantizer.fingerprint). The format version is checked here first, because the library folds it into
        that same fingerprint error while the API answers it as its own type and field."""
        q = self.quantizer(descriptor["variant"], descriptor["dim"], descriptor["bits"], descriptor["seed"])
        if descriptor["format_version"] != FORMAT_VERSION:
            raise InvalidInput(
                f"format_version {descriptor['format_version']} is not served; "
                f"this server reads format {FORMAT_VERSION}",
                "quantizer.format_version",
                type="format_mismatch",
            )
        reference = reference.to(self.device, non_blocking=True) if reference is not None else None
        if reference is not None and not bool(torch.isfinite(reference).all()):
            raise InvalidInput("reference holds NaN or Inf", "reference", type="non_finite")
        codes, norms = codes.to(self.device, non_blocking=True), norms.to(self.device, non_blocking=True)
        # The request's own descriptor, not the server quantizer's: the library compares its fingerprint.
        packed = Packed(codes=codes, norms=norms, **descriptor)
        out = self._timed("dequantize", q, dtype, lambda: q.dequantize(packed, dtype))
        self._count("dequantize", q, norms.numel())
        stats = None
        if reference is not None:
            stats = distortion(reference, out)
            self._observe_error(q, stats)
        (vectors,) = self._to_host(out)
        return DequantizeResult(vectors, stats)

    def _to_host(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Results -> host tensors (``HostBuffers.to_host``: one DMA each into pinned memory on a GPU)."""
        return self.host_buffers.to_host(*tensors)

    def _observe_error(self, q: Quantizer, stats: Stats) -> None:
        m = self.metrics
        m.relative_error.labels(m.label("variant", q.variant), m.label("dim", q.dim), m.label("bits", q.bits)).observe(
            stats.mean_relative_error
        )

    # -- life cycle -------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """Build every quantizer of the warm set on the device and run each op once per warm dtype, so
        that codebooks are computed and kernels compiled before traffic. Returns the seconds it took."""
        t0 = time.perf_counter()
        seed = self.settings.default_seed
        total = len(self.settings.warm_set())
        for done, (variant, dim, bits) in enumerate(self.settings.warm_set()):
            self.warm_progress = (done, total)
            q = self.quantizer(variant, dim, bits, seed)
            sizes = {self.settings.warm_batch}
            if self.settings.warm_all_tiles:
                # The Triton kernels take another tile (another compile) above a few thousand rows, and
                # Triton specializes the batch size on divisibility by 16: without this the first
                # 65,536-vector /dequantize compiled for ~0.5 s inside the request (H200, cold cache).
                sizes.update(q.warm_batches(self.settings.max_vectors))
            # Made on the device: warm_all_tiles asks for up to max_vectors rows, which on the host cost a
            # randn and a copy per quantizer and dtype.
            base = torch.randn(max(sizes), dim, device=self.device)
            for n in sorted(sizes):
                for name in self.settings.warm_dtypes:
                    dtype = INPUT_DTYPES[name]
                    x = base[:n].to(dtype)
                    # Not timed into the metrics: warm-up includes compilation, which is not kernel latency.
                    packed = q.quantize(x)
                    q.dequantize(packed, dtype)
                    q.roundtrip(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # The warm-up's largest batches (warm_all_tiles: up to max_vectors rows) need not stay reserved.
            torch.cuda.empty_cache()
        self.warm_progress = (total, total)
        seconds = time.perf_counter() - t0
        self.warmup_seconds = seconds
        self.metrics.warmup_seconds.set(seconds)
        self.metrics.job_done()
        return seconds

    def start_warm_up(self) -> Future:
        """Queue the warm-up on the device workers; ``ready`` turns true when it succeeds."""

        def done(future: Future) -> None:
            exc = future.exception()
            if exc is not None:
                self.warmup_error = f"{type(exc).__name__}: {exc}"
                log.error("warm-up failed; the service stays not ready: %s", self.warmup_error)
                return
            with self._state_lock:  # against begin_shutdown: a draining process must not be marked ready
                self.warmed = True
                if not self.draining:
                    self.metrics.set_ready(True)
            log.info(
                "warm-up done in %.2f s: %d quantizers on %s (backend %s)",
                future.result(),
                len(self.settings.warm_set()),
                self.device,
                self.backend,
            )

        future = self._executor.submit(self.warm_up)
        future.add_done_callback(done)
        return future

    def begin_shutdown(self) -> None:
        """Turn not-ready (readiness probes fail) but keep serving what is admitted."""
        with self._state_lock:
            self.draining = True
            self.metrics.set_ready(False)

    def close(self) -> None:
        """Refuse new work and wait for the admitted jobs to finish."""
        self.begin_shutdown()
        self.accepting = False
        self._executor.shutdown(wait=True)
