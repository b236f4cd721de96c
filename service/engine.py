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
import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kernels import FORMAT_VERSION, INPUT_DTYPES, Packed, Quantizer, QuantizerError
from service.admission import Admission, Ticket, not_started
from service.batching import Coalescer, Member
from service.errors import ApiError, InvalidInput, Unavailable
from service.host_buffers import PINNED_MIN_BYTES, HostBuffers
from service.metrics import Metrics
from service.quantizers import QuantizerCache
from service.settings import Settings, auto_torch_threads

log = logging.getLogger("service.engine")
WARM_UP_LOG_EVERY_S = 2.0  # seconds between warm-up progress lines in the log
T = TypeVar("T")


def _settle(future: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve a group member's future (event loop), unless its request already stopped waiting."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class _ShareTimedOut(Exception):
    """A group member's future failed by its timer (``Engine._joined``): the request answers 503 timeout."""


def _time_out(future: asyncio.Future) -> None:
    """A group member's timer: its share did not come within the job timeout (unless it just did)."""
    if not future.done():
        future.set_exception(_ShareTimedOut())


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
    mean_cosine_similarity: float
    min_cosine_similarity: float

    def as_dict(self) -> dict[str, float]:
        return {
            "mse": self.mse,
            "mean_relative_error": self.mean_relative_error,
            "max_relative_error": self.max_relative_error,
            "mean_cosine_similarity": self.mean_cosine_similarity,
            "min_cosine_similarity": self.min_cosine_similarity,
        }


def distortion_sums(x: torch.Tensor, x_hat: torch.Tensor, sq_err: torch.Tensor | None = None) -> torch.Tensor:
    """x, x_hat [..., dim] (any float dtype, same device) -> float64 [5] on that device, computed in float64:
    the sum of squared errors, the sum and max of the relative errors, the sum and min of the cosine
    similarities (``stats_from_sums`` turns them into Stats). No host sync: the job copies them to the host
    with its results.

    Relative error of a vector: ||x - x_hat|| / ||x||, defined as 0 for x = 0 (whose reconstruction is
    exactly 0); cosine similarity: <x, x_hat> / (||x|| ||x_hat||), the measure embedding search uses,
    defined as 1 when both are 0 and 0 when one is. ``sq_err`` [...] may be given when the fused round trip
    already computed it."""
    dim = x.shape[-1]
    xd = x.reshape(-1, dim).double()
    xh = x_hat.reshape(-1, dim).double()
    if xd.shape[0] == 0:
        return torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=x.device)
    if sq_err is None:
        sq_err = (xd - xh).square().sum(-1)
    else:
        sq_err = sq_err.reshape(-1).double()
    norms = torch.linalg.vector_norm(xd, dim=-1)
    relative = torch.where(norms > 0, sq_err.sqrt() / norms.clamp_min(1e-300), torch.zeros_like(norms))
    norms_hat = torch.linalg.vector_norm(xh, dim=-1)
    both = norms * norms_hat
    neither = ((norms == 0) & (norms_hat == 0)).double()
    cosine = torch.where(both > 0, (xd * xh).sum(-1) / both.clamp_min(1e-300), neither)
    return torch.stack([sq_err.sum(), relative.sum(), relative.max(), cosine.sum(), cosine.min()])


def stats_from_sums(sums: torch.Tensor, rows: int, dim: int) -> Stats:
    """``distortion_sums``' [5] (on the host) over ``rows`` vectors of ``dim`` -> Stats (see schemas.Distortion)."""
    total_sq, total_rel, max_rel, total_cos, min_cos = sums.tolist()
    n = max(rows, 1)
    return Stats(
        mse=total_sq / (n * dim),
        mean_relative_error=total_rel / n,
        max_relative_error=max_rel,
        mean_cosine_similarity=total_cos / n if rows else 1.0,
        min_cosine_similarity=min_cos,
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


def _non_finite_reference() -> InvalidInput:
    """/dequantize's 422 for a reference with NaN or Inf (found on the host or after the job's sync)."""
    return InvalidInput("reference holds NaN or Inf", "reference", type="non_finite")


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
        # Intra-op threads of the device workers (read by _init_worker): the setting, else on the CPU
        # auto_torch_threads (half the usable cores per process); on a GPU torch's own default (the kernels'
        # work is not on the CPU).
        self.torch_threads = settings.torch_threads
        if self.torch_threads is None and self.device.type == "cpu":
            self.torch_threads = auto_torch_threads(settings.processes)
        self._executor = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="isoquant-device", initializer=self._init_worker
        )
        self.quantizers = QuantizerCache(
            self.device,
            settings.default_seed,
            settings.seed_cache_size,
            metrics,
            pinned=settings.warm_set(),
            default_cache_size=settings.quantizer_cache_size,
        )
        self.admission = Admission(settings.max_queue, metrics)
        # Dynamic batching (service.batching), when a delay is set: small concurrent requests of one kind
        # share one device job.
        self.coalescer = (
            Coalescer(
                settings.batch_delay_ms / 1000.0, settings.batch_max_vectors, self._launch_group, settings.workers
            )
            if settings.batch_delay_ms > 0
            else None
        )
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
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)

    @property
    def ready(self) -> bool:
        """What GET /health/ready reports: warmed up and not draining."""
        return self.warmed and not self.draining

    # -- host buffers -----------------------------------------------------------------------------

    def host_buffer(self, nbytes: int) -> torch.Tensor | bytearray:
        """A host buffer of ``nbytes`` for a request body: a uint8 [nbytes] tensor from ``HostBuffers.empty``, pinned on
        a GPU, so the vectors parsed in place go to the device in one DMA; below ``PINNED_MIN_BYTES`` (pageable on any
        device) a bytearray, which ``codec.read_body`` and ``codec.parse_safetensors`` take as they are. Why: the
        tensor's allocation and the two ``.numpy()`` views of it took 5-7 us of a small request's event-loop time
        more than a bytearray (body read and parsed: 6.0 against 10.8 us, our 2-core CPU). 503 if no host memory can
        be had."""
        try:
            if nbytes < PINNED_MIN_BYTES:
                return bytearray(nbytes)
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
        """A ticket for one of the ``max_queue`` places (429 at once if none is free). A request takes it
        before it reads its body, but the place is held only from the body's last byte on (a slow client does
        not hold one: service.admission); the ticket is released when its device job ends, or by
        ``Ticket.__exit__`` if no job was started."""
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
            async with asyncio.timeout(self.settings.job_timeout_s):
                return await asyncio.shield(asyncio.wrap_future(future))
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise Unavailable(
                f"the device did not finish within {self.settings.job_timeout_s} s", type="timeout"
            ) from None

    # -- ops, from the routes: batched with concurrent requests of the same kind when batching is on --------

    async def quantize(
        self,
        variant: str,
        bits: int,
        seed: int,
        x: torch.Tensor,
        want_reconstruction: bool,
        want_distortion: bool,
        ticket: Ticket,
    ) -> QuantizeResult:
        """``quantize_job`` on a device worker, alone or (codes only, batching on, at most
        ``batch_max_vectors`` rows) in one launch with concurrent requests for the same quantizer and dtype."""
        args = (variant, bits, seed, x, want_reconstruction, want_distortion)
        rows = x.numel() // max(x.shape[-1], 1) if x.ndim else 0
        if self.coalescer is None or want_reconstruction or want_distortion or not self._joinable(rows):
            return await self.run(self.quantize_job, *args, ticket=ticket)
        return await self._joined(("quantize", variant, x.shape[-1], bits, seed, x.dtype), args, rows, ticket)

    async def dequantize(
        self,
        descriptor: dict,
        codes: torch.Tensor,
        norms: torch.Tensor,
        reference: torch.Tensor | None,
        dtype: torch.dtype,
        ticket: Ticket,
    ) -> DequantizeResult:
        """``dequantize_job`` on a device worker, alone or (no reference, batching on) in one launch with
        concurrent requests that carry the same descriptor and ask for the same dtype."""
        args = (descriptor, codes, norms, reference, dtype)
        if self.coalescer is None or reference is not None or not self._joinable(norms.numel()):
            return await self.run(self.dequantize_job, *args, ticket=ticket)
        key = ("dequantize", tuple(sorted(descriptor.items())), dtype)
        return await self._joined(key, args, norms.numel(), ticket)

    def _joinable(self, rows: int) -> bool:
        return 0 < rows <= self.settings.batch_max_vectors

    async def _joined(self, key: tuple, args: tuple, rows: int, ticket: Ticket) -> Any:
        """Join the open group of ``key`` and wait for this request's share of its result (503 after
        ``job_timeout_s``, as ``run``)."""
        if not self.accepting:
            raise Unavailable("the service is shutting down", type="shutting_down")
        ticket.handed_off = True  # the group's job (or _launch_group, if it cannot start) releases the place
        future = self.coalescer.join(key, args, rows)
        # The timeout ends this request's share only, which the group's job then skips (_settle: the future is
        # done); the job itself runs on for the other members. A timer that fails the future, not an
        # asyncio.timeout around the await: that one's enter and exit were 11 of a batched request's ~400-420
        # Python calls on the event loop, this is 3.
        timer = asyncio.get_running_loop().call_later(self.settings.job_timeout_s, _time_out, future)
        try:
            return await future
        except _ShareTimedOut:
            self.metrics.rejected.labels("timeout").inc()
            raise Unavailable(
                f"the device did not finish within {self.settings.job_timeout_s} s", type="timeout"
            ) from None
        finally:
            timer.cancel()

    def _launch_group(self, key: tuple, members: list[Member]) -> None:
        """(Event loop, from the Coalescer.) Run a formed group as one job on a device worker and resolve each
        member's future with its own outcome when it ends."""
        loop = asyncio.get_running_loop()
        self.metrics.coalesced.labels(key[0]).observe(len(members))
        try:
            job = self._executor.submit(self._group_job, key, members)
        except RuntimeError:  # shut down: no job will give the places back
            for member in members:
                self.admission.release()
                _settle(member.future, exc=Unavailable("the service is shutting down", type="shutting_down"))
            # Soon, not now: finished() may launch the next due group, which fails the same way, and so on down
            # the stack for every due group.
            loop.call_soon(self.coalescer.finished)
            return

        def resolve(done: Future) -> None:
            try:
                outcomes = done.result()  # _group_job returns one outcome per member, never raises
                for member, (result, exc) in zip(members, outcomes, strict=True):
                    _settle(member.future, result, exc)
            finally:
                self.coalescer.finished()  # the next due group may start

        job.add_done_callback(lambda done: loop.call_soon_threadsafe(resolve, done))

    def _group_job(self, key: tuple, members: list[Member]) -> list[tuple[Any, BaseException | None]]:
        """A worker runs a group: every member's place moves to running, the members' rows go through the op
        in one call, and each gets its rows back. If the joined call fails (a member's bad rows, say), each
        member runs alone instead, so that every request gets exactly the answer or error it gets unbatched.
        Returns (result, None) or (None, error) per member, in order; never raises."""
        outcome: dict[int, tuple[Any, BaseException | None]] = {}
        if self.admission.jobs_started(len(members)):
            started = members
        else:  # closed: jobs_started released their places
            started = []
            for member in members:
                outcome[id(member)] = (None, not_started())
        try:
            grouped, alone = (
                (self._quantize_group, self.quantize_job)
                if key[0] == "quantize"
                else (self._dequantize_group, self.dequantize_job)
            )
            try:
                results = self._guard(grouped, started) if started else []
                outcome.update((id(m), (r, None)) for m, r in zip(started, results, strict=True))
            except Exception:  # noqa: BLE001  (each member then gets its own answer or error, alone)
                for member in started:
                    try:
                        outcome[id(member)] = (self._guard(alone, *member.args), None)
                    except Exception as exc:  # noqa: BLE001  (handed to that request's handler)
                        outcome[id(member)] = (None, exc)
            return [outcome[id(member)] for member in members]
        finally:
            if started:
                self.admission.jobs_finished(len(started))
            self.metrics.job_done()

    def _quantize_group(self, members: list[Member]) -> list[QuantizeResult]:
        variant, bits, seed, first = members[0].args[:4]
        dim = first.shape[-1]
        q = self.quantizer(variant, dim, bits, seed)
        xs = [m.args[3] for m in members]
        counts = [m.rows for m in members]
        x = torch.cat([x.reshape(-1, dim) for x in xs])
        xd = x.to(self.device, non_blocking=True)
        timings: list = []
        packed = self._timed("quantize", q, first.dtype, lambda: q.quantize(xd, check=False), timings)
        codes, norms = self._to_host(packed.codes, packed.norms)
        q.check(norms, x)  # raises for the group: each member then runs alone (_group_job)
        self._observe_times(timings)
        self._count("quantize", q, x.shape[0])
        descriptor = q.descriptor()
        return [
            QuantizeResult(c.reshape(*x.shape[:-1], q.code_bytes), n.reshape(x.shape[:-1]), descriptor, None, None)
            for x, c, n in zip(xs, codes.split(counts), norms.split(counts), strict=True)
        ]

    def _dequantize_group(self, members: list[Member]) -> list[DequantizeResult]:
        descriptor, _, _, _, dtype = members[0].args
        q = self.quantizer(descriptor["variant"], descriptor["dim"], descriptor["bits"], descriptor["seed"])
        counts = [m.rows for m in members]
        codes = torch.cat([m.args[1].reshape(-1, q.code_bytes) for m in members])
        norms = torch.cat([m.args[2].reshape(-1) for m in members])
        q.check(norms)  # raises for the group: each member then runs alone (_group_job)
        codes, norms = codes.to(self.device, non_blocking=True), norms.to(self.device, non_blocking=True)
        packed = Packed(codes=codes, norms=norms, **descriptor)
        timings: list = []
        out = self._timed("dequantize", q, dtype, lambda: q.dequantize(packed, dtype, check=False), timings)
        (vectors,) = self._to_host(out)
        self._observe_times(timings)
        self._count("dequantize", q, norms.shape[0])
        return [
            DequantizeResult(v.reshape(*m.args[2].shape, q.dim), None)
            for m, v in zip(members, vectors.split(counts), strict=True)
        ]

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

    def _timed(self, op: str, q: Quantizer, dtype: torch.dtype, fn: Callable[[], T], timings: list) -> T:
        """Run one library op and time it on the device: CUDA events around it on a GPU (the kernels' time on
        the stream, not the host's), read by ``_observe_times`` after the job's one sync; the wall clock on
        the CPU. ``timings`` collects (start, end | seconds, labels) for that."""
        name = str(dtype).removeprefix("torch.")
        labels = self.metrics.kernel_labels(op, q.variant, q.dim, q.bits, name)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            timings.append((start, end, labels))
        else:
            t0 = time.perf_counter()
            result = fn()
            timings.append((None, time.perf_counter() - t0, labels))
        return result

    def _observe_times(self, timings: list) -> None:
        """Record the ops' times (``_timed``); on a GPU after the sync that brought their results back."""
        for start, end, labels in timings:
            seconds = end if start is None else start.elapsed_time(end) / 1000.0
            self.metrics.kernel_duration.labels(**labels).observe(seconds)

    def _count(self, op: str, q: Quantizer, vectors: int) -> None:
        m = self.metrics
        m.vectors.labels(
            m.label("op", op), m.label("variant", q.variant), m.label("dim", q.dim), m.label("bits", q.bits)
        ).inc(vectors)

    # -- ops (run on a worker) --------------------------------------------------------------------

    # One host sync a job: the library ops run with check=False (no sync of their own), the results and the
    # error sums come back in one copy (``_to_host``), and the deferred check (``Quantizer.check``) runs on
    # the host copies: the same QuantizerError, hence the same 422, as a checked call's.

    def quantize_job(
        self, variant: str, bits: int, seed: int, x: torch.Tensor, want_reconstruction: bool, want_distortion: bool
    ) -> QuantizeResult:
        """x [..., dim] CPU float16|bfloat16|float32 -> QuantizeResult (codes, norms; with the fused
        round trip's float32 reconstruction and Stats when asked)."""
        q = self.quantizer(variant, x.shape[-1], bits, seed)
        xd = x.to(self.device, non_blocking=True)  # ordered before the kernel on the stream
        timings: list = []
        packed = self._timed("quantize", q, x.dtype, lambda: q.quantize(xd, check=False), timings)
        reconstruction = sums = None
        if want_reconstruction or want_distortion:
            x_hat, sq_err = self._timed("roundtrip", q, x.dtype, lambda: q.roundtrip(xd, check=False), timings)
            sums = distortion_sums(xd, x_hat, sq_err) if want_distortion else None
            reconstruction = x_hat if want_reconstruction else None
        codes, norms, reconstruction, sums = self._to_host(packed.codes, packed.norms, reconstruction, sums)
        # The round trip's rows are quantize's, and a checked round trip refuses only the rows whose norm is not
        # finite (a squared error can overflow beside a finite norm; such a row is not refused): checking these
        # norms refuses exactly what both checked calls would.
        q.check(norms, x)
        self._observe_times(timings)
        n = norms.numel()
        self._count("quantize", q, n)
        stats = None
        if sums is not None or reconstruction is not None:
            self._count("roundtrip", q, n)
        if sums is not None:
            stats = stats_from_sums(sums, n, q.dim)
            self._observe_error(q, stats)
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
        host_norms = norms
        codes, norms = codes.to(self.device, non_blocking=True), norms.to(self.device, non_blocking=True)
        # The request's own descriptor, not the server quantizer's: the library compares its fingerprint.
        packed = Packed(codes=codes, norms=norms, **descriptor)
        timings: list = []
        try:
            out = self._timed("dequantize", q, dtype, lambda: q.dequantize(packed, dtype, check=False), timings)
            q.check(host_norms)  # after the library's checks of codes and norms (their order of errors), on the host
        except QuantizerError:
            # A non-finite reference is refused before anything the library refuses, as it always was: looked at
            # here, on the host, only when a request has something else wrong too (no sync on the good path).
            if reference is not None and not bool(torch.isfinite(reference).all()):
                raise _non_finite_reference() from None
            raise
        sums = finite = None
        if reference is not None:
            reference_d = reference.to(self.device, non_blocking=True)
            finite = torch.isfinite(reference_d).all()
            sums = distortion_sums(reference_d, out)
        vectors, sums, finite = self._to_host(out, sums, finite)
        if finite is not None and not bool(finite):
            raise _non_finite_reference()
        self._observe_times(timings)
        self._count("dequantize", q, norms.numel())
        stats = None
        if sums is not None:
            stats = stats_from_sums(sums, norms.numel(), q.dim)
            self._observe_error(q, stats)
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
        logged = t0
        for done, (variant, dim, bits) in enumerate(self.settings.warm_set()):
            self.warm_progress = (done, total)
            # A line every few seconds: a first start on a GPU compiles kernels for minutes, and an operator
            # watching the log must see it move (the same progress as /health/ready's 503 body).
            if time.perf_counter() - logged >= WARM_UP_LOG_EVERY_S:
                logged = time.perf_counter()
                log.info("warm-up: %d of %d quantizers built and run after %.1f s; next %s dim %d %d bits",
                         done, total, logged - t0, variant, dim, bits)
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
                    # check=False as the jobs call them: a checked call runs other kernels (they set the
                    # bad-row flag), which warmed, left every request to compile its own (H200: 19 more).
                    packed = q.quantize(x, check=False)
                    q.dequantize(packed, dtype, check=False)
                    q.roundtrip(x, check=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # The warm-up's largest batches (warm_all_tiles: up to max_vectors rows) need not stay reserved.
            torch.cuda.empty_cache()
        self.warm_progress = (total, total)
        # What exists now (modules, kernels, codebooks, quantizers) lives as long as the process: out of the
        # cyclic collector's reach, a full collection walks only what requests allocate. One walked all ~214k
        # startup objects (122 ms on our 2-core CPU, the event loop stopped meanwhile) and set the tail
        # latency of a loaded server.
        gc.collect()
        gc.freeze()
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
        # warm_up's freeze is process-wide: without this, an app built and closed inside a longer-lived process
        # (tests, an embedding program) stayed alive for good, being part of reference cycles (app.openapi).
        gc.unfreeze()
