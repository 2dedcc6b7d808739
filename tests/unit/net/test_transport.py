"""The transports under a Connection, each on its own: what a send takes, what a
receive returns at EOF, and how a close from another task reaches a blocked
reader or writer (always as an OSError, never as trio's ClosedResourceError)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing
import trustme

from trioserve.net.transport import SocketTransport, StreamTransport, TlsTransport

# Bounds the waits on real sockets; none of these tests comes near it.
LIMIT = 10


def unix_pair(bufsize: int | None = None) -> tuple[SocketTransport, socket.socket]:
    a, b = socket.socketpair()
    if bufsize is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    a.setblocking(False)
    b.setblocking(False)
    return SocketTransport(a), b


def fill(transport: SocketTransport) -> int:
    """Send until the kernel takes no more; returns how much it took."""
    total = 0
    while sent := transport.try_send(b"x" * 65536):
        total += sent
    return total


async def raises_when_closed(call: Callable[[], Awaitable[object]], close: Callable[[], None],
                             expected: type[OSError]) -> None:
    """*call* blocks; closing the transport from another task wakes it with *expected*."""
    caught: list[OSError] = []

    async def blocked() -> None:
        try:
            await call()
        except OSError as exc:
            caught.append(exc)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked)
            await trio.testing.wait_all_tasks_blocked()
            close()
    assert len(caught) == 1 and type(caught[0]) is expected


# --- SocketTransport -------------------------------------------------------------------------
# Its close() tells trio the fd is going, so even the tests that await nothing run in trio.


async def test_try_send_takes_what_fits_and_never_blocks() -> None:
    transport, peer = unix_pair(bufsize=4096)
    try:
        assert transport.try_send(b"hello") == 5
        assert peer.recv(100) == b"hello"
        assert fill(transport) > 0
        assert transport.try_send(b"more") == 0  # a full buffer is 0, not an exception
    finally:
        transport.close()
        peer.close()


async def test_try_send_to_a_closed_peer_raises() -> None:
    transport, peer = unix_pair()
    peer.close()
    with pytest.raises(OSError):
        transport.try_send(b"x")
    transport.close()


async def test_send_some_sends_the_buffers_in_order() -> None:
    transport, peer = unix_pair()
    try:
        await transport.wait_writable()
        assert await transport.send_some([b"ab", memoryview(b"xcdef")[1:], b"g"]) == 7
        assert peer.recv(100) == b"abcdefg"
    finally:
        transport.close()
        peer.close()


async def test_send_all_waits_for_a_slow_reader() -> None:
    transport, peer = unix_pair(bufsize=4096)
    data = bytes(range(256)) * 4096  # 1 MiB: many times the socket buffers
    received = bytearray()
    peer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(peer))

    async def read_all() -> None:
        while len(received) < len(data):
            received.extend(await peer_stream.receive_some(65536))

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await transport.send_all(data)
    assert received == data
    transport.close()
    await peer_stream.aclose()


async def test_receive_returns_data_then_empty_at_eof() -> None:
    transport, peer = unix_pair()
    peer.sendall(b"abc")
    peer.close()
    with trio.fail_after(LIMIT):
        assert await transport.receive_some() == b"abc"
        assert await transport.receive_some() == b""
    transport.close()


async def test_shutdown_write_sends_eof_and_keeps_reading() -> None:
    transport, peer = unix_pair()
    transport.shutdown_write()
    assert peer.recv(10) == b""  # EOF for the peer
    peer.sendall(b"still here")
    with trio.fail_after(LIMIT):
        assert await transport.receive_some() == b"still here"
    transport.shutdown_write()  # twice is harmless
    transport.close()
    peer.close()


async def test_a_close_wakes_a_blocked_reader_as_a_reset() -> None:
    transport, peer = unix_pair()
    await raises_when_closed(transport.receive_some, transport.close, ConnectionResetError)
    peer.close()


async def test_a_close_wakes_a_blocked_writer_as_a_reset() -> None:
    transport, peer = unix_pair(bufsize=4096)
    fill(transport)
    await raises_when_closed(transport.wait_writable, transport.close, ConnectionResetError)
    peer.close()


async def test_close_is_idempotent() -> None:
    transport, peer = unix_pair()
    transport.close()
    transport.close()
    assert transport.sock.fileno() == -1
    peer.close()


# --- StreamTransport -------------------------------------------------------------------------


async def test_a_stream_never_sends_synchronously() -> None:
    # Everything goes through the queue and the writer: try_send takes nothing.
    server, client = trio.testing.memory_stream_pair()
    transport = StreamTransport(server)
    assert transport.try_send(b"data") == 0
    await transport.wait_writable()
    assert await transport.send_some([b"ab", memoryview(b"cd")]) == 4
    assert await client.receive_some() == b"abcd"


async def test_stream_errors_are_oserrors() -> None:
    server, client = trio.testing.memory_stream_pair()
    transport = StreamTransport(server)
    await client.aclose()
    with pytest.raises(BrokenPipeError):
        await transport.send_some([b"x"])
    transport.close()
    with pytest.raises(ConnectionResetError):
        await transport.receive_some()


async def test_stream_shutdown_write_sends_eof_and_keeps_reading() -> None:
    server, client = trio.testing.memory_stream_pair()
    transport = StreamTransport(server)
    transport.shutdown_write()
    assert await client.receive_some() == b""
    await client.send_all(b"late")
    assert await transport.receive_some() == b"late"


async def test_a_stream_close_wakes_a_blocked_reader_as_a_reset() -> None:
    server, _client = trio.testing.memory_stream_pair()
    transport = StreamTransport(server)
    await raises_when_closed(transport.receive_some, transport.close, ConnectionResetError)


async def test_stream_aclose_closes_both_halves() -> None:
    server, client = trio.testing.memory_stream_pair()
    transport = StreamTransport(server)
    await transport.aclose()
    assert await client.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")


# --- TlsTransport ----------------------------------------------------------------------------


TlsPair = tuple[TlsTransport, trio.SSLStream[trio.SocketStream]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls(ca: trustme.CA) -> AsyncIterator[TlsPair]:
    """An accepted TlsTransport over a socketpair, and a client that trusts its certificate.

    The client is strict about EOF (https_compatible=False), so it tells a
    close_notify from a bare FIN.
    """
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    a, b = socket.socketpair()
    transport = TlsTransport(a, server_ctx)
    client = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(b)), client_ctx,
                            server_hostname="localhost")
    yield transport, client
    transport.close()
    await trio.aclose_forcefully(client)


async def handshake(transport: TlsTransport, client: trio.SSLStream[trio.SocketStream]) -> None:
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            assert await transport.handshake()


async def test_tls_carries_bytes_both_ways(tls: TlsPair) -> None:
    transport, client = tls
    await handshake(transport, client)
    assert transport.try_send(b"x") == 0  # TLS goes through the writer, like any stream
    with trio.fail_after(LIMIT):
        await client.send_all(b"ping")
        assert await transport.receive_some() == b"ping"
        await transport.send_all(b"pong")
        assert await client.receive_some() == b"pong"


async def test_a_failed_handshake_is_false_not_an_exception(tls: TlsPair) -> None:
    transport, client = tls
    plain = client.transport_stream
    with trio.fail_after(LIMIT):
        await plain.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await transport.handshake() is False


async def test_shutdown_write_ends_with_a_fin_after_the_data(tls: TlsPair) -> None:
    # No close_notify: the client reads everything, then meets a bare EOF.
    transport, client = tls
    await handshake(transport, client)
    with trio.fail_after(LIMIT):
        await transport.send_all(b"last words")
        transport.shutdown_write()
        assert await client.receive_some() == b"last words"
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()


async def test_aclose_after_the_handshake_sends_close_notify(tls: TlsPair) -> None:
    transport, client = tls
    await handshake(transport, client)
    with trio.fail_after(LIMIT):
        await transport.aclose()
        assert await client.receive_some() == b""  # a clean TLS EOF
    assert transport.sock.fileno() == -1
    await transport.aclose()  # again: nothing left to do


async def test_aclose_before_a_handshake_only_closes_the_socket(
        tls: TlsPair) -> None:
    transport, client = tls
    with trio.fail_after(LIMIT):
        await transport.aclose()
        assert await client.transport_stream.receive_some() == b""  # no TLS record came first
    assert transport.sock.fileno() == -1


async def test_a_tls_close_wakes_a_blocked_reader_as_a_reset(tls: TlsPair) -> None:
    transport, client = tls
    await handshake(transport, client)
    await raises_when_closed(transport.receive_some, transport.close, ConnectionResetError)
