"""``Admission``: the counted bound on requests waiting for or running on the device.

Admission is counted, not queued blindly: at most ``max_queue`` requests are admitted (waiting or
running); the next one gets 429 at once instead of waiting. A place is taken as a ``Ticket`` before the
request reads its body, so bodies in flight count against the bound too.
"""

from __future__ import annotations

import threading

from service.errors import QueueFull
from service.metrics import Metrics


class Ticket:
    """One admitted request's place in the bounded queue (a context manager; see ``Admission.admit``).

    Leaving the ``with`` block gives the place back unless a job took it over (``handed_off``): the job
    then gives it back when it ends (``Admission.job_finished``)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.handed_off = False

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.handed_off:
            self.handed_off = True
            self._admission.release()


class Admission:
    """Counters of admitted and running requests, kept in step with the queue-depth and jobs-running
    gauges; all under one lock, so the gauges never show a state the counters did not have."""

    def __init__(self, max_queue: int, metrics: Metrics) -> None:
        self.max_queue = max_queue
        self._metrics = metrics
        self._lock = threading.Lock()
        self._admitted = 0  # waiting or running
        self._running = 0

    def admit(self) -> Ticket:
        """Reserve one of the ``max_queue`` places: a Ticket, or QueueFull (429) at once if none is free."""
        with self._lock:
            if self._admitted >= self.max_queue:
                self._metrics.rejected.labels("queue_full").inc()
                raise QueueFull(
                    f"{self._admitted} requests are already queued or running (max_queue={self.max_queue}); retry later"
                )
            self._admitted += 1
            self._metrics.queue_depth.set(self._admitted - self._running)
        return Ticket(self)

    def job_started(self) -> None:
        """An admitted request's job began on a worker: it moves from waiting to running."""
        with self._lock:
            self._running += 1
            self._publish()

    def job_finished(self) -> None:
        """A job that ``job_started`` ended (however): its place is free again."""
        with self._lock:
            self._admitted -= 1
            self._running -= 1
            self._publish()

    def release(self) -> None:
        """Give back the place of a ticket whose request never started a job (refused, failed or done
        before reaching the device)."""
        with self._lock:
            self._admitted -= 1
            self._publish()

    def _publish(self) -> None:
        """Set the gauges from the counters (call with ``_lock`` held)."""
        self._metrics.jobs_running.set(self._running)
        self._metrics.queue_depth.set(self._admitted - self._running)
