"""The service's one settings class: every field can come from a flag (host, port) or from the
environment as ``ISOQUANT_<FIELD>`` (e.g. ``ISOQUANT_WARM_DIMS=64,128``).

List settings accept a comma-separated string in the environment (``full,fast``) as well as JSON
(``["full","fast"]``).
"""

from __future__ import annotations

import bisect
import os
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kernels import INPUT_DTYPES, MAX_BITS, MAX_DIM, MIN_BITS, MIN_DIM, VARIANTS

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _split(value: object) -> object:
    """'a, b' -> ['a', 'b']; JSON lists and real lists pass through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, int):
        return [value]
    return value


def _split_ranges(value: object) -> object:
    """Like ``_split``, and a part "a-b" stands for every integer from a to b ("2-4096", "64,128,300-400")."""
    parts = _split(value)
    if not isinstance(parts, list):
        return parts
    out: list = []
    for part in parts:
        low, dash, high = part.partition("-") if isinstance(part, str) else ("", "", "")
        if dash and low.strip().isdigit() and high.strip().isdigit():
            if int(low) > int(high):
                raise ValueError(f"range {part!r} is empty: write low-high")
            out.extend(range(int(low), int(high) + 1))
        else:
            out.append(part)
    return out


def ranges_text(values: list[int]) -> str:
    """Sorted integers in the ISOQUANT_DIMS syntax, runs as ranges: [2, 3, ..., 4096] -> "2-4096";
    [32, 64, 96, 97, 98] -> "32, 64, 96-98"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a + 1 else (f"{a}, {b}" if b > a else str(a)) for a, b in runs)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's cpuset or taskset), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_torch_threads(processes: int = 1, cores: int | None = None) -> int:
    """ISOQUANT_TORCH_THREADS when unset, on the CPU: half the usable cores, shared among the server processes,
    at least 1. The other half is for what runs beside the kernels (the event loop, body decoding, clients on the
    same host): on a 2-core VM, 1 thread served 1.6x the requests of torch's default of 2, whose OpenMP team
    waited at its barriers for cores the service's other threads held (docs/CLIENTS.md, "isoquant bench")."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // (2 * max(1, processes)))


StrList = Annotated[list[str], NoDecode]
IntList = Annotated[list[int], NoDecode]


class Settings(BaseSettings):
    """Configuration of one service process (see docs/OPERATIONS.md for the table)."""

    model_config = SettingsConfigDict(env_prefix="ISOQUANT_", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="Address uvicorn binds (flag --host).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (flag --port; 0 picks a free one).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N. auto takes cuda when available.")

    # What the service accepts. Label values of every metric come only from these lists, so they
    # also bound the metrics' cardinality.
    variants: StrList = Field(list(VARIANTS), description="Variants served.")
    # Every dim the library supports by default (embedding sizes 384, 768, 1536 ...): quantizers of dims outside
    # the warm set are built on first use, and the metrics' dim label is bucketed (service/metrics.py), so
    # serving them all costs neither memory up front nor unbounded label values.
    # The default is written in the variable's own syntax (validate_default expands it), which is also how the
    # README's table shows it: not as 4,095 numbers.
    dims: IntList = Field(
        f"{MIN_DIM}-{MAX_DIM}",
        description=f"Vector dimensions served: values and ranges ('{MIN_DIM}-{MAX_DIM}', '64,128,300-400').",
    )
    bits: IntList = Field(list(range(MIN_BITS, MAX_BITS + 1)), description="Bit widths served.")
    dtypes: StrList = Field(list(INPUT_DTYPES), description="Input/output dtypes served.")

    # The warm set: built on the device and run once per dtype before the service reports ready.
    warm_variants: StrList = Field(["full", "fast", "2d"], description="Variants warmed at start-up.")
    warm_dims: IntList = Field([64, 128, 256], description="Dimensions warmed at start-up.")
    warm_bits: IntList = Field([2, 3, 4], description="Bit widths warmed at start-up.")
    warm_dtypes: StrList = Field(list(INPUT_DTYPES), description="Dtypes each warm quantizer runs once.")
    warm_batch: int = Field(64, ge=1, le=65536, description="Vectors per warm-up call.")
    warm_all_tiles: bool = Field(
        False,
        description=(
            "On the Triton backend, also run each warm quantizer at the batch sizes where the kernels change "
            "tile (up to max_vectors), so that no request compiles a kernel. Off by default: on a cold Triton "
            "cache it compiles several times the kernels (6-10 batch size classes a quantizer)."
        ),
    )

    default_seed: int = Field(0, ge=0, le=(1 << 64) - 1, description="Seed used when a request gives none.")
    seed_cache_size: int = Field(32, ge=1, description="Quantizers kept for non-default seeds (LRU).")
    quantizer_cache_size: int = Field(
        64,
        ge=1,
        description="Quantizers of the default seed outside the warm set, built on first use, kept in an LRU of "
        "this size (the warm set stays resident).",
    )

    max_request_bytes: int = Field(64 << 20, ge=1024, description="Largest request body accepted (413 above).")
    max_vectors: int = Field(65536, ge=1, description="Most vectors in one request (413 above).")
    max_queue: int = Field(64, ge=1, description="Most requests admitted to the device queue (429 above).")
    workers: int = Field(1, ge=1, le=64, description="Threads that run device work (1 keeps one GPU stream busy).")
    pinned_host_bytes: int = Field(
        1 << 30,
        ge=0,
        description="GPU: page-locked host memory for request bodies and results, per server process; beyond it, "
        "pageable memory (0: never pinned).",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes sharing the port, each with its own engine on the device (python -m service).",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="torch intra-op threads of each device worker on CPU (unset: half the usable cores divided by "
        "the server processes, at least 1; see auto_torch_threads).",
    )
    job_timeout_s: float = Field(60.0, gt=0, description="A request whose work has not finished by then gets 503.")
    batch_delay_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Dynamic batching: concurrent /quantize (codes only) and /dequantize (no reference) requests "
        "for the same quantizer and dtype that arrive within this many ms of the first (or later, while every "
        "device worker runs a group) share one device launch (0: off).",
    )
    batch_max_vectors: int = Field(
        4096,
        ge=1,
        description="Dynamic batching: a group is launched at once when its vectors reach this; larger requests "
        "run alone.",
    )
    drain_seconds: float = Field(
        0.0, ge=0, description="After SIGTERM: seconds to stay up, not ready, before shutting down."
    )
    # What a client may send before the app sees its request (service/http_protocol.py), and how slowly it
    # may send a body (service/admission.py).
    max_header_bytes: int = Field(
        64 << 10, ge=1024, le=16 << 20, description="Largest request line + headers, bytes (431 above)."
    )
    max_headers: int = Field(100, ge=1, le=10000, description="Most header fields in a request (431 above).")
    header_timeout_s: float = Field(
        10.0, gt=0, description="Seconds for a request line and headers to arrive (408 and close after)."
    )
    max_receiving: int = Field(
        64,
        ge=1,
        description="Most /quantize and /dequantize bodies being received at once (429 above); they do not "
        "count against max_queue until complete.",
    )
    body_min_rate: int = Field(
        64 << 10,
        ge=0,
        description="After body_grace_s, a body must have arrived at this many bytes/s on average (408 "
        "otherwise; 0: no rate check).",
    )
    body_grace_s: float = Field(5.0, ge=0, description="Seconds a body may take before body_min_rate applies.")

    api_key: SecretStr | None = Field(
        None, description="If set, /quantize, /dequantize, /quantizer and /info need 'Authorization: Bearer <key>'."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field("info")
    triton_cache_dir: str | None = Field(
        None, description="Sets TRITON_CACHE_DIR for compiled kernels (kept across restarts)."
    )

    @field_validator(
        "variants", "bits", "dtypes", "warm_variants", "warm_dims", "warm_bits", "warm_dtypes", mode="before"
    )
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split(value)

    @field_validator("dims", mode="before")
    @classmethod
    def _dim_ranges(cls, value: object) -> object:
        return _split_ranges(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        _subset("variants", self.variants, VARIANTS)
        _subset("dtypes", self.dtypes, tuple(INPUT_DTYPES))
        for name, values in (("dims", self.dims), ("bits", self.bits)):
            low, high = (MIN_DIM, MAX_DIM) if name == "dims" else (MIN_BITS, MAX_BITS)
            if not values or any(not low <= v <= high for v in values):
                outside = [v for v in values if not low <= v <= high][:5]
                raise ValueError(
                    f"{name} (ISOQUANT_{name.upper()}) must be a non-empty list of integers in {low}..{high}; "
                    f"got {outside or 'an empty list'}"
                )
        self.dims, self.bits = sorted(set(self.dims)), sorted(set(self.bits))
        _subset("warm_variants", self.warm_variants, tuple(self.variants), allow_empty=True)
        _subset("warm_dtypes", self.warm_dtypes, tuple(self.dtypes), allow_empty=True)
        _subset("warm_dims", self.warm_dims, tuple(self.dims), allow_empty=True, shown=ranges_text(self.dims))
        _subset("warm_bits", self.warm_bits, tuple(self.bits), allow_empty=True)
        return self

    def serves_dim(self, dim: int) -> bool:
        """Whether ``dim`` is served (a binary search: the default list holds every dim from 2 to 4096)."""
        i = bisect.bisect_left(self.dims, dim)
        return i < len(self.dims) and self.dims[i] == dim

    def dims_text(self) -> str:
        """The served dims in the ISOQUANT_DIMS syntax, runs as ranges ("2-4096")."""
        return ranges_text(self.dims)

    def warm_set(self) -> list[tuple[str, int, int]]:
        """(variant, dim, bits) triples built at start-up, in a stable order."""
        return [(v, d, b) for v in self.warm_variants for d in self.warm_dims for b in self.warm_bits]


def _subset(name: str, values: list, allowed: tuple, allow_empty: bool = False, shown: str | None = None) -> None:
    variable = f"{name} (ISOQUANT_{name.upper()})"
    shown = shown or ", ".join(map(str, allowed))  # e.g. the served dims as ranges, not 4,095 numbers
    if not values and not allow_empty:
        raise ValueError(f"{variable} must not be empty; allowed: {shown}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{variable}: {unknown} not allowed; allowed: {shown}")
