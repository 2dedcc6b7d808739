"""Connection, the base of both kinds: messages in and out, the reader's heartbeat
deadline, the close handshake and its timeout, EOF and aborts.

Every test runs over a real socketpair (direct sends) and over trio memory
streams (everything through the queue and the writer), with the autojump clock
standing in for every timeout. WebSocket framing stands in for either kind;
what is WebSocket's or NDJSON's own is in test_websocket.py and test_tcp.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trioserve import CloseCode, Config, Connection, ConnectionClosed, ConnectionState, WebSocketConnection
from trioserve.net.heartbeat import Heartbeats
from trioserve.protocol import websocket

from ...peers import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, encode_frame
from ..helpers import PairFactory, listen_only, memory_pair, socket_pair, start_ws


async def test_text_and_binary_messages(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        await peer.send_text("héllo")
        assert await peer.recv_message() == "HÉLLO"
        await peer.send_frame(OP_BINARY, b"\x00\x01\x02")
        assert await peer.recv_message() == b"\x02\x01\x00"
        stats = conn.statistics()
        assert (stats.messages_in, stats.messages_out) == (2, 2)
        assert stats.bytes_in > 0 and stats.bytes_out > 0
        await peer.send_close(1000)
        frames = await peer.read_until_eof()
        assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1000
    assert conn.state is ConnectionState.CLOSED
    assert conn.close_code == 1000


async def test_heartbeat_pings_then_closes_4002(pair: PairFactory, autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, ping_interval=25, ping_timeout=10)
        start = trio.current_time()
        frame = await peer.recv_frame()
        assert frame.opcode == OP_PING
        assert trio.current_time() - start == pytest.approx(25)
        frame = await peer.recv_frame()
        assert frame.opcode == OP_CLOSE
        assert (frame.close_code, frame.close_reason) == (4002, "heartbeat timeout")
        assert trio.current_time() - start == pytest.approx(35)
        await peer.answer_close(frame)
    assert conn.close_code == CloseCode.HEARTBEAT_TIMEOUT
    assert conn.state is ConnectionState.CLOSED


async def test_a_stalled_heartbeat_sweep_leaves_the_pinging_to_the_reader(
        pair: PairFactory, autojump_clock: Any) -> None:
    # A Heartbeats whose task never runs: each reader still pings and times out
    # on its own deadline, only later (the sweep's slack: a tick plus the timeout).
    transport, client = pair()
    beats = Heartbeats(25, 10, lambda: ())
    async with trio.open_nursery() as nursery:
        conn = WebSocketConnection(transport, Config(ping_interval=25, ping_timeout=10), nursery,
                                   "peer", heartbeats=beats)
        nursery.start_soon(listen_only, conn)
        peer = RawWebSocket(client)
        start = trio.current_time()
        frame = await peer.recv_frame()
        assert frame.opcode == OP_PING
        assert trio.current_time() - start == pytest.approx(25 + beats.slack)
        frame = await peer.recv_frame()
        assert frame.opcode == OP_CLOSE and frame.close_code == 4002
        assert trio.current_time() - start == pytest.approx(35 + beats.slack)
        nursery.cancel_scope.cancel()


async def test_pong_and_data_keep_the_connection_alive(pair: PairFactory, autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, ping_interval=25, ping_timeout=10)
        for _ in range(4):
            await trio.sleep(20)
            await peer.send_text("x")
            assert await peer.recv_message() == "X"
        frame = await peer.recv_frame()
        assert frame.opcode == OP_PING
        await peer.send_frame(OP_PONG, frame.payload)
        await trio.sleep(30)  # past ping_timeout: the pong counted as activity
        assert conn.state is ConnectionState.OPEN
        frame = await peer.recv_frame()
        assert frame.opcode == OP_PING  # the next round, not a close
        nursery.cancel_scope.cancel()


async def test_close_handshake_times_out(pair: PairFactory, autojump_clock: Any) -> None:
    async def close_at_once(conn: Connection) -> None:
        await conn.close(1000, "bye")

    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, close_at_once, close_timeout=5)
        start = trio.current_time()
        frame = await peer.recv_frame()
        assert frame.opcode == OP_CLOSE and (frame.close_code, frame.close_reason) == (1000, "bye")
        # Never answer: the server must give up after close_timeout and close the socket.
        while await peer.stream.receive_some(100):
            pass
        assert trio.current_time() - start == pytest.approx(5)
    assert conn.state is ConnectionState.CLOSED


async def test_peer_initiated_close(pair: PairFactory) -> None:
    seen: list[ConnectionClosed] = []

    async def handler(conn: Connection) -> None:
        try:
            await conn.receive()
        except ConnectionClosed as exc:
            seen.append(exc)

    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair, handler)
        await peer.send_close(4100, "done")
        frames = await peer.read_until_eof()
        assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 4100
    assert seen and (seen[0].code, seen[0].reason) == (4100, "done")


async def test_eof_without_close_is_1006(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        await peer.stream.aclose()
    assert conn.close_code == CloseCode.ABNORMAL
    assert conn.state is ConnectionState.CLOSED


async def test_closing_under_a_waiting_writer_and_reader_raises_nothing() -> None:
    """Another task closing the socket must not crash the writer or the nursery."""
    results: list[BaseException | str] = []

    async def reader(conn: Connection) -> None:
        try:
            await conn.receive()
        except ConnectionClosed:
            results.append("reader saw ConnectionClosed")

    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, socket_pair, reader, bufsize=4096,
                                    queue_max_bytes=10**8, queue_max_frames=10**6)
        for _ in range(2000):  # far more than the socket buffers hold: the writer waits
            conn.send_prepared(websocket.text_frame(b"z" * 1000))
        await trio.testing.wait_all_tasks_blocked()  # the writer is in, waiting for room
        assert conn.statistics().queued_frames > 0, conn.statistics()
        conn.abort()
    await peer.stream.aclose()
    assert results == ["reader saw ConnectionClosed"]
    assert conn.closed and conn.close_code == CloseCode.ABNORMAL


async def test_receive_nowait_takes_what_the_kernel_holds_without_waiting() -> None:
    transport, client = socket_pair()
    async with trio.open_nursery() as nursery:
        conn = WebSocketConnection(transport, Config(), nursery, "peer")
        await client.send_all(encode_frame(OP_TEXT, b"one"))
        assert await conn.receive() == "one"
        assert conn.receive_nowait() is None  # nothing parsed, nothing in the kernel
        # A socketpair's send is in the peer's buffer when send_all returns.
        await client.send_all(encode_frame(OP_TEXT, b"two") + encode_frame(OP_TEXT, b"three"))
        with trio.testing.assert_no_checkpoints():
            assert conn.receive_nowait() == "two"
            assert conn.receive_nowait() == "three"
            assert conn.receive_nowait() is None
        await client.aclose()
        assert conn.receive_nowait() is None  # EOF is left for receive() to report
        with pytest.raises(ConnectionClosed):
            await conn.receive()
        nursery.cancel_scope.cancel()


async def test_receive_nowait_on_a_stream_transport_takes_only_parsed_messages() -> None:
    transport, client = memory_pair()
    async with trio.open_nursery() as nursery:
        conn = WebSocketConnection(transport, Config(), nursery, "peer")
        await client.send_all(encode_frame(OP_TEXT, b"one") + encode_frame(OP_TEXT, b"two"))
        assert await conn.receive() == "one"
        assert conn.receive_nowait() == "two"
        await client.send_all(encode_frame(OP_TEXT, b"three"))
        assert conn.receive_nowait() is None  # a stream cannot be read without waiting
        assert await conn.receive() == "three"
        nursery.cancel_scope.cancel()
