"""``Admission``: the counted bound on requests waiting for or running on the device; ``BodyGateMiddleware``:
what a /quantize or /dequantize body may hold while it arrives.

Admission is counted, not queued blindly: at most ``max_queue`` requests are admitted (waiting or
running); the next one gets 429 at once instead of waiting.

A body being received does not hold one of those places. Before, a request took its place before reading
its body, so that with ``max_queue=2`` two clients trickling bodies kept every valid request at 429 for the
30 s body timeout. Now (inside a request that ``BodyGateMiddleware`` gates) ``Admission.admit`` refuses at
once if the queue is full, and otherwise gives a ticket that is only *receiving*: it counts against
``max_receiving`` (bodies in reception, a memory bound) and takes its queue place when the last byte of
the body has been read (429 then if the queue filled meanwhile). A body must also keep coming: after
``body_grace_s``, at ``body_min_rate`` bytes/s on average since its first byte, or the request gets 408 and
its connection closes. Any answer given before its request's body was fully read closes the connection
(otherwise uvicorn would read and drop the rest: a 413 refused from Content-Length would still take in the
whole body).

The middleware finds the request's gate through a context variable: the route runs in the request's task,
where the middleware set it, so ``Admission.admit`` (called by the route through ``Engine.admit``) sees it.
Outside a gated request (other routes, jobs run directly) a ticket takes its queue place at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading

from service.errors import QueueFull, RequestTimeout, Unavailable
from service.http_protocol import BODY_BUFFERED
from service.metrics import Metrics
from service.settings import Settings

# The routes whose bodies go through admission.
GATED_PATHS = frozenset({"/quantize", "/dequantize"})

_gate: contextvars.ContextVar[BodyGate | None] = contextvars.ContextVar("isoquant_body_gate", default=None)


class Ticket:
    """One admitted request's place in the bounded queue (a context manager; see ``Admission.admit``).

    A ticket given while its request's body is still arriving is *receiving*: it holds a place among the
    bodies being received, not in the queue, until its gate reports the body complete. Leaving the
    ``with`` block gives the place back unless a job took it over (``handed_off``): the job then gives it
    back when it ends (``Admission.job_finished``)."""

    def __init__(self, admission: Admission, gate: BodyGate | None = None) -> None:
        self._admission = admission
        self._gate = gate  # set while receiving
        self._handed_off = False

    @property
    def receiving(self) -> bool:
        return self._gate is not None

    @property
    def handed_off(self) -> bool:
        return self._handed_off

    @handed_off.setter
    def handed_off(self, value: bool) -> None:
        if value and self._gate is not None:
            # A job takes a ticket whose body was never seen complete (not a path the routes take: they
            # read the body first). The job is already submitted and will give a queue place back when it
            # ends, so it must hold one: counted without the bound, never refused.
            self._admission.take(force=True)
            self._leave_gate()
        self._handed_off = value

    def body_complete(self) -> None:
        """The body has arrived: take the queue place (QueueFull if none is free; the ticket then stays
        receiving and its ``with`` exit lets go of that)."""
        self._admission.take()
        self._leave_gate()

    def _leave_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.leave()

    def leave(self) -> None:
        """Give the place back, unless a job took it over (what leaving the ``with`` block does; again: nothing)."""
        if self._gate is not None:
            self._leave_gate()
            self._handed_off = True
        elif not self._handed_off:
            self._handed_off = True
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
        self._closed = False

    def close(self) -> None:
        """The service is closing and every request has been answered (uvicorn's graceful shutdown is over):
        a job that has not started yet is dropped instead of run (``job_started`` raises), so that the exit
        waits only for the jobs running on the device. Each queued job's request has had its answer (503
        after the job timeout) or is gone; running them all would delay the exit by the whole queue."""
        with self._lock:
            self._closed = True

    def admit(self) -> Ticket:
        """Reserve one of the ``max_queue`` places: a Ticket, or QueueFull (429) at once if none is free.
        Inside a gated request whose body has not fully arrived, the ticket is receiving (module doc)."""
        gate = _gate.get()
        with self._lock:
            self._refuse_if_full()
            if gate is None or gate.complete:
                self._admitted += 1
                self._metrics.queue_depth.set(self._admitted - self._running)
                return Ticket(self)
        if gate.pool.full():
            self._metrics.rejected.labels("queue_full").inc()
            raise QueueFull(
                f"{gate.pool.count} request bodies are being received (max_receiving={gate.pool.limit}); retry later"
            )
        ticket = Ticket(self, gate)
        gate.hold(ticket)
        return ticket

    def take(self, force: bool = False) -> None:
        """Count one more admitted request (QueueFull if the queue is full, unless ``force``)."""
        with self._lock:
            if not force:
                self._refuse_if_full()
            self._admitted += 1
            self._metrics.queue_depth.set(self._admitted - self._running)

    def _refuse_if_full(self) -> None:
        if self._admitted >= self.max_queue:
            self._metrics.rejected.labels("queue_full").inc()
            raise QueueFull(
                f"{self._admitted} requests are already queued or running (max_queue={self.max_queue}); retry later"
            )

    def job_started(self) -> None:
        """An admitted request's job began on a worker: it moves from waiting to running (after ``close``:
        Unavailable, and the job does not run)."""
        if not self.jobs_started(1):
            raise not_started()

    def jobs_started(self, n: int) -> bool:
        """The jobs of ``n`` admitted requests began on a worker together (a batched group): ``job_started`` for
        each, under one lock and with one update of the gauges. Per member that was ~22-26 Python calls on
        the device worker (GIL held): a batched 1-vector request cost it 63-65 calls before, 40-43 after (cProfile,
        our 2-core CPU). False after ``close``: their places are given back and none runs (each is answered
        ``not_started()``)."""
        with self._lock:
            if self._closed:
                self._admitted -= n
                self._publish()
                return False
            self._running += n
            self._publish()
            return True

    def job_finished(self) -> None:
        """A job that ``job_started`` ended (however): its place is free again."""
        self.jobs_finished(1)

    def jobs_finished(self, n: int) -> None:
        """``n`` jobs that ``jobs_started`` ended (however): their places are free again."""
        with self._lock:
            self._admitted -= n
            self._running -= n
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


def not_started() -> Unavailable:
    """The answer of a job dropped at shutdown before it started (``Admission.close``)."""
    return Unavailable("the service shut down before this job started", type="shutting_down")


class ReceivingPool:
    """The bodies being received at once (event loop only: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def full(self) -> bool:
        return self.count >= self.limit


class BodyGate:
    """One gated request's body: whether it has fully arrived, and the receiving ticket waiting for that."""

    def __init__(self, pool: ReceivingPool) -> None:
        self.pool = pool
        self.complete = False
        self._ticket: Ticket | None = None

    def hold(self, ticket: Ticket) -> None:
        self._ticket = ticket
        self.pool.count += 1

    def release(self, ticket: Ticket) -> None:
        if self._ticket is ticket:
            self._ticket = None
            self.pool.count -= 1

    def body_complete(self) -> None:
        self.complete = True
        if self._ticket is not None:
            self._ticket.body_complete()


class BodyGateMiddleware:
    """Pure ASGI middleware (module doc): gates /quantize and /dequantize bodies, checks their rate, and
    closes the connection after any answer given before its request's body was fully read."""

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.pool = ReceivingPool(settings.max_receiving)
        self.min_rate = settings.body_min_rate
        self.grace = settings.body_grace_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        has_body = False
        for name, value in scope["headers"]:
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
                has_body = True
        gated = scope["method"] == "POST" and scope["path"] in GATED_PATHS
        gate = BodyGate(self.pool) if gated else None
        body = {"complete": not has_body, "started": None, "received": 0}
        loop = asyncio.get_running_loop()

        async def receive_checked():
            if body["complete"]:
                return await receive()
            if gated and self.min_rate > 0 and not scope.get(BODY_BUFFERED):
                message = await self._timed_receive(receive, body, loop)
            else:
                message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body["complete"] = True
                if gate is not None:
                    gate.body_complete()  # takes the queue place; QueueFull (429) if none is free
            return message

        async def send_closing(message):
            if message["type"] == "http.response.start" and not body["complete"]:
                # Answered before the body was read (413 from Content-Length, 408, 429, 401...): close, so
                # that uvicorn does not go on reading and dropping the rest of the body.
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        token = _gate.set(gate)
        try:
            await self.app(scope, receive_checked, send_closing)
        finally:
            _gate.reset(token)

    async def _timed_receive(self, receive, body: dict, loop: asyncio.AbstractEventLoop) -> dict:
        """The next body message, or 408 when the body falls behind ``min_rate`` bytes/s after the grace:
        by the time ``t`` seconds have passed since its first read, ``min_rate * (t - grace)`` bytes must
        have arrived."""
        now = loop.time()
        if body["started"] is None:
            body["started"] = now
        deadline = body["started"] + self.grace + body["received"] / self.min_rate
        try:
            # At least a moment to collect what has already arrived: the loop may have been busy elsewhere.
            async with asyncio.timeout(max(deadline - now, 0.05)):
                message = await receive()
        except TimeoutError:
            raise self._too_slow(body, loop) from None
        if message["type"] == "http.request":
            body["received"] += len(message.get("body", b""))
            behind = loop.time() > body["started"] + self.grace + body["received"] / self.min_rate
            if message.get("more_body", False) and behind:
                raise self._too_slow(body, loop)
        return message

    def _too_slow(self, body: dict, loop: asyncio.AbstractEventLoop) -> RequestTimeout:
        seconds = loop.time() - body["started"]
        return RequestTimeout(
            f"the body arrived too slowly: {body['received']} bytes in {seconds:.1f} s; after {self.grace:g} s a "
            f"body must average at least {self.min_rate} bytes/s",
            "body",
        )
