"""``HostBuffers``: host memory for request bodies and results, pinned on a GPU within a byte budget."""

from __future__ import annotations

import logging
import math
import threading

import torch
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger("service.host_buffers")


# Smaller host tensors are pageable even on a GPU. For a 1-vector body the pinned path costs the event loop a
# scan of the live pinned storage and a call into torch's caching host allocator on every request, and saves
# ~3 us of copy (H200: a 256-byte copy in and sync, 15.3 us from pinned, 18.7 from pageable memory).
PINNED_MIN_BYTES = 64 << 10


class HostBuffers:
    """Allocates the host tensors that go to or come from ``device``.

    On a GPU they are pinned (torch's caching host allocator: reused across requests, no page faults, one
    DMA to or from the device) while this process's live pinned storage stays within ``pinned_budget_bytes``;
    beyond that, below ``PINNED_MIN_BYTES``, or if pinned memory cannot be had, pageable memory does (slower
    copies, same results). On a CPU device they are ordinary tensors.
    """

    def __init__(self, device: torch.device, pinned_budget_bytes: int) -> None:
        self.device = device
        self.pinned_budget_bytes = pinned_budget_bytes
        self._lock = threading.Lock()  # the list of pinned storage handed out
        self._pinned: list[tuple[StorageWeakRef, int]] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized host tensor, pinned while the budget allows (see the class). The allocator
        keeps what it hands out, rounded up to powers of two, so the page-locked memory of a process stays
        under about twice the budget. (Two allocations at once may both fit and together pass the budget by
        one of them.) MemoryError or RuntimeError when no host memory can be had at all."""
        if self.device.type == "cuda":
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes >= PINNED_MIN_BYTES and self.pinned_bytes_in_use() + nbytes <= self.pinned_budget_bytes:
                try:
                    tensor = torch.empty(shape, dtype=dtype, pin_memory=True)
                except RuntimeError as exc:
                    log.warning("pinned host memory of %d bytes not available (%s); using pageable memory", nbytes, exc)
                else:
                    # A weak reference to the storage, not the tensor: views (parsed tensors, numpy arrays,
                    # answer parts) keep the storage alive after the tensor object is gone.
                    with self._lock:
                        self._pinned.append((StorageWeakRef(tensor.untyped_storage()), nbytes))
                    return tensor
        return torch.empty(shape, dtype=dtype)

    def pinned_bytes_in_use(self) -> int:
        """Bytes of the pinned host storage handed out that is still alive."""
        with self._lock:
            self._pinned = [(ref, n) for ref, n in self._pinned if not ref.expired()]
            return sum(n for _, n in self._pinned)

    def to_host(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Device tensors (None passes through) -> host tensors. On a GPU each goes by one DMA into memory
        from ``empty`` (pinned: no page faults, where .cpu() took a fresh pageable allocation each time) and
        the stream is synchronized once for all; on a CPU device they are returned as they are."""
        if self.device.type != "cuda":
            return list(tensors)
        host = []
        for t in tensors:
            if t is not None:
                copy = self.empty(tuple(t.shape), t.dtype)
                copy.copy_(t, non_blocking=True)
                t = copy
            host.append(t)
        torch.cuda.current_stream(self.device).synchronize()
        return host
