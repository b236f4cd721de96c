"""service/http_protocol.py's HeldWrites on a real event loop and a real socket pair: small writes of one loop
turn reach the peer together at its end; a bound on what is held, close and write_eof let nothing wait; abort
drops; nothing is written after write_eof. And, on a real uvicorn server with the protocol, when a request's
scope says that its body is buffered."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from service.http_protocol import BODY_BUFFERED, HOLD_BELOW_BYTES, HeldWrites, protocol_class


def _pending(sock: socket.socket) -> bytes:
    """What the peer has received so far, without waiting."""
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out + b"<eof>"
        out += chunk


async def _connected() -> tuple[HeldWrites, socket.socket]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    return HeldWrites(transport, loop), peer


async def _turn() -> None:
    await asyncio.sleep(0)  # the held writes' flush runs, as every callback scheduled before it
    await asyncio.sleep(0.01)  # ... and the bytes cross the socket pair


def _run(coro) -> None:
    uvloop.run(coro)  # the server's loop (asyncio's own behaves the same)


def test_small_writes_of_one_turn_go_out_together_at_its_end():
    async def main():
        held, peer = await _connected()
        head, body = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", memoryview(b"hello")
        held.write(head)
        held.write(body)
        assert _pending(peer) == b""  # nothing yet: both wait for the turn's end
        await _turn()
        assert _pending(peer) == head + b"hello"
        held.write(b"next")  # a later turn holds its own writes
        assert _pending(peer) == b""
        await _turn()
        assert _pending(peer) == b"next"
        held.close()
        await _turn()
        assert _pending(peer) == b"<eof>"
        peer.close()

    _run(main())


def _received_now(sock: socket.socket, n: int) -> bytes:
    """n bytes the peer has already been sent (a blocking read with a short timeout: no event-loop turn)."""
    sock.settimeout(1.0)
    out = b""
    try:
        while len(out) < n:
            out += sock.recv(n - len(out))
    finally:
        sock.setblocking(False)
    return out


def test_writes_go_out_at_once_when_the_held_bytes_reach_the_bound():
    """A large answer, or many small writes in one turn, reach the transport (and its flow control) at once."""

    async def main():
        held, peer = await _connected()
        big = bytes(range(256)) * (HOLD_BELOW_BYTES // 256)  # exactly the bound
        held.write(b"head")
        held.write(big)  # no await: this write itself sends what is held, in order
        assert _received_now(peer, 4 + len(big)) == b"head" + big
        chunk = b"x" * 1000
        for _ in range(HOLD_BELOW_BYTES // 1000):
            held.write(chunk)
        assert _pending(peer) == b""  # 65,000 bytes held: under the bound
        held.write(chunk)  # 66,000: over it
        assert _received_now(peer, 66_000) == chunk * 66
        held.close()
        peer.close()

    _run(main())


@pytest.mark.parametrize("end", ["close", "write_eof"])
def test_close_and_write_eof_send_what_is_held_first(end):
    async def main():
        held, peer = await _connected()
        held.write(b"answer")
        getattr(held, end)()
        await asyncio.sleep(0.01)
        assert _pending(peer) == b"answer<eof>"
        held.close()
        peer.close()

    _run(main())


def test_writes_after_write_eof_are_dropped():
    async def main():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        held, peer = await _connected()
        held.write(b"answer")
        held.write_eof()
        held.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # uvicorn's, for a request refused at shutdown
        await _turn()
        assert _pending(peer) == b"answer<eof>" and errors == []  # (a flush writing it raised in a callback)
        held.close()
        peer.close()

    _run(main())


def test_abort_drops_what_is_held_and_a_closing_transport_writes_nothing():
    async def main():
        held, peer = await _connected()
        held.write(b"dropped")
        held.abort()
        await _turn()
        assert _pending(peer) == b"<eof>"
        peer.close()

        held, peer = await _connected()
        held.write(b"late")
        held._transport.close()  # closed underneath (a lost connection): the flush must not write
        await _turn()
        assert _pending(peer) == b"<eof>"
        assert held.is_closing()  # everything else is the transport's
        peer.close()

    _run(main())


# -- BODY_BUFFERED: the scope says when the whole body has been parsed ---------------------------------------


def _recording_app(seen: list):
    """An ASGI app that records, per request, whether the scope said the body was buffered when the app began
    and after its last body message, and answers 200 with the body's length."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        at_start = bool(scope.get(BODY_BUFFERED))
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        seen.append((at_start, bool(scope.get(BODY_BUFFERED)), size))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    return app


def test_the_scope_says_when_the_body_is_buffered():
    """A request sent in one write has its whole body parsed before its app task first runs: the app sees
    BODY_BUFFERED at once (and service.codec/admission skip their body timeouts). A body that comes later is
    not buffered at the start (the timeouts apply) and is once its last byte is parsed."""
    import threading
    import time

    import uvicorn

    from service.settings import Settings

    seen: list = []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        _recording_app(seen), host="127.0.0.1", port=port, http=protocol_class(Settings()), lifespan="off",
        log_level="warning", loop="uvloop",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        head = b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + b"hello")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200 ")
            sock.sendall(head)
            time.sleep(0.3)  # the app has started and waits for the body
            sock.sendall(b"world")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200 ")
    finally:
        server.should_exit = True
        thread.join(20)
    assert seen == [(True, True, 5), (False, True, 5)], seen
