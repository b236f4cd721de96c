"""The service's one settings class: every field can come from a flag (host, port) or from the
environment as ``ISOQUANT_<FIELD>`` (e.g. ``ISOQUANT_WARM_DIMS=64,128``).

List settings accept a comma-separated string in the environment (``full,fast``) as well as JSON
(``["full","fast"]``).
"""

from __future__ import annotations

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
    dims: IntList = Field([32, 64, 96, 128, 256, 512, 1024], description="Vector dimensions served.")
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
        None, ge=1, le=256, description="torch intra-op threads of each device worker on CPU (default: torch's)."
    )
    job_timeout_s: float = Field(60.0, gt=0, description="A request whose work has not finished by then gets 503.")
    drain_seconds: float = Field(
        0.0, ge=0, description="After SIGTERM: seconds to stay up, not ready, before shutting down."
    )

    api_key: SecretStr | None = Field(
        None, description="If set, /quantize, /dequantize, /quantizer and /info need 'Authorization: Bearer <key>'."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field("info")
    triton_cache_dir: str | None = Field(
        None, description="Sets TRITON_CACHE_DIR for compiled kernels (kept across restarts)."
    )

    @field_validator(
        "variants", "dims", "bits", "dtypes", "warm_variants", "warm_dims", "warm_bits", "warm_dtypes", mode="before"
    )
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split(value)

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
                raise ValueError(f"{name} must be a non-empty list of integers in {low}..{high}; got {values}")
        self.dims, self.bits = sorted(set(self.dims)), sorted(set(self.bits))
        _subset("warm_variants", self.warm_variants, tuple(self.variants), allow_empty=True)
        _subset("warm_dtypes", self.warm_dtypes, tuple(self.dtypes), allow_empty=True)
        _subset("warm_dims", self.warm_dims, tuple(self.dims), allow_empty=True)
        _subset("warm_bits", self.warm_bits, tuple(self.bits), allow_empty=True)
        return self

    def warm_set(self) -> list[tuple[str, int, int]]:
        """(variant, dim, bits) triples built at start-up, in a stable order."""
        return [(v, d, b) for v in self.warm_variants for d in self.warm_dims for b in self.warm_bits]


def _subset(name: str, values: list, allowed: tuple, allow_empty: bool = False) -> None:
    variable = f"{name} (ISOQUANT_{name.upper()})"
    if not values and not allow_empty:
        raise ValueError(f"{variable} must not be empty; allowed: {', '.join(map(str, allowed))}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{variable}: {unknown} not allowed; allowed: {', '.join(map(str, allowed))}")
