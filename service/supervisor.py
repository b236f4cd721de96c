"""Running the service: one uvicorn server process, or ``processes`` of them on one port.

``ISOQUANT_PROCESSES=N`` (N > 1): the calling process binds the port, starts N server processes, each
with its own engine (quantizers, warm-up, CUDA context) on the same device, and hands them the
connections it accepts in turn (the socket itself goes over a Unix socket pair, SCM_RIGHTS); it
forwards SIGTERM/SIGINT to them and waits. Why it accepts itself: when the processes accepted on the
shared socket, which one took a connection was a race, and 8 keep-alive connections opened together
sat on them as [6, 1, 1] or [3, 3, 1, 1] (H200 host), so /dequantize ran at 46-60% of the in-process
library instead of 110% with the requests spread. Why: one uvicorn process received 16 MiB request bodies at
0.5-1.2 GB/s on the H200 host's CPU with no work in the route, whatever the number of clients; 8
processes took 6.4 GB/s with 8 clients (docs/BENCHMARKS.md). If a server process dies, the others keep
serving and a replacement starts (with a backoff while replacements keep dying); it is offered connections
once it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import re
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import wait

import uvicorn
from prometheus_client import multiprocess

from service.settings import Settings

log = logging.getLogger("service")
# A server process that dies is replaced after this delay, doubled for each replacement that died before it
# was ready, up to the maximum.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 16.0


class _Server(uvicorn.Server):
    """uvicorn's server with a not-ready phase before the graceful shutdown."""

    def __init__(self, config: uvicorn.Config, app, settings: Settings, handoff: socket.socket | None = None) -> None:
        super().__init__(config)
        self._app = app
        self._settings = settings
        self._draining = False
        self._shutting_down = False  # uvicorn's graceful shutdown has begun (after the drain)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handoff = handoff  # the supervisor's accepted connections arrive here (``_dispatch``)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()  # uvicorn installs handle_exit inside serve()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self._handoff is None:
            await super().startup(sockets)
            return
        await super().startup(sockets=[])  # no listening socket of its own
        if self.should_exit or not self.started:
            return
        self._handoff.setblocking(False)
        self._loop.add_reader(self._handoff.fileno(), self._adopt)

    def _adopt(self) -> bool:
        """On the event loop: take the connections the supervisor passed and serve each as uvicorn serves
        the ones it accepts (same protocol class, same server state, so graceful shutdown waits for them).
        One that is served once the shutdown has begun is shut down as uvicorn shuts down the others
        (``_adopted``). True when a message was read (more may follow), False when none is there now, at the pair's
        end or on an error."""
        try:
            message, fds, _, _ = socket.recv_fds(self._handoff, 64, 64)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            message, fds = b"", []
        if not message and not self._shutting_down:  # the supervisor is gone: nobody can reach this process
            self._loop.remove_reader(self._handoff.fileno())
            log.error("the supervisor closed its end of the connection pair; shutting down")
            self.should_exit = True
        config = self.config

        def protocol():
            return config.http_protocol_class(
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        for fd in fds:
            connection = socket.socket(fileno=fd)
            connection.set_inheritable(False)  # recv_fds does not ask for close-on-exec
            connection.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(protocol, connection))
            task.add_done_callback(self._adopted)
        return bool(message)

    def _adopted(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("a connection passed by the supervisor could not be served: %s", task.exception())
        elif self._shutting_down:
            # Served from a turn after uvicorn asked its connections to shut down: not among them, it would
            # be kept alive, serving request after request, until uvicorn's deadline cancelled the one open.
            _, protocol = task.result()
            protocol.shutdown()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._shutting_down = True
        if self._handoff is not None and self._handoff.fileno() != -1:
            # Take no more connections: from the shutdown of our end on, the supervisor's sends fail and it
            # hands new connections to the other processes (or, if none is left, is no longer accepting).
            # Those it passed before are in the pair still: served (and shut down) as the others, rather
            # than closed unanswered with it. (Linux: after SHUT_RD of a Unix socket what is queued stays
            # readable and the peer's sends fail with EPIPE; BSDs discard the queue, passed descriptors too.)
            self._loop.remove_reader(self._handoff.fileno())
            with contextlib.suppress(OSError):
                self._handoff.shutdown(socket.SHUT_RD)
            while self._adopt():
                pass
            self._handoff.close()
        await super().shutdown(sockets)

    def handle_exit(self, sig, frame) -> None:
        # A signal handler runs between two bytecodes of the main thread, which may hold a lock right
        # then (logging's, a metric's; in multiprocess mode one lock guards every metric write). So it
        # only sets flags and hands the rest to the event loop (call_soon_threadsafe takes no lock):
        # calling engine.begin_shutdown() here deadlocked a server process whose main thread was
        # inside a metric update.
        engine = self._app.state.isoquant.engine
        if engine is not None:
            engine.draining = True  # /health/ready answers 503 from now on
            self._loop.call_soon_threadsafe(engine.begin_shutdown)
        if self._settings.drain_seconds > 0 and not self._draining:
            self._draining = True
            self._loop.call_soon_threadsafe(self._drain, sig, frame)
            return
        super().handle_exit(sig, frame)

    def _drain(self, sig, frame) -> None:
        """On the event loop: stay up, not ready, for drain_seconds, then shut down gracefully."""
        log.info("signal %s: not ready; draining for %.1f s", sig, self._settings.drain_seconds)
        self._loop.call_later(self._settings.drain_seconds, uvicorn.Server.handle_exit, self, sig, frame)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    from service.http_protocol import graceful_shutdown_s, protocol_class

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # Bounds on the request line and headers, their count and their arrival time (service/http_protocol.py).
        http=protocol_class(settings),
        log_level=settings.log_level,
        # Requests still open this long after uvicorn stops accepting are answered 503 and cancelled
        # (docs/OPERATIONS.md, "Shutdown", states the bound this gives).
        timeout_graceful_shutdown=graceful_shutdown_s(settings),
        access_log=settings.log_level in ("debug", "trace"),
    )


def serve(settings: Settings, handoff: socket.socket | None = None) -> bool:
    """One server process: the app, its engine and uvicorn, on its own port, or on the connections the
    supervisor passes over ``handoff``. True when a SIGINT ended it (after the graceful shutdown)."""
    from service.app import create_app

    app = create_app(settings)
    try:
        _Server(_uvicorn_config(app, settings), app, settings, handoff).run()
    except KeyboardInterrupt:
        # uvicorn raises the SIGINT it handled again once its shutdown is over, so that the process ends as
        # interrupted; Python turns that into this exception, which would end it with a traceback (Ctrl-C).
        return True
    return False


def _worker(overrides: dict, handoff: socket.socket) -> None:
    """Entry point of a server process started by ``supervise`` (a fresh interpreter: spawn)."""
    supervisor = os.getppid()
    try:
        settings = Settings(**overrides)
        configure_logging(settings)
        serve(settings, handoff)
    finally:
        if os.getppid() != supervisor:
            # The supervisor died without cleaning up (SIGKILL): the last server process out removes the
            # metrics folder (each removes its own files and those of dead processes, then the folder if
            # that left it empty).
            folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            if folder and sweep_metrics_dir(folder, exiting=os.getpid()):
                log.info("the supervisor is gone; removed its metrics folder %s", folder)


# The metrics folder of a supervisor: isoquant-metrics-<supervisor pid>-<random>, in the temporary directory.
METRICS_PREFIX = "isoquant-metrics-"
# prometheus_client's files (<kind>_<pid>.db) and the readiness markers (ready-<pid>): each names its process.
_FILE_PID = re.compile(r"^(?:[a-z_]+_(\d+)\.db|ready-(\d+))$")
_DIR_PID = re.compile(re.escape(METRICS_PREFIX) + r"(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def sweep_metrics_dir(folder: str, exiting: int | None = None) -> bool:
    """Remove from ``folder`` the files of processes that are provably gone (no such pid) or of
    ``exiting`` (the caller, on its way out), then the folder if nothing else is left in it. Files whose
    process lives, or that name no process, are kept, and so is the folder. True if the folder is gone."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return True
    for name in names:
        match = _FILE_PID.match(name)
        if match is None:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == exiting or not _alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        return True
    except OSError:  # not empty: a live process still has files there
        return False
    return True


def sweep_stale_metrics_dirs(parent: str) -> list[str]:
    """Metrics folders left in ``parent`` by supervisors that died with their server processes (kill -9 of
    the whole group, a power cut): removed when the supervisor named in the folder's name and every
    process named in its files are gone. The folders removed."""
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for name in entries:
        match = _DIR_PID.match(name)
        folder = os.path.join(parent, name)
        if match is None or not os.path.isdir(folder) or _alive(int(match.group(1))):
            continue
        if sweep_metrics_dir(folder):
            removed.append(folder)
    return removed


# The dispatcher looks this often whether the drain after a signal is over (it then stops accepting).
ACCEPT_POLL_S = 0.02


def _dispatch(sock: socket.socket, handoffs: list[socket.socket], closing: threading.Event,
              stop_accepting_at: list[float]) -> None:
    """Supervisor thread: accept connections on ``sock`` and pass each to the next server process in
    turn, until ``closing`` is set and ``sock`` closed, or the time in ``stop_accepting_at`` (the end of
    the drain after a signal) has come: from then on, as a single uvicorn process, the port refuses
    connections, rather than accept them for server processes that no longer take any (closed unanswered,
    the client that sent a request on one would see "Server disconnected without sending a response").
    A process whose socket pair is closed (it has exited or is shutting down) or full (it is not
    reading: still starting, or stuck) is skipped; when none can take the connection, the dispatcher
    waits and retries, so that further connections wait in the listening backlog rather than being
    accepted and dropped. A connection is closed unanswered only when every process has closed its pair
    (after a second signal, which ends the processes' drain early: the port is then closed at once)."""
    turn = 0
    sock.setblocking(False)  # accept only what select reported, and look at the time again at least this often
    while not closing.is_set():
        wait = ACCEPT_POLL_S
        if stop_accepting_at:
            wait = min(wait, stop_accepting_at[0] - time.monotonic())  # (select returns by the drain's end)
            if wait <= 0:
                _stop_accepting(sock, handoffs, turn, closing)
                return
        try:
            if not select.select([sock], [], [], wait)[0]:
                continue
            connection, _ = sock.accept()
        except BlockingIOError:  # taken back by the client before the accept
            continue
        except (OSError, ValueError) as exc:  # ValueError: select on the socket the main thread has closed
            if closing.is_set() or sock.fileno() < 0:
                return
            # EMFILE, ENOBUFS, a connection reset before it was accepted...: accept(2) says to retry.
            log.warning("accept failed (%s); retrying", exc)
            time.sleep(0.1)
            continue
        taken, turn = _pass(connection, handoffs, turn, closing)
        if taken is False and stop_accepting_at:  # every process has closed its pair before the drain's end
            _stop_accepting(sock, handoffs, turn, closing)
            return


def _pass(connection: socket.socket, handoffs: list[socket.socket], turn: int, closing: threading.Event):
    """Offer ``connection`` until a process takes it or every pair is closed (then it is closed unanswered);
    (True | False | None when ``closing``, next turn)."""
    taken = None
    with connection:
        while not closing.is_set():
            taken, turn = _offer(connection, handoffs, turn)
            if taken is not None:  # passed, or every process has closed its pair
                break
            time.sleep(0.01)
    return taken, turn


def _stop_accepting(sock: socket.socket, handoffs: list[socket.socket], turn: int, closing: threading.Event) -> None:
    """Close the listening socket, after passing on the connections already in its backlog (closing it would
    reset them: their clients may have sent a request). The processes still take connections now: their own
    drain, timed from the signal forwarded after ours, ends later."""
    while not closing.is_set():
        try:
            connection, _ = sock.accept()
        except (OSError, ValueError):  # BlockingIOError: the backlog is empty
            break
        taken, turn = _pass(connection, handoffs, turn, closing)
        if taken is False:
            break
    with contextlib.suppress(OSError):
        sock.close()
    log.info("stopped accepting connections")


def _offer(connection: socket.socket, handoffs: list[socket.socket], turn: int) -> tuple[bool | None, int]:
    """One round over the socket pairs from ``turn``: (True, next turn) when a process took the
    connection, (False, ...) when every pair is closed, (None, ...) when the open ones are all full."""
    gone = 0
    for _ in range(len(handoffs)):
        i, turn = turn, (turn + 1) % len(handoffs)
        try:
            socket.send_fds(handoffs[i], [b"c"], [connection.fileno()])
        except BlockingIOError:  # full: that process is not reading now
            continue
        except OSError:  # closed: that process has exited or is shutting down
            gone += 1
            continue
        return True, turn
    return (False if gone == len(handoffs) else None), turn


def supervise(settings: Settings, overrides: dict) -> int:
    """Bind the port, run ``settings.processes`` server processes on it, forward SIGTERM/SIGINT, wait."""
    # No exit leaves this folder behind: a normal one removes it below; after a SIGKILL of this process the
    # server processes remove it as they exit (``_worker``); if they were killed too, the next start here
    # removes it (the folder's name carries this pid).
    for stale in sweep_stale_metrics_dirs(tempfile.gettempdir()):
        log.info("removed the metrics folder %s of a supervisor that is gone", stale)
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
    # Read by prometheus_client when it is first imported, in each (spawned) server process.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    config = _uvicorn_config(None, settings)
    sock = config.bind_socket()  # logs "Uvicorn running on http://host:port"
    # Listening now: connections made before the server processes read their socket pairs wait there
    # (about 270 a pair) and then in the backlog, instead of being refused.
    sock.listen(config.backlog)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    workers: list = [None] * settings.processes
    handoffs: list[socket.socket] = [None] * settings.processes  # what the dispatcher offers connections to

    def start(i: int) -> socket.socket:
        """Start server process i on a fresh socket pair; return the supervisor's end (not yet offered)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        workers[i] = context.Process(target=_worker, args=(overrides, child), name=f"isoquant-server-{i}")
        workers[i].start()
        child.close()  # the process has its own copy now
        parent.setblocking(False)  # a process that stops reading must not stall the others' connections
        return parent

    stopping: list[int] = []  # the signals received; a list append takes no lock (see _Server.handle_exit)
    stop_accepting_at: list[float] = []  # when the drain after the first signal ends (_dispatch)

    def stop(sig, frame) -> None:
        stopping.append(sig)
        if not stop_accepting_at:
            stop_accepting_at.append(time.monotonic() + settings.drain_seconds)
        for worker in workers:
            if worker is not None and worker.exitcode is None and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(settings.processes):
        handoffs[i] = start(i)
    closing = threading.Event()
    dispatcher = threading.Thread(target=_dispatch, args=(sock, handoffs, closing, stop_accepting_at), daemon=True)
    dispatcher.start()
    if stopping:  # a signal came while workers were starting: those started after it have not had it
        stop(stopping[0], None)
    pids = ", ".join(str(w.pid) for w in workers)
    log.info("started %d server processes (%s); metrics in %s", len(workers), pids, metrics_dir)
    restarts = [0] * settings.processes  # consecutive restarts of each slot, for the backoff
    due: dict[int, float] = {}  # slot -> when its replacement starts
    warming: dict[int, socket.socket] = {}  # slot -> the replacement's pair end, offered once it is ready
    try:
        alive = {worker.sentinel: i for i, worker in enumerate(workers)}
        while alive or (due and not stopping):
            for sentinel in wait(list(alive), timeout=0.2):
                i = alive.pop(sentinel)
                worker = workers[i]
                worker.join()
                # Its live gauges (queue depth, in flight, ready, ...) stop counting in the others' scrapes.
                multiprocess.mark_process_dead(worker.pid, metrics_dir)
                with contextlib.suppress(FileNotFoundError):  # and /health/ready stops counting it
                    os.remove(os.path.join(metrics_dir, f"ready-{worker.pid}"))
                if stopping:
                    continue
                # The others keep serving (the dispatcher skips a closed pair); a replacement starts after
                # a backoff that doubles while replacements keep dying before they are ready.
                handoffs[i].close()
                warming.pop(i, None)
                delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** restarts[i])
                restarts[i] += 1
                due[i] = time.monotonic() + delay
                log.error("server process %d exited with %s; restarting it in %.1f s", worker.pid, worker.exitcode,
                          delay)
            for i, when in list(due.items()):
                if not stopping and time.monotonic() >= when:
                    del due[i]
                    warming[i] = start(i)
                    alive[workers[i].sentinel] = i
                    log.info("restarted server process %d as %d", i, workers[i].pid)
            for i, parent in list(warming.items()):
                if os.path.exists(os.path.join(metrics_dir, f"ready-{workers[i].pid}")):
                    handoffs[i] = parent  # ready: it takes connections from now on
                    del warming[i]
                    restarts[i] = 0
                    log.info("server process %d (%d) is ready and takes connections", i, workers[i].pid)
        if stopping:
            log.info("signal %s: all %d server processes stopped", stopping[0], len(workers))
    finally:
        closing.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the dispatcher's accept (Linux), which then returns
        sock.close()
        dispatcher.join(timeout=5)
        for parent in [*handoffs, *warming.values()]:
            parent.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
