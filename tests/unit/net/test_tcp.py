"""TcpConnection: newline-delimited JSON, its heartbeat lines, and its close line then EOF."""

from __future__ import annotations

from typing import Any

import trio

from trioserve import Config, Connection, TcpConnection

from ..helpers import PairFactory, memory_pair, start_tcp


async def test_tcp_lines_and_heartbeat_lines(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_tcp(nursery, pair)
        await peer.send_line(b'{"x":1}')
        assert await peer.recv_line() == b'{"X":1}'
        await peer.send_line(b'{"op":"ping","id":3}')
        assert await peer.recv_line() == b'{"id":3,"ok":true,"op":"pong"}'
        await peer.send_line(b'{"op":"pong"}')  # swallowed: heartbeat, not a message
        await peer.send_line(b'{"y":2}')
        assert await peer.recv_line() == b'{"Y":2}'
        nursery.cancel_scope.cancel()


async def test_tcp_heartbeat_timeout(pair: PairFactory, autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_tcp(nursery, pair, ping_interval=25, ping_timeout=10)
        assert await peer.recv_line() == b'{"op":"ping"}'
        assert await peer.recv_line() == b'{"op":"close","code":4002,"reason":"heartbeat timeout"}'
        assert await peer.recv_line() is None  # the server sent EOF after its close line
        await peer.stream.aclose()
    assert conn.close_code == 4002


async def test_tcp_line_too_long(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_tcp(nursery, pair, max_message_size=50)
        await peer.stream.send_all(b"z" * 51)  # no newline yet: the limit holds anyway
        assert await peer.recv_line() == b'{"op":"close","code":1009,"reason":"line too long"}'
        assert await peer.recv_line() is None
    assert conn.close_code == 1009


async def test_tcp_invalid_utf8(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_tcp(nursery, pair)
        await peer.send_line(b'{"a":"\xff"}')
        assert await peer.recv_line() == b'{"op":"close","code":1007,"reason":"invalid UTF-8"}'
        assert await peer.recv_line() is None
    assert conn.close_code == 1007


async def test_a_message_is_its_line() -> None:
    transport, _client = memory_pair()
    async with trio.open_nursery() as nursery:
        conn = TcpConnection(transport, Config(), nursery, "peer")
        assert conn.frame('{"a":"\u00e9"}') == b'{"a":"\xc3\xa9"}\n'
        assert conn.frame(b'{"b":1}') == b'{"b":1}\n'
        assert conn.framing.frame_batch((b"1", b"2")) == b"1\n2\n"


async def test_our_close_is_a_close_line_then_eof_and_the_peers_eof_ends_it(
        pair: PairFactory, autojump_clock: Any) -> None:
    async def close_at_once(conn: Connection) -> None:
        await conn.close(1001)

    async with trio.open_nursery() as nursery:
        conn, peer = await start_tcp(nursery, pair, close_at_once, close_timeout=5)
        start = trio.current_time()
        assert await peer.recv_line() == b'{"op":"close","code":1001,"reason":"going away"}'
        assert await peer.recv_line() is None
        await peer.stream.aclose()  # the peer's EOF answers the close
    assert trio.current_time() == start
    assert conn.closed and conn.close_code == 1001  # ours, not 1006 for the EOF
