"""Dynamic batching (the model: Triton Inference Server's dynamic batcher): concurrent small requests of the
same kind (same quantizer, op and dtype) that arrive within ``ISOQUANT_BATCH_DELAY_MS`` of the first are
joined into one device job, one kernel launch, and the results are split back by rows.

Why: a small request costs the device a few microseconds but the host a kernel launch, a synchronize and a
copy each (~100 us on a GPU host: docs/BENCHMARKS.md), so with many concurrent clients of 1-128 vectors the
launches, not the device, bound the throughput. Off by default (delay 0): a request then waits for nobody.

The ``Coalescer`` only groups and times: it lives on the event loop (no locks), and hands each formed group
to a ``launch`` callback (``Engine._launch_group``), which runs it on a device worker and resolves every
member's future with its own result or its own error, then calls ``finished``.

A group whose delay is over while the device workers are all running groups stays open, and takes whoever
arrives, until a worker is free (as Triton's batcher forms a batch when a model instance is free): launched on
its timer, it would only have waited in the workers' queue, and the requests behind it would have formed
further small groups queued after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass
class Member:
    """One request in a group: its job arguments, its row count and the future its handler awaits (resolved
    on the event loop). Its queue place is the engine's business (``Engine._joined``)."""

    args: tuple
    rows: int
    future: asyncio.Future = field(repr=False)


class Coalescer:
    """Groups members by key; a group is launched ``delay_s`` after its first member arrived, or at once when
    its rows reach ``max_rows``. After its delay it waits, still open, while ``capacity`` launched groups have
    not ``finished``. Event-loop only."""

    def __init__(
        self, delay_s: float, max_rows: int, launch: Callable[[Hashable, list[Member]], None], capacity: int = 1
    ) -> None:
        self.delay_s = delay_s
        self.max_rows = max_rows
        self.capacity = capacity
        self._launch = launch
        self._open: dict[Hashable, list[Member]] = {}
        self._rows: dict[Hashable, int] = {}
        self._running = 0  # launched groups whose job has not finished
        # Delay over, waiting for a free worker, in order: id(group) -> (key, group)
        self._due: dict[int, tuple[Hashable, list[Member]]] = {}

    def join(self, key: Hashable, args: tuple, rows: int) -> asyncio.Future:
        """Add a request to the open group of ``key`` (opening one, with its timer, if there is none); the
        returned future gets the request's result or exception."""
        loop = asyncio.get_running_loop()
        member = Member(args, rows, loop.create_future())
        group = self._open.get(key)
        if group is None:
            group = self._open[key] = []
            self._rows[key] = 0
            loop.call_later(self.delay_s, self._delay_over, key, group)
        group.append(member)
        self._rows[key] += rows
        if self._rows[key] >= self.max_rows:
            self._start(key, group)
        return member.future

    def open_groups(self) -> int:
        return len(self._open)

    def finished(self) -> None:
        """A launched group's job ended: launch the groups whose delay is over, in order, while workers are free."""
        self._running -= 1
        while self._due and self._running < self.capacity:
            self._start(*self._due.pop(next(iter(self._due))))

    def _delay_over(self, key: Hashable, group: list[Member]) -> None:
        if self._open.get(key) is not group:  # launched already (full before its timer fired)
            return
        if self._running < self.capacity:
            self._start(key, group)
        else:
            self._due[id(group)] = (key, group)

    def _start(self, key: Hashable, group: list[Member]) -> None:
        if self._open.get(key) is not group:  # launched already
            return
        del self._open[key], self._rows[key]
        self._due.pop(id(group), None)
        self._running += 1
        try:
            self._launch(key, group)
        except BaseException:
            self._running -= 1  # no job will call finished() for it
            raise
