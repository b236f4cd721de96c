"""service/http_protocol.py's HeldWrites on a real event loop and a real socket pair: small writes of one loop
turn reach the peer together at its end; large writes, close and write_eof let nothing wait; abort drops."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from service.http_protocol import HOLD_BELOW_BYTES, HeldWrites


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


def test_a_large_write_goes_out_at_once_after_what_is_held():
    async def main():
        held, peer = await _connected()
        big = bytes(range(256)) * (HOLD_BELOW_BYTES // 256)  # exactly the bound: not held
        held.write(b"head")
        held.write(big)
        await asyncio.sleep(0.01)  # (the large write flushed "head" itself, at once)
        got = _pending(peer)
        assert got == b"head" + big  # in order
        held.write(big)  # nothing held: straight through
        await asyncio.sleep(0.01)
        assert _pending(peer) == big
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
