"""The fault tests' WebSocket publisher sends one frame at a time.

Its reader task answers pings and the server's close while a test task is
publishing, and trio raises ``BusyResourceError`` when two tasks send on one
stream. Here the reader is held in the middle of a pong (the peer does not
read, so the pong fills the socket buffers) when the test task publishes.
"""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing

from ..peers import OP_PING, OP_PONG, OP_TEXT, ByteReader, Frame, RawWebSocket, encode_frame
from .helpers import Publisher

pytestmark = pytest.mark.faults

#: Far more than a socket pair's buffers hold, so the pong cannot be written whole.
PING_SIZE = 8 << 20


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
    stream, peer = trio.SocketStream(a), trio.SocketStream(b)
    pub = Publisher(RawWebSocket(stream, ByteReader(stream)))
    peer_reader = ByteReader(peer)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pub.read)
            await peer.send_all(encode_frame(OP_PING, b"p" * PING_SIZE, mask=False))
            await trio.testing.wait_all_tasks_blocked()  # the reader is stuck in its pong
            async with trio.open_nursery() as publishing:
                publishing.start_soon(pub.publish, "t", 1, {"i": 1})
                await trio.testing.wait_all_tasks_blocked()
                pong = await client_frame(peer_reader)
                text = await client_frame(peer_reader)
            nursery.cancel_scope.cancel()
    await stream.aclose()
    await peer.aclose()
    assert (pong.opcode, len(pong.payload)) == (OP_PONG, PING_SIZE)
    assert text.opcode == OP_TEXT
    assert text.json() == {"op": "publish", "topic": "t", "data": {"i": 1}, "id": 1}
