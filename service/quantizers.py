"""``QuantizerCache``: the quantizers resident on the service's device, built on first use.

Three stores: the warm set's quantizers (default seed), kept for the life of the process; an LRU of at most
``default_cache_size`` other quantizers of the default seed; and an LRU of at most ``seed_cache_size``
quantizers of other seeds. Both LRUs are bounded because what clients may ask for is not: every dim from 2
to 4096 is served by default, times the variants and bit widths, and any of 2^64 seeds. A dense quantizer at
dim 4096 holds a 64 MiB rotation, so the bounds are what keeps a client that walks through dims from filling
the device.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch

from kernels import Quantizer
from service.metrics import Metrics

DefaultSeedKey = tuple[str, int, int]  # variant, dim, bits
OtherSeedKey = tuple[str, int, int, int]  # variant, dim, bits, seed


class QuantizerCache:
    """Quantizers on one device, each built at most once while it stays cached.

    Locking: every read and write of the maps happens under ``_lock``, which is never held while a quantizer
    is built, so lookups of built quantizers never wait behind a codebook computation. Builds take
    ``_build_lock`` (one build at a time: codebooks are cached per process) and look the key up again under
    it, so that threads that missed the same key together build it once and share the result.

    ``pinned``: default-seed keys kept for the life of the process (the warm set). ``default_cache_size``:
    other default-seed quantizers kept, least recently used evicted first (None: no bound, as when the served
    lists themselves bounded them).
    """

    def __init__(
        self,
        device: torch.device,
        default_seed: int,
        seed_cache_size: int,
        metrics: Metrics,
        *,
        pinned: Iterable[DefaultSeedKey] = (),
        default_cache_size: int | None = None,
    ) -> None:
        self.device = device
        self.default_seed = default_seed
        self.seed_cache_size = seed_cache_size
        self.default_cache_size = default_cache_size
        self._pinned_keys = frozenset(pinned)
        self._metrics = metrics
        self._lock = threading.Lock()  # every map
        self._build_lock = threading.Lock()  # one build at a time
        self._pinned: dict[DefaultSeedKey, Quantizer] = {}
        self._default_seed: OrderedDict[DefaultSeedKey, Quantizer] = OrderedDict()
        self._other_seeds: OrderedDict[OtherSeedKey, Quantizer] = OrderedDict()

    def get(self, variant: str, dim: int, bits: int, seed: int) -> Quantizer:
        """The quantizer for these parameters, built on this device on first use (slow then: call it from
        a device worker). The library's QuantizerError for parameters it refuses propagates."""
        if seed == self.default_seed:
            return self._cached((variant, dim, bits), self._lookup_default_seed, self._store_default_seed, seed)
        return self._cached((variant, dim, bits, seed), self._lookup_other_seed, self._store_other_seed, seed)

    def counts(self) -> dict[str, int]:
        """Resident quantizers by cache: {"default_seed": n, "other_seeds": m} (GET /info)."""
        with self._lock:
            return {"default_seed": len(self._pinned) + len(self._default_seed), "other_seeds": len(self._other_seeds)}

    def _cached(self, key: tuple, lookup, store, seed: int) -> Quantizer:
        """``lookup(key)`` under ``_lock``; on a miss, build under ``_build_lock``, looking up again first (a
        thread that held the build lock before us may have built it), and ``store(key, q)`` under ``_lock``."""
        with self._lock:
            q = lookup(key)
        if q is not None:
            return q
        with self._build_lock:
            with self._lock:
                q = lookup(key)
            if q is None:
                q = Quantizer(*key[:3], seed, device=self.device)
                with self._lock:
                    store(key, q)
        return q

    def _lookup_default_seed(self, key: DefaultSeedKey) -> Quantizer | None:
        """The cached quantizer, marked most recently used if it is in the LRU (call with ``_lock`` held)."""
        q = self._pinned.get(key)
        if q is None:
            q = self._default_seed.get(key)
            if q is not None:
                self._default_seed.move_to_end(key)
        return q

    def _store_default_seed(self, key: DefaultSeedKey, q: Quantizer) -> None:
        if key in self._pinned_keys:
            self._pinned[key] = q
        else:
            self._default_seed[key] = q
            while self.default_cache_size is not None and len(self._default_seed) > self.default_cache_size:
                self._default_seed.popitem(last=False)  # least recently used
        self._metrics.quantizers.labels("default_seed").set(len(self._pinned) + len(self._default_seed))

    def _store_other_seed(self, key: OtherSeedKey, q: Quantizer) -> None:
        self._other_seeds[key] = q
        while len(self._other_seeds) > self.seed_cache_size:
            self._other_seeds.popitem(last=False)  # least recently used
        self._metrics.quantizers.labels("other_seeds").set(len(self._other_seeds))

    def _lookup_other_seed(self, key: OtherSeedKey) -> Quantizer | None:
        """The cached quantizer, marked most recently used (call with ``_lock`` held)."""
        q = self._other_seeds.get(key)
        if q is not None:
            self._other_seeds.move_to_end(key)
        return q
