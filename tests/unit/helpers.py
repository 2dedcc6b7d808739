"""In-process transports for connection tests: a socketpair or a memory stream pair.

The client end is a plain trio stream; tests wrap it in a client from tests/peers.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio
import trio.testing

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
