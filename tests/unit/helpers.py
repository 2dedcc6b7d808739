"""In-process transports for connection tests (a socketpair or a memory stream
pair), and the per-connection task a server would run over them.

The client end is a plain trio stream; tests wrap it in a client from tests/peers.py.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing

from trioserve import Config, Connection, ConnectionClosed, TcpConnection, WebSocketConnection
from trioserve.net.transport import SocketTransport, StreamTransport, Transport

from ..peers import NdjsonClient, RawWebSocket

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


# --- a connection's task ----------------------------------------------------------------------

ConnHandler = Callable[[Connection], Awaitable[None]]


async def echo(conn: Connection) -> None:
    async for message in conn:
        conn.send_nowait(message.upper() if isinstance(message, str) else message[::-1])


async def listen_only(conn: Connection) -> None:
    async for _ in conn:
        pass


async def serve_conn(
    cls: type[Connection],
    transport: Any,
    config: Config,
    handler: ConnHandler,
    *,
    task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """What the server does per connection: run the handler, then close."""
    async with trio.open_nursery() as writers:
        conn = cls(transport, config, writers, "peer")
        task_status.started(conn)
        try:
            await handler(conn)
        except ConnectionClosed:
            pass
        await conn.close()


async def start_ws(
    nursery: trio.Nursery, pair: PairFactory, handler: ConnHandler = echo,
    bufsize: int | None = None, **config: Any,
) -> tuple[Connection, RawWebSocket]:
    transport, client = pair(bufsize)
    conn = await nursery.start(serve_conn, WebSocketConnection, transport, Config(**config), handler)
    return conn, RawWebSocket(client)


async def start_tcp(
    nursery: trio.Nursery, pair: PairFactory, handler: ConnHandler = echo,
    **config: Any,
) -> tuple[Connection, NdjsonClient]:
    transport, client = pair()
    conn = await nursery.start(serve_conn, TcpConnection, transport, Config(**config), handler)
    return conn, NdjsonClient(client)
