"""Connection: messages, heartbeat, close handshake, limits and slow consumers.

Every test runs over a real socketpair (direct sends) and over trio memory
streams (everything through the queue and the writer), with the autojump clock
standing in for every timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from trioserve import (
    CloseCode,
    Config,
    Connection,
    ConnectionClosed,
    ConnectionState,
    TcpConnection,
    WebSocketConnection,
)
from trioserve.net.heartbeat import Heartbeats
from trioserve.protocol import websocket

from ...peers import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, NdjsonClient, RawWebSocket
from ..helpers import PairFactory, memory_pair, socket_pair


@pytest.fixture(params=["socket", "memory"])
def pair(request: pytest.FixtureRequest) -> PairFactory:
    return socket_pair if request.param == "socket" else memory_pair


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
    handler: Callable[[Connection], Awaitable[None]],
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
    nursery: trio.Nursery, pair: PairFactory, handler: Callable[[Connection], Awaitable[None]] = echo,
    bufsize: int | None = None, **config: Any,
) -> tuple[Connection, RawWebSocket]:
    transport, client = pair(bufsize)
    conn = await nursery.start(serve_conn, WebSocketConnection, transport, Config(**config), handler)
    return conn, RawWebSocket(client)


async def start_tcp(
    nursery: trio.Nursery, pair: PairFactory, handler: Callable[[Connection], Awaitable[None]] = echo,
    **config: Any,
) -> tuple[Connection, NdjsonClient]:
    transport, client = pair()
    conn = await nursery.start(serve_conn, TcpConnection, transport, Config(**config), handler)
    return conn, NdjsonClient(client)


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


async def test_fragmented_message_is_joined(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair)
        await peer.send_frame(OP_TEXT, b"ab", fin=False)
        await peer.send_frame(OP_CONT, b"cd", fin=True)
        assert await peer.recv_message() == "ABCD"
        nursery.cancel_scope.cancel()


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


async def test_the_sweep_pings_each_silent_connection_once(pair: PairFactory, autojump_clock: Any) -> None:
    conns: list[Connection] = []
    beats = Heartbeats(25, 10, lambda: conns)
    peers = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            transport, client = pair()
            conn = WebSocketConnection(transport, Config(ping_interval=25, ping_timeout=10), nursery,
                                       "peer", heartbeats=beats)
            nursery.start_soon(listen_only, conn)
            conns.append(conn)
            peers.append(RawWebSocket(client))
        await trio.sleep(20)
        await peers[0].send_text("activity")
        await trio.sleep(5.5)
        assert beats.sweep() == 2  # the two silent for 25 s; the third spoke 5.5 s ago
        assert beats.sweep() == 0  # a ping is out: no second one
        for peer in peers[1:]:
            assert (await peer.recv_frame()).opcode == OP_PING
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


async def test_server_answers_pings(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair)
        await peer.send_frame(OP_PING, b"abc")
        frame = await peer.recv_frame()
        assert frame.opcode == OP_PONG and frame.payload == b"abc"
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


@pytest.mark.parametrize("fragmented", [False, True])
async def test_message_too_big_closes_1009(pair: PairFactory, fragmented: bool) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, max_message_size=100)
        await peer.send_text("ok")
        assert await peer.recv_message() == "OK"
        if fragmented:
            await peer.send_frame(OP_TEXT, b"a" * 60, fin=False)
            await peer.send_frame(OP_CONT, b"a" * 60, fin=True)
        else:
            await peer.send_text("a" * 101)
        frames = await peer.read_until_eof()
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1009
    assert conn.close_code == 1009


async def test_multibyte_text_is_measured_in_bytes(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair, max_message_size=100)
        await peer.send_text("é" * 50)  # 100 bytes: at the limit
        assert await peer.recv_message() == "É" * 50
        await peer.send_text("é" * 51)  # 102 bytes
        frames = await peer.read_until_eof()
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1009


async def test_invalid_utf8_closes_1007(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        # A masked text frame (mask 0) whose payload is not UTF-8.
        await peer.send_raw(b"\x81\x82\x00\x00\x00\x00\xff\xfe")
        frames = await peer.read_until_eof()
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1007
    assert conn.close_code == 1007


async def test_unmasked_client_frame_closes_1002(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        await peer.send_raw(websocket.text_frame(b"hi"))  # server-style: no mask
        frames = await peer.read_until_eof()
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1002
    assert conn.close_code == 1002


async def test_eof_without_close_is_1006(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        await peer.stream.aclose()
    assert conn.close_code == CloseCode.ABNORMAL
    assert conn.state is ConnectionState.CLOSED


async def test_backlog_keeps_order_across_partial_writes() -> None:
    """Frames that outrun a tiny socket buffer queue up and arrive complete and in order."""
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, socket_pair, listen_only, bufsize=4096,
                                    queue_max_bytes=10**8, queue_max_frames=10**6)
        frames = [f"{i:05d}".encode() + b"x" * 1000 for i in range(2000)]
        for f in frames:
            assert conn.send_prepared(websocket.text_frame(f))
        assert conn.statistics().queued_frames > 0
        for f in frames:
            assert await peer.recv_message() == f.decode()
        with trio.fail_after(1):
            while conn.statistics().queued_frames:
                await trio.sleep(0)
        assert conn.statistics().messages_out == 2000
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("make", [socket_pair, memory_pair], ids=["socket", "memory"])
async def test_slow_consumer_is_closed_4008(make: PairFactory, autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, make, listen_only, bufsize=4096,
                                    queue_max_bytes=64 * 1024, close_timeout=5)
        payload = b"y" * 1000
        sent = 0
        while conn.state is ConnectionState.OPEN:
            conn.send_prepared(websocket.text_frame(payload))
            sent += 1
            assert sent < 10_000
        stats = conn.statistics()
        assert stats.slow_consumer and stats.close_code == 4008
        assert stats.queued_bytes < 64 * 1024
        # Other sends are refused rather than queued behind the close frame.
        assert not conn.send_prepared(websocket.text_frame(payload))
        frames = await peer.read_until_eof()
    messages = [f for f in frames if f.opcode not in (OP_PING, OP_CLOSE)]
    assert all((m.opcode, m.fin, m.payload) == (OP_TEXT, True, payload) for m in messages)
    assert len(messages) < sent
    assert frames[-1].opcode == OP_CLOSE
    assert (frames[-1].close_code, frames[-1].close_reason) == (4008, "slow consumer")


async def test_drop_oldest_keeps_the_newest(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, memory_pair, listen_only, bufsize=1,
                                    slow_consumer_policy="drop-oldest", queue_max_frames=10)
        for i in range(100):
            assert conn.send_prepared(websocket.text_frame(str(i).encode()))
        stats = conn.statistics()
        assert conn.state is ConnectionState.OPEN
        assert stats.dropped_frames > 0 and stats.queued_frames <= 10
        received = [int(await peer.recv_message()) for _ in range(100 - stats.dropped_frames)]
        assert received == sorted(received) and received[-1] == 99
        nursery.cancel_scope.cancel()


async def test_send_waits_instead_of_tripping_the_policy(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, memory_pair, listen_only, bufsize=1, queue_max_frames=5)
        done = trio.Event()

        async def producer() -> None:
            for i in range(50):
                await conn.send(str(i))
            done.set()

        nursery.start_soon(producer)
        await trio.sleep(10)
        assert not done.is_set() and conn.state is ConnectionState.OPEN
        assert [await peer.recv_message() for _ in range(50)] == [str(i) for i in range(50)]
        await done.wait()
        assert not conn.statistics().slow_consumer
        nursery.cancel_scope.cancel()


# --- TCP (NDJSON) ------------------------------------------------------------------------


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
        await trio.sleep(0.01)
        assert conn.statistics().queued_frames > 0, conn.statistics()
        conn.abort()
    await peer.stream.aclose()
    assert results == ["reader saw ConnectionClosed"]
    assert conn.closed and conn.close_code == CloseCode.ABNORMAL
