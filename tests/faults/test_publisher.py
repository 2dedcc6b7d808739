"""The fault tests' WebSocket publisher sends one frame at a time.

Its reader task answers pings and the server's close while a test task is
publishing, and trio raises ``BusyResourceError`` when two tasks send on one
stream. Here the reader is held in the middle of a pong (the peer pings but
does not read, so the pongs fill the small socket buffers) when the test task
publishes.
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from ..peers import OP_PING, OP_PONG, OP_TEXT, ByteReader, Frame, RawWebSocket, encode_frame
from .helpers import Publisher

pytestmark = pytest.mark.faults

#: Pongs of this many 125-byte pings are far more than the small buffers hold.
PINGS = 4000
BUFFER = 4096


async def client_frame(reader: ByteReader) -> Frame:
    """One masked client frame, unmasked."""
    b0, b1 = await reader.read_exactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.read_exactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.read_exactly(8))
    key = await reader.read_exactly(4)
    masked = await reader.read_exactly(n)
    repeated = (key * (n // 4 + 1))[:n]
    payload = (int.from_bytes(masked, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return Frame(bool(b0 & 0x80), b0 & 0x0F, payload)


async def test_a_publish_waits_for_the_pong_being_sent() -> None:
    a, b = trio.socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    stream, peer = trio.SocketStream(a), trio.SocketStream(b)
    pub = Publisher(RawWebSocket(stream, ByteReader(stream)))
    peer_reader = ByteReader(peer)
    pings = b"".join(encode_frame(OP_PING, b"%125d" % i, mask=False) for i in range(PINGS))
    pongs = 0
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pub.read)
            nursery.start_soon(peer.send_all, pings)
            # Blocked everywhere: the reader in a pong the peer does not read,
            # the pinger behind the pings the reader does not read meanwhile.
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(pub.publish, "t", 1, {"i": 1})
            await trio.testing.wait_all_tasks_blocked()
            while (frame := await client_frame(peer_reader)).opcode == OP_PONG:
                assert frame.payload == b"%125d" % pongs  # whole and in order
                pongs += 1
            nursery.cancel_scope.cancel()
    await stream.aclose()
    await peer.aclose()
    # The publish went out between two pongs, not inside one, and after some.
    assert 0 < pongs < PINGS
    assert frame.opcode == OP_TEXT
    assert frame.json() == {"op": "publish", "topic": "t", "data": {"i": 1}, "id": 1}
