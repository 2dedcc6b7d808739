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
import wsproto.events as wse

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

from .helpers import LinePeer, PairFactory, WSPeer, memory_pair, socket_pair


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
) -> tuple[Connection, WSPeer]:
    transport, client = pair(bufsize)
    conn = await nursery.start(serve_conn, WebSocketConnection, transport, Config(**config), handler)
    return conn, WSPeer(client)


async def start_tcp(
    nursery: trio.Nursery, pair: PairFactory, handler: Callable[[Connection], Awaitable[None]] = echo,
    **config: Any,
) -> tuple[Connection, LinePeer]:
    transport, client = pair()
    conn = await nursery.start(serve_conn, TcpConnection, transport, Config(**config), handler)
    return conn, LinePeer(client)


async def test_text_and_binary_messages(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        await peer.send(wse.TextMessage("héllo"))
        assert await peer.next_message() == "HÉLLO"
        await peer.send(wse.BytesMessage(b"\x00\x01\x02"))
        assert await peer.next_message() == b"\x02\x01\x00"
        stats = conn.statistics()
        assert (stats.messages_in, stats.messages_out) == (2, 2)
        assert stats.bytes_in > 0 and stats.bytes_out > 0
        await peer.send(wse.CloseConnection(code=1000))
        events = await peer.read_until_eof()
        assert isinstance(events[-1], wse.CloseConnection) and events[-1].code == 1000
    assert conn.state is ConnectionState.CLOSED
    assert conn.close_code == 1000


async def test_fragmented_message_is_joined(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair)
        await peer.send(wse.TextMessage("ab", message_finished=False))
        await peer.send(wse.TextMessage("cd", message_finished=True))
        assert await peer.next_message() == "ABCD"
        nursery.cancel_scope.cancel()


async def test_heartbeat_pings_then_closes_4002(pair: PairFactory, autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, ping_interval=25, ping_timeout=10)
        start = trio.current_time()
        event = await peer.next_event()
        assert isinstance(event, wse.Ping)
        assert trio.current_time() - start == pytest.approx(25)
        event = await peer.next_event()
        assert isinstance(event, wse.CloseConnection)
        assert (event.code, event.reason) == (4002, "heartbeat timeout")
        assert trio.current_time() - start == pytest.approx(35)
        await peer.send(event.response())
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
        peer = WSPeer(client)
        start = trio.current_time()
        event = await peer.next_event()
        assert isinstance(event, wse.Ping)
        assert trio.current_time() - start == pytest.approx(25 + beats.slack)
        event = await peer.next_event()
        assert isinstance(event, wse.CloseConnection) and event.code == 4002
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
            peers.append(WSPeer(client))
        await trio.sleep(20)
        await peers[0].send(wse.TextMessage("activity"))
        await trio.sleep(5.5)
        assert beats.sweep() == 2  # the two silent for 25 s; the third spoke 5.5 s ago
        assert beats.sweep() == 0  # a ping is out: no second one
        for peer in peers[1:]:
            assert isinstance(await peer.next_event(), wse.Ping)
        nursery.cancel_scope.cancel()


async def test_pong_and_data_keep_the_connection_alive(pair: PairFactory, autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, ping_interval=25, ping_timeout=10)
        for _ in range(4):
            await trio.sleep(20)
            await peer.send(wse.TextMessage("x"))
            assert await peer.next_message() == "X"
        event = await peer.next_event()
        assert isinstance(event, wse.Ping)
        await peer.send(event.response())
        await trio.sleep(30)  # past ping_timeout: the pong counted as activity
        assert conn.state is ConnectionState.OPEN
        event = await peer.next_event()
        assert isinstance(event, wse.Ping)  # the next round, not a close
        nursery.cancel_scope.cancel()


async def test_server_answers_pings(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair)
        await peer.send(wse.Ping(b"abc"))
        event = await peer.next_event()
        assert isinstance(event, wse.Pong) and event.payload == b"abc"
        nursery.cancel_scope.cancel()


async def test_close_handshake_times_out(pair: PairFactory, autojump_clock: Any) -> None:
    async def close_at_once(conn: Connection) -> None:
        await conn.close(1000, "bye")

    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, close_at_once, close_timeout=5)
        start = trio.current_time()
        event = await peer.next_event()
        assert isinstance(event, wse.CloseConnection) and (event.code, event.reason) == (1000, "bye")
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
        await peer.send(wse.CloseConnection(code=4100, reason="done"))
        events = await peer.read_until_eof()
        assert isinstance(events[-1], wse.CloseConnection) and events[-1].code == 4100
    assert seen and (seen[0].code, seen[0].reason) == (4100, "done")


@pytest.mark.parametrize("fragmented", [False, True])
async def test_message_too_big_closes_1009(pair: PairFactory, fragmented: bool) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, max_message_size=100)
        await peer.send(wse.TextMessage("ok"))
        assert await peer.next_message() == "OK"
        if fragmented:
            await peer.send(wse.TextMessage("a" * 60, message_finished=False))
            await peer.send(wse.TextMessage("a" * 60, message_finished=True))
        else:
            await peer.send(wse.TextMessage("a" * 101))
        events = await peer.read_until_eof()
    assert isinstance(events[-1], wse.CloseConnection) and events[-1].code == 1009
    assert conn.close_code == 1009


async def test_multibyte_text_is_measured_in_bytes(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair, max_message_size=100)
        await peer.send(wse.TextMessage("é" * 50))  # 100 bytes: at the limit
        assert await peer.next_message() == "É" * 50
        await peer.send(wse.TextMessage("é" * 51))  # 102 bytes
        events = await peer.read_until_eof()
    assert isinstance(events[-1], wse.CloseConnection) and events[-1].code == 1009


async def test_invalid_utf8_closes_1007(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        # A masked text frame (mask 0) whose payload is not UTF-8.
        await peer.send_raw(b"\x81\x82\x00\x00\x00\x00\xff\xfe")
        events = await peer.read_until_eof()
    assert isinstance(events[-1], wse.CloseConnection) and events[-1].code == 1007
    assert conn.close_code == 1007


async def test_unmasked_client_frame_closes_1002(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        await peer.send_raw(websocket.text_frame(b"hi"))  # server-style: no mask
        events = await peer.read_until_eof()
    assert isinstance(events[-1], wse.CloseConnection) and events[-1].code == 1002
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
            assert await peer.next_message() == f.decode()
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
        events = await peer.read_until_eof()
    messages = [e for e in events if isinstance(e, wse.Message)]
    assert all(m.data == payload.decode() for m in messages)
    assert len(messages) < sent
    assert isinstance(events[-1], wse.CloseConnection)
    assert (events[-1].code, events[-1].reason) == (4008, "slow consumer")


async def test_drop_oldest_keeps_the_newest(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, memory_pair, listen_only, bufsize=1,
                                    slow_consumer_policy="drop-oldest", queue_max_frames=10)
        for i in range(100):
            assert conn.send_prepared(websocket.text_frame(str(i).encode()))
        stats = conn.statistics()
        assert conn.state is ConnectionState.OPEN
        assert stats.dropped_frames > 0 and stats.queued_frames <= 10
        received = [int(await peer.next_message()) for _ in range(100 - stats.dropped_frames)]
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
        assert [await peer.next_message() for _ in range(50)] == [str(i) for i in range(50)]
        await done.wait()
        assert not conn.statistics().slow_consumer
        nursery.cancel_scope.cancel()


# --- TCP (NDJSON) ------------------------------------------------------------------------


async def test_tcp_lines_and_heartbeat_lines(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_tcp(nursery, pair)
        await peer.send_line(b'{"x":1}')
        assert await peer.next_line() == b'{"X":1}'
        await peer.send_line(b'{"op":"ping","id":3}')
        assert await peer.next_line() == b'{"id":3,"ok":true,"op":"pong"}'
        await peer.send_line(b'{"op":"pong"}')  # swallowed: heartbeat, not a message
        await peer.send_line(b'{"y":2}')
        assert await peer.next_line() == b'{"Y":2}'
        nursery.cancel_scope.cancel()


async def test_tcp_heartbeat_timeout(pair: PairFactory, autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_tcp(nursery, pair, ping_interval=25, ping_timeout=10)
        assert await peer.next_line() == b'{"op":"ping"}'
        assert await peer.next_line() == b'{"op":"close","code":4002,"reason":"heartbeat timeout"}'
        assert await peer.next_line() is None  # the server sent EOF after its close line
        await peer.stream.aclose()
    assert conn.close_code == 4002


async def test_tcp_line_too_long(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_tcp(nursery, pair, max_message_size=50)
        await peer.stream.send_all(b"z" * 51)  # no newline yet: the limit holds anyway
        assert await peer.next_line() == b'{"op":"close","code":1009,"reason":"line too long"}'
        assert await peer.next_line() is None
    assert conn.close_code == 1009


async def test_tcp_invalid_utf8(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_tcp(nursery, pair)
        await peer.send_line(b'{"a":"\xff"}')
        assert await peer.next_line() == b'{"op":"close","code":1007,"reason":"invalid UTF-8"}'
        assert await peer.next_line() is None
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
