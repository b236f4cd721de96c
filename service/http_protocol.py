"""uvicorn's httptools protocol with bounds on what a client can send before the app sees a request.

uvicorn's httptools protocol reads a request line and headers without any limit (h11 has
``h11_max_incomplete_event_size``; httptools none): measured before this class, four requests with 128 MiB
headers were answered 200 and left 558 MiB resident; 300 half-written requests were still open after 62 s;
a request line sent one byte at a time over 90 s was served. All of that happens before authentication.
``LimitedHttpToolsProtocol`` (``protocol_class(settings)``) adds, for every connection, in one process or
under the supervisor:

- a size bound on the request line and headers (``max_header_bytes``), counted on the raw bytes before the
  parser sees them: httptools concatenates a header's fragments in its own buffer and calls ``on_header``
  only once the header is complete, so counting there would come after the memory is spent. Over it:
  431 and the connection closes;
- a bound on their number (``max_headers``): 431;
- a deadline for the request line and headers (``header_timeout_s``), from the connection's start or a
  request's first byte until the end of its headers: 408 and the connection closes. A connection that
  sends nothing gets it too (uvicorn's own keep-alive timer covers only idle connections that have had a
  request);
- the one error shape (``{"error": {"type", "message", "field"}}``, JSON) for these answers and for
  requests httptools cannot parse (uvicorn answers those in plain text).

After such an answer the connection stops parsing and discards what still arrives for at most
``LINGER_S``, then closes: closing a socket with unread data makes the kernel send a reset, and a client
still writing its 128 MiB header then loses the 431 instead of reading it (nginx's "lingering close").

At shutdown, a keep-alive connection idle between two requests is not closed at once (uvicorn's way): a
client may have sent its next request just then, which a close would cut ("Server disconnected without
sending a response"; HTTP/1.1 lets a client retry that only for idempotent methods, and a POST is not).
It stays open for ``IDLE_CLOSE_S``; a request that arrives on it meanwhile, or whose head had begun to
arrive, is answered 503 shutting_down with ``connection: close``, as a body still arriving is; the window
starts again while the client has not received the last answer (bytes still in the transport or the socket's
send queue), up to uvicorn's deadline. A connection whose answer is being written when the shutdown begins
(its head said keep-alive) gets the same window once that answer is complete; one whose answer has not
started answers with ``connection: close``, and so does a pipelined request queued behind an answer.

It also hands uvicorn a transport that joins the small writes of one event-loop turn (``HeldWrites``): uvicorn
writes a response's status line and headers, then its body, each straight to the socket.
"""

from __future__ import annotations

import http
import json
import logging
import struct

try:  # POSIX: the socket's send queue (_unsent_bytes)
    import fcntl
    import termios
except ImportError:  # pragma: no cover - Windows
    fcntl = termios = None

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

# A key this protocol sets in a request's ASGI scope once the whole body has been parsed (the message is
# complete): from then on the app's receive() returns at once, so the body reads of service.codec and
# service.admission skip their timeouts (asyncio.timeout: 11 Python calls each, ~5% of a batched 1-vector
# request's event-loop calls). A small request's head and body arrive in one read and are parsed before its
# app task first runs. Absent (another server, a scope copied early, a body still arriving): the timeouts apply.
BODY_BUFFERED = "isoquant.body_buffered"

log = logging.getLogger("service")

# After a refusal, what the client still sends is read and dropped for at most this long, so that it can
# finish writing and read the answer; then the connection closes whatever it does.
LINGER_S = 2.0
# Shutdown: how long after uvicorn stops accepting a request may still take beyond ISOQUANT_JOB_TIMEOUT_S
# (its device job answers or times out within that; this covers the parse before it and the encoding after).
SHUTDOWN_MARGIN_S = 2.0
# Shutdown: how long a keep-alive connection idle when it begins stays open, answering 503 shutting_down to
# a request that arrives on it. A request sent after that meets a closed connection, as one sent when the
# keep-alive timeout closes an idle connection does at any time (RFC 9112, 9.3.1: clients must expect it).
IDLE_CLOSE_S = 1.0


def graceful_shutdown_s(settings: Settings) -> float:
    """uvicorn's timeout_graceful_shutdown: after it, requests still open are answered 503 (or cut, if their
    answer had started) and their tasks cancelled."""
    return settings.job_timeout_s + SHUTDOWN_MARGIN_S


class _Refused(Exception):
    """Raised in a parser callback to stop parsing: the request is answered with ``status``."""

    def __init__(self, status: int, type_: str, message: str, field: str | None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type_, message, field


# Held writes go out at the end of the event loop's turn, or as soon as this many bytes are held (HeldWrites).
HOLD_BELOW_BYTES = 64 << 10


class HeldWrites:
    """A connection's transport whose small writes are held until the end of the event loop's turn and then
    written together (one ``writelines``): uvicorn writes a response's status line and headers, then its body,
    as two writes, which for a small answer were two send syscalls, two TCP segments and two wake-ups of the
    client. Once ``HOLD_BELOW_BYTES`` are held (by one write or several) they go out at once, so that the
    transport's own flow control (``pause_writing`` past its high-water mark) sees every large answer as it
    did; so does everything held before ``close`` or ``write_eof``. ``abort`` drops it, as the transport's own
    abort drops its buffer. Writes after ``write_eof`` are dropped (the transport would refuse them; uvicorn
    can still try one: the "100 Continue" of a request refused at shutdown). Everything else is the
    transport's."""

    __slots__ = ("_transport", "_loop", "_held", "_held_bytes", "_eof")

    def __init__(self, transport, loop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list | None = None
        self._held_bytes = 0
        self._eof = False

    def write(self, data) -> None:
        if self._eof:
            return
        if self._held is None:
            self._held = []
            self._loop.call_soon(self.flush)
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= HOLD_BELOW_BYTES:
            self.flush()

    def writelines(self, parts) -> None:
        for part in parts:
            self.write(part)

    def flush(self) -> None:
        """Write what is held (nothing if the connection is closing)."""
        held, self._held, self._held_bytes = self._held, None, 0
        if held and not self._transport.is_closing():
            self._transport.writelines(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._eof = True
        self._transport.write_eof()

    def abort(self) -> None:
        self._held, self._held_bytes = None, 0
        self._transport.abort()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def error_response(status: int, type_: str, message: str, field: str | None, default_headers=()) -> bytes:
    """A complete HTTP/1.1 response with the one error body that closes the connection."""
    body = json.dumps({"error": {"type": type_, "message": message, "field": field}}).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with the header size, count and time bounds above (class attributes, set by
    ``protocol_class``)."""

    max_header_bytes = 64 << 10
    max_headers = 100
    header_timeout_s = 10.0
    shutdown_grace_s = 62.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # In the head phase (request line and headers still to come) from the connection's start and from
        # the end of each request's body, until its headers are complete.
        self._in_head = True
        self._head_bytes = 0  # raw bytes received in this head phase (chunks that began in it)
        self._parsed_bytes = 0  # URL and header bytes the parser reported for the current request
        self._header_count = 0
        self._begun = False  # the parser has begun a request that is not complete yet
        self._head_timer = None
        self._refused = False  # an error answer was written: drop what arrives, close soon
        self._idle_close = None  # shutdown found the connection idle: its close timer (IDLE_CLOSE_S)
        self._shut_down = False  # shutdown() was called (once is enough: see _Server._adopted)
        self._shutdown_at = 0.0  # when (loop time)
        # shutdown() found an answer being written, its head already sent as keep-alive: when it is complete,
        # the connection is idle at shutdown (on_response_complete)
        self._idle_when_answered = False

    # -- connection ---------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(HeldWrites(transport, self.loop))
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._idle_close is not None:
            self._idle_close.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and drop
        if self._idle_close is not None:
            # A request on a connection that was idle when the shutdown began: refused before any work.
            self._refuse_at_shutdown()
            return
        if not self._in_head:
            self._feed(data)
            return
        self._arm_head_timer()  # a keep-alive connection's next request starts with these bytes
        room = self.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            self._feed(data)
            return
        # The headers must end within the room left; what follows them (a body) goes to the parser after.
        view = memoryview(data)
        self._head_bytes += room
        self._feed(view[:room])
        if self._refused or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(
                431, "headers_too_large",
                f"the request line and headers exceed {self.max_header_bytes} bytes", "headers",
            )
            return
        self._feed(view[room:])

    def _feed(self, data) -> None:
        """uvicorn's ``data_received``, except that a refusal raised in a parser callback answers its own
        status (httptools wraps it in HttpParserCallbackError, which uvicorn would answer with 400)."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.status, refused.type, refused.message, refused.field)
            else:
                self._refuse(400, "bad_request", f"not a valid HTTP/1.1 request: {exc}", None)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    # -- parser callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._begun = True
        self._parsed_bytes = 0
        self._header_count = 0
        if self._head_timer is None:  # mostly armed already, by data_received
            self._arm_head_timer()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        # The raw count above covers every chunk that began in the head phase; a pipelined request whose
        # head starts inside the previous request's last chunk is bounded here, by what the parser reports.
        self._parsed_bytes += len(url)
        if self._parsed_bytes > self.max_header_bytes:
            raise _Refused(431, "headers_too_large", f"the request line exceeds {self.max_header_bytes} bytes", "url")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._parsed_bytes += len(name) + len(value) + 4
        if self._header_count > self.max_headers:
            raise _Refused(431, "headers_too_large", f"more than {self.max_headers} headers", "headers")
        if self._parsed_bytes > self.max_header_bytes:
            raise _Refused(
                431, "headers_too_large", f"the request line and headers exceed {self.max_header_bytes} bytes",
                "headers",
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.scope[BODY_BUFFERED] = True
        # The next bytes on this connection are the next request's head.
        self._in_head = True
        self._begun = False
        self._head_bytes = 0

    # -- shutdown -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown begins (after the drain): a connection between two requests answers
        503 to the next one if its head has begun to arrive or arrives within ``IDLE_CLOSE_S``, and closes
        then (uvicorn would close it at once, cutting a request the client has just sent); a request whose
        body is still arriving is answered 503 now rather than waited for; and a request still open just
        before uvicorn's own deadline is answered 503 then: uvicorn cancels its task at the deadline and
        would answer a plain-text 500."""
        if self._shut_down:
            return
        self._shut_down = True
        self._shutdown_at = self.loop.time()
        cycle = self.cycle
        if self._refused:
            super().shutdown()
            return
        if cycle is None or cycle.response_complete:
            if self._head_bytes or self._begun:  # the next request's head has begun to arrive
                self._refuse_at_shutdown()
            elif not self.transport.is_closing():
                self._arm_idle_close()
            return
        if cycle.more_body and not cycle.response_started and not self.pipeline:
            # (Not for a pipelined request queued behind an answer still being written: a 503 now would land in
            # the middle of that answer. It is served after it, with connection: close, like the case below.)
            self._answer_shutdown()
            return
        if cycle.response_started:
            # Its head went out saying keep-alive, so closing right after its last byte (uvicorn's way) could cut
            # a request the client sends on it at once: the connection is treated as idle once it is answered.
            self._idle_when_answered = True
        else:
            super().shutdown()  # the answer to come says connection: close
        self.loop.call_later(max(self.shutdown_grace_s - 0.25, 0.0), self._shutdown_deadline)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._idle_when_answered or self.transport.is_closing():
            return
        self._idle_when_answered = False
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request (its head arrived while the answer before it was being written, before or after
            # the shutdown began) has just started: it is served, and its answer says connection: close.
            self.cycle.keep_alive = False
            return
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        self._arm_idle_close()

    def _arm_idle_close(self) -> None:
        self._idle_close = self.loop.call_later(IDLE_CLOSE_S, self._close_idle)

    def _close_idle(self) -> None:
        """No request came within ``IDLE_CLOSE_S`` of the shutdown: close (uvicorn's shutdown waits for it). While
        the client has not yet received the last answer (bytes still in the transport or the socket: a slow
        reader of a large answer), it cannot have sent its next request: the window starts again, up to
        uvicorn's own deadline."""
        self._idle_close = None
        if self._refused or self.transport.is_closing():
            return
        deadline = self._shutdown_at + self.shutdown_grace_s
        if _unsent_bytes(self.transport) and self.loop.time() + IDLE_CLOSE_S < deadline:
            self._arm_idle_close()
            return
        self.transport.close()

    def _refuse_at_shutdown(self) -> None:
        if self._idle_close is not None:
            self._idle_close.cancel()
            self._idle_close = None
        self._refuse(503, "shutting_down", "the service is shutting down; retry on another instance", None)

    def _shutdown_deadline(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.transport.is_closing():
            return
        if cycle.response_started:
            # Half an answer, unread by the client: abort (close would wait to flush it), so that the task
            # blocked writing it ends now rather than be cancelled by uvicorn with a traceback in the log.
            self.transport.abort()
        else:
            self._answer_shutdown()

    def _answer_shutdown(self) -> None:
        """503 shutting_down for the request in progress; the app's receive sees a disconnect and its own
        answer, if any, is dropped."""
        self.cycle.disconnected = True
        self.cycle.message_event.set()
        self._refuse(
            503, "shutting_down", "the service is shutting down; retry on another instance", None, current=True
        )

    # -- answers of the protocol itself -------------------------------------------------------------

    def _refuse(self, status: int, type_: str, message: str, field: str | None, current: bool = False) -> None:
        """Answer ``status`` and close: the parser is not fed again; what the client still sends is read and
        dropped for at most ``LINGER_S`` so that it can read this answer. ``current``: the answer is for the
        request in progress (shutdown), not for a head being read."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._cancel_head_timer()
        log.info("%s: %d %s: %s", self._peer(), status, type_, message)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and (cycle.response_started or not current):
            # A response is being written, or this refuses a pipelined request's head while the request
            # before it has no answer yet (the client would take this one for that one's): just close.
            self.transport.close()
            return
        self.transport.write(error_response(status, type_, message, field, self.server_state.default_headers))
        self.flow.resume_reading()  # read and drop, even if uvicorn had paused reading
        try:
            self.transport.write_eof()  # the client sees the end of the answer at once
        except (NotImplementedError, AttributeError, RuntimeError, OSError):
            pass
        self.loop.call_later(LINGER_S, self.transport.close)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"

    # -- the head deadline --------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self._refused:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self._refused or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # Still answering the previous request (reading is paused while a pipelined request waits):
            # the client is not the slow one. Look again later.
            self._arm_head_timer()
            return
        self._refuse(
            408, "request_timeout", f"the request line and headers did not arrive within {self.header_timeout_s} s",
            "headers",
        )


def _unsent_bytes(transport) -> int:
    """Bytes written to ``transport`` that its client has not acknowledged yet: the transport's buffer, plus the
    socket's send queue where the platform reports it (Linux: TIOCOUTQ, unsent and unacknowledged bytes)."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and termios is not None and hasattr(termios, "TIOCOUTQ"):
        try:
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except (OSError, ValueError):  # closed meanwhile, or not a stream socket
            pass
    return unsent


def protocol_class(settings: Settings) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this process's limits."""
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "max_header_bytes": settings.max_header_bytes,
            "max_headers": settings.max_headers,
            "header_timeout_s": settings.header_timeout_s,
            "shutdown_grace_s": graceful_shutdown_s(settings),
        },
    )


