"""All Prometheus metrics of the service, on one explicit registry (never the global default one).

Label values come only from the served allowlists in ``Settings`` (variants, bits, dtypes) and the fixed
op/direction names below; ``Metrics.label`` maps anything else to ``other``, so the number of series is
bounded whatever clients send. The ``dim`` label is bucketed instead (``dim_label``): every dim from 2 to
4096 is served by default, so it is the exact dim for the common sizes, the warm set and a short served
list, and ``le_<power of two>`` for the others. Every duration is in seconds and every size in bytes.

With several server processes (``ISOQUANT_PROCESSES`` > 1) prometheus_client's multiprocess mode is on
(``PROMETHEUS_MULTIPROC_DIR``, set by ``python -m service`` before the workers start): every process
writes its samples to files there and any process's /metrics sums them (counters, histograms) or
combines the gauges as each gauge's ``multiprocess_mode`` says (queue depth and in-flight: sum over
live processes; ready: the minimum, so 1 only when every process is warm). The per-process
``process_*`` metrics are left out in that mode: they would describe only the process scraped.
"""

from __future__ import annotations

import glob
import os
import platform
import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from service.settings import Settings


class SizedFilesCollector(MultiProcessCollector):
    """prometheus_client's multiprocess collector, reading only files that have been sized. A process creates its
    metric file empty (``MmapedDict`` opens it, then truncates it to its first size): a read in between raised
    ``struct.error`` (a CI run: one server process registering this collector, which reads every file, while
    another started), and a process killed in between would leave it so for every later scrape. An empty file
    holds no samples; a file deleted after the listing (a dead process's live gauges) is skipped, as
    prometheus_client skips it."""

    def __init__(self, registry: CollectorRegistry, path: str):
        self._files_path = path
        super().__init__(registry, path=path)

    def collect(self):
        sized = []
        for name in glob.glob(os.path.join(self._files_path, "*.db")):
            try:
                if os.path.getsize(name):
                    sized.append(name)
            except FileNotFoundError:
                continue
        return self.merge(sized, accumulate=True)


OPS = ("quantize", "dequantize", "roundtrip")
# 1 us .. 1 s in a 1-2.5-5 ladder: GPU kernels on small batches are microseconds, CPU reference on
# 65,536 vectors is hundreds of milliseconds.
KERNEL_BUCKETS = (
    1e-6,
    2.5e-6,
    5e-6,
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
RELATIVE_ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Dims that keep their own value as the dim label: heads of LLM KV caches and the usual embedding sizes.
COMMON_DIMS = (32, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
# A served list this short labels every dim it holds by its value (ISOQUANT_DIMS=64,100,300: three labels).
EXACT_DIMS_UP_TO = 32


def dim_label(dim: int, exact: frozenset[int] | set[int]) -> str:
    """The dim label: the dim itself if it is in ``exact``, else ``le_<p>`` with p the smallest power of two
    >= dim ("le_512" for 300 or 500: a dim in (256, 512] not labelled exactly). At most len(exact) + 12
    values (le_2 .. le_4096) whatever clients send."""
    if dim in exact:
        return str(dim)
    return f"le_{1 << max(1, (int(dim) - 1).bit_length())}"


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, when it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The metric objects and the label allowlist; one instance per app."""

    def __init__(self, settings: Settings, version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._settings = settings
        self._multiprocess_dir = multiprocess_dir()
        exact = set(COMMON_DIMS) | set(settings.warm_dims)
        if len(settings.dims) <= EXACT_DIMS_UP_TO:
            exact |= set(settings.dims)
        self._exact_dims = frozenset(d for d in exact if settings.serves_dim(d))
        self._allowed = {
            "variant": set(settings.variants),
            "bits": {str(b) for b in settings.bits},
            "dtype": set(settings.dtypes),
            "op": set(OPS),
        }
        r = self.registry
        self.kernel_duration = Histogram(
            "isoquant_kernel_duration_seconds",
            "Device time of one library op on one batch (CUDA events on GPU, wall clock on CPU)",
            ["op", "variant", "dim", "bits", "dtype"],
            buckets=KERNEL_BUCKETS,
            registry=r,
        )
        self.vectors = Counter("isoquant_vectors", "Vectors processed", ["op", "variant", "dim", "bits"], registry=r)
        self.payload_bytes = Counter(
            "isoquant_payload_bytes",
            "Tensor bytes received (direction=in: vectors or codes+norms) and returned (direction=out)",
            ["op", "direction"],
            registry=r,
        )
        self.batch_size = Histogram(
            "isoquant_batch_size_vectors", "Vectors per request", ["op"], buckets=BATCH_BUCKETS, registry=r
        )
        self.coalesced = Histogram(
            "isoquant_coalesced_requests",
            "Requests joined into one device launch by dynamic batching (ISOQUANT_BATCH_DELAY_MS > 0)",
            ["op"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.relative_error = Histogram(
            "isoquant_reconstruction_relative_error",
            "Mean per-vector relative error ||x - x_hat|| / ||x|| of one request's round trip",
            ["variant", "dim", "bits"],
            buckets=RELATIVE_ERROR_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "isoquant_queue_depth",
            "Requests holding a max_queue place (taken once the body has arrived) and not yet running on the device",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.jobs_running = Gauge(
            "isoquant_jobs_running", "Jobs running on the device now", registry=r, multiprocess_mode="livesum"
        )
        self.inflight = Gauge(
            "isoquant_inflight_requests", "HTTP requests being served now", registry=r, multiprocess_mode="livesum"
        )
        self.ready = Gauge(
            "isoquant_ready",
            "1 once warm-up finished and until shutdown starts, else 0 (several processes: 1 when all are)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.rejected = Counter(
            "isoquant_rejected_requests", "Requests refused before device work, by reason", ["reason"], registry=r
        )
        self.device_errors = Counter(
            "isoquant_device_errors", "Device failures answered with 503", ["kind"], registry=r
        )
        self.quantizers = Gauge(
            "isoquant_quantizers_resident",
            "Quantizers held on the device (summed over processes)",
            ["cache"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.warmup_seconds = Gauge(
            "isoquant_warmup_duration_seconds",
            "Wall time of the start-up warm-up (the longest over processes)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            "isoquant_build_info",
            "Constant 1; labels say what is running",
            ["version", "torch", "python", "device", "backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.process_cpu = Counter(
            "isoquant_process_cpu_seconds",
            "CPU time (user + system) of the server processes",
            registry=r,
        )
        self.process_memory = Gauge(
            "isoquant_process_resident_memory_bytes",
            "Resident memory of the server processes, summed",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.gpu_memory = Gauge(
            "isoquant_gpu_memory_bytes",
            "GPU memory held by the torch allocator (allocated: in tensors; reserved: cached), summed over processes",
            ["device", "kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.request_duration = Histogram(
            "isoquant_request_duration_seconds",
            "Wall time of an HTTP request, by route template and status",
            ["route", "method", "status"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "isoquant_requests", "HTTP requests by route template and status", ["route", "method", "status"], registry=r
        )
        self._version = version
        self.device = None
        # Bound children of the per-request metrics (observe_http, observe_op), by label values: labels() looks
        # them up under a lock and checks the values on every call, twice or three times a request.
        self._http_children: dict[tuple[str, str, str], tuple] = {}
        self._op_children: dict[str, tuple] = {}
        self._process_lock = threading.Lock()
        self._cpu_counted = 0.0
        PlatformCollector(registry=r)
        if self._multiprocess_dir is None:
            ProcessCollector(registry=r)
            self._exposed = r
        else:
            # The samples of every process, read from the multiprocess directory at each scrape.
            self._exposed = CollectorRegistry(auto_describe=True)
            SizedFilesCollector(self._exposed, self._multiprocess_dir)
            PlatformCollector(registry=self._exposed)

    def observe_http(self, route: str, method: str, status: str, seconds: float) -> None:
        """One HTTP request answered: its count and duration by route template, method and status."""
        labels = (route, method, status)
        children = self._http_children.get(labels)
        if children is None:
            children = self._http_children[labels] = (
                self.requests.labels(*labels),
                self.request_duration.labels(*labels),
            )
        children[0].inc()
        children[1].observe(seconds)

    def observe_op(self, op: str, vectors: int, bytes_in: int, bytes_out: int) -> None:
        """One /quantize or /dequantize answered: its vector count and tensor bytes in and out."""
        children = self._op_children.get(op)
        if children is None:
            children = self._op_children[op] = (
                self.batch_size.labels(op),
                self.payload_bytes.labels(op, "in"),
                self.payload_bytes.labels(op, "out"),
            )
        children[0].observe(vectors)
        children[1].inc(bytes_in)
        children[2].inc(bytes_out)

    def set_ready(self, ready: bool) -> None:
        """isoquant_ready for this process; in multiprocess mode also a marker file ``ready-<pid>`` in the
        shared folder, which ``processes_ready`` counts for /health/ready."""
        self.ready.set(1 if ready else 0)
        if self._multiprocess_dir is not None:
            marker = os.path.join(self._multiprocess_dir, f"ready-{os.getpid()}")
            if ready:
                open(marker, "w").close()
            elif os.path.exists(marker):
                os.remove(marker)

    def processes_ready(self) -> int | None:
        """How many server processes are ready (multiprocess mode), else None."""
        if self._multiprocess_dir is None:
            return None
        return sum(name.startswith("ready-") for name in os.listdir(self._multiprocess_dir))

    def exposition(self) -> bytes:
        """The text exposition for /metrics (of all processes in multiprocess mode)."""
        self.refresh_process_gauges()
        return generate_latest(self._exposed)

    def job_done(self) -> None:
        """After each device job and the warm-up: with several processes, refresh this one's process
        gauges so that another process's scrape sees them at most one job old. (With one process the
        scrape itself refreshes them; nothing to do on the job's path.)"""
        if self._multiprocess_dir is not None:
            self.refresh_process_gauges()

    def refresh_process_gauges(self) -> None:
        """Reads this process's CPU time, resident memory and torch allocator (GPU only) into the
        isoquant_process_* and isoquant_gpu_memory_bytes series. Called at each scrape and, in multiprocess
        mode, after each job (``job_done``; an idle process's values do not change). prometheus_client's
        own process_* collector describes only the process it runs in, so it is left out in that mode;
        these work in both."""
        with self._process_lock:
            cpu = time.process_time()
            self.process_cpu.inc(max(0.0, cpu - self._cpu_counted))
            self._cpu_counted = cpu
        try:
            with open("/proc/self/statm") as statm:
                self.process_memory.set(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, IndexError):
            pass  # not Linux: no resident-memory sample
        if self.device is not None and self.device.type == "cuda":
            import torch

            device = str(self.device)
            self.gpu_memory.labels(device, "allocated").set(torch.cuda.memory_allocated(self.device))
            self.gpu_memory.labels(device, "reserved").set(torch.cuda.memory_reserved(self.device))

    def label(self, name: str, value: object) -> str:
        """The label value if it is on the allowlist, else 'other'; for ``dim``, ``dim_label`` (a served dim
        exactly or its power-of-two bucket, 'other' for a dim not served). Bounded cardinality either way."""
        if name == "dim":
            if isinstance(value, bool) or not isinstance(value, int) or not self._settings.serves_dim(value):
                return "other"
            return dim_label(value, self._exact_dims)
        text = str(value)
        return text if text in self._allowed[name] else "other"

    def kernel_labels(self, op: str, variant: str, dim: int, bits: int, dtype: str) -> dict[str, str]:
        return {
            "op": self.label("op", op),
            "variant": self.label("variant", variant),
            "dim": self.label("dim", dim),
            "bits": self.label("bits", bits),
            "dtype": self.label("dtype", dtype),
        }

    def set_build_info(self, device, backend: str) -> None:
        import torch

        self.device = device
        self.build_info.labels(self._version, torch.__version__, platform.python_version(), str(device), backend).set(1)
