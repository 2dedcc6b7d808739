"""In-process peers for connection tests: a socketpair or a memory stream pair."""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable

import trio
import trio.testing
import wsproto
import wsproto.events as wse

from trioserve.net.transport import SocketTransport, StreamTransport, Transport

PairFactory = Callable[..., tuple[Transport, trio.abc.Stream]]


def socket_pair(bufsize: int | None = None) -> tuple[Transport, trio.abc.Stream]:
    """A real socketpair: the server side gets the direct-send hot path."""
    a, b = socket.socketpair()
    if bufsize is not None:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    a.setblocking(False)
    return SocketTransport(a), trio.SocketStream(trio.socket.from_stdlib_socket(b))


def memory_pair(bufsize: int | None = None) -> tuple[Transport, trio.abc.Stream]:
    """trio's memory streams: everything goes through the queue and the writer task.

    With *bufsize* set the pair is in lockstep, so a peer that never reads
    blocks the server's writes, like a full socket buffer.
    """
    if bufsize is not None:
        server, client = trio.testing.lockstep_stream_pair()
    else:
        server, client = trio.testing.memory_stream_pair()
    return StreamTransport(server), client


class WSPeer:
    """The client end of a WebSocket connection, at frame level (no handshake)."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.ws = wsproto.Connection(wsproto.ConnectionType.CLIENT)
        self._events: deque[wse.Event] = deque()
        self.eof = False

    async def send(self, event: wse.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> wse.Event:
        while not self._events:
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof = True
                self.ws.receive_data(None)
            else:
                self.ws.receive_data(data)
            self._events.extend(self.ws.events())
        return self._events.popleft()

    async def next_message(self) -> str | bytes:
        parts = []
        while True:
            event = await self.next_event()
            assert isinstance(event, wse.Message), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(event.data, str) else b"".join(parts)

    async def read_until_eof(self) -> list[wse.Event]:
        events = []
        while True:
            event = await self.next_event()
            events.append(event)
            if isinstance(event, wse.CloseConnection):
                if self.ws.state is wsproto.connection.ConnectionState.REMOTE_CLOSING:
                    # After a protocol error the server does not wait for our answer.
                    try:
                        await self.send(event.response())
                    except trio.BrokenResourceError:
                        pass
                # Drain to EOF so the test sees the server close the transport,
                # then close our side as a real client does.
                while not self.eof:
                    data = await self.stream.receive_some(65536)
                    if not data:
                        self.eof = True
                await self.stream.aclose()
                return events


class LinePeer:
    """The client end of an NDJSON connection."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._buf = b""

    async def send_line(self, line: bytes) -> None:
        await self.stream.send_all(line + b"\n")

    async def next_line(self) -> bytes | None:
        """The next line, or None at EOF (after which the peer closes, as clients do)."""
        while b"\n" not in self._buf:
            data = await self.stream.receive_some(65536)
            if not data:
                await self.stream.aclose()
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line
