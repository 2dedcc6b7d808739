"""The sending half (Sender): direct sends, the queue behind a short write and its
writer, the slow-consumer policies, the process-wide QueueTotal, and waiting sends.

The first tests send through a transport whose room the test sets (a socket's
buffer is the kernel's to size, so a real one cannot be made to take exactly
three bytes); the last ones run over real socketpairs and memory streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing

from trioserve import Config, ConnectionClosed, ConnectionState, TcpConnection
from trioserve.net.outbound import QueueTotal
from trioserve.net.transport import Transport
from trioserve.protocol import ndjson, websocket

from ...peers import OP_CLOSE, OP_PING, OP_TEXT
from ..helpers import PairFactory, listen_only, memory_pair, socket_pair, start_ws


class Window(Transport):
    """A byte sink that takes only as many bytes as it has room for, like a full
    socket buffer; :meth:`grant` makes room and wakes a waiting writer."""

    def __init__(self, room: int = 0):
        self.room = room
        self.out = bytearray()
        self.eof = False
        self.closed = False
        self._changed = trio.Event()

    def grant(self, room: int) -> None:
        self.room += room
        self._changed.set()
        self._changed = trio.Event()

    def _take(self, data: bytes | memoryview) -> int:
        n = min(self.room, len(data))
        self.room -= n
        self.out += data[:n]
        return n

    def try_send(self, data: bytes) -> int:
        if self.closed:
            raise BrokenPipeError
        return self._take(data)

    async def wait_writable(self) -> None:
        while not self.room:
            if self.closed:
                raise ConnectionResetError
            await self._changed.wait()

    async def send_some(self, buffers: Sequence[bytes | memoryview]) -> int:
        sent = 0
        for buf in buffers:
            n = self._take(buf)
            sent += n
            if n < len(buf):
                break
        return sent

    async def receive_some(self) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def shutdown_write(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True
        self.grant(0)


def tcp(window: Window, nursery: trio.Nursery, total: QueueTotal | None = None,
        **config: Any) -> TcpConnection:
    return TcpConnection(window, Config(**config), nursery, "peer", queue_total=total)


async def test_with_room_a_send_goes_out_at_once_and_starts_no_task() -> None:
    async with trio.open_nursery() as nursery:
        window = Window(room=1000)
        conn = tcp(window, nursery)
        assert conn.send_prepared(b"a\nb\nc\n", 3)
        assert window.out == b"a\nb\nc\n"  # before any checkpoint
        assert not nursery.child_tasks  # no writer
        stats = conn.statistics()
        assert (stats.queued_bytes, stats.queued_frames, stats.messages_out, stats.bytes_out) == (0, 0, 3, 6)


async def test_a_short_write_queues_the_rest_and_later_frames_wait_behind_it() -> None:
    total = QueueTotal()
    async with trio.open_nursery() as nursery:
        window = Window(room=3)
        conn = tcp(window, nursery, total)
        conn.send_prepared(b"hello\n")
        assert window.out == b"hel"
        assert (conn.queued_bytes, conn.queued_frames, total.bytes) == (3, 1, 3)
        assert len(nursery.child_tasks) == 1  # the writer, waiting for room
        window.room = 100  # room, but the writer has not been woken: the next frame must not overtake
        conn.send_prepared(b"world\n")
        assert window.out == b"hel"
        assert (conn.queued_bytes, conn.queued_frames, total.bytes) == (9, 2, 9)
        window.grant(0)
        await trio.testing.wait_all_tasks_blocked()
        assert window.out == b"hello\nworld\n"
        assert (conn.queued_bytes, conn.queued_frames, total.bytes) == (0, 0, 0)
        assert conn.statistics().messages_out == 2
        assert not nursery.child_tasks  # the writer is gone with the backlog
        conn.send_prepared(b"again\n")  # and the direct path is back
        assert window.out.endswith(b"again\n")


async def test_disconnect_policy_closes_4008_after_the_partly_sent_frame() -> None:
    total = QueueTotal()
    async with trio.open_nursery() as nursery:
        window = Window(room=2)
        conn = tcp(window, nursery, total, queue_max_frames=3)
        for frame in (b"AAAA\n", b"BBBB\n", b"CCCC\n"):
            assert conn.send_prepared(frame)
        assert conn.state is ConnectionState.OPEN  # at the limit, not over it
        conn.send_prepared(b"DDDD\n")
        stats = conn.statistics()
        assert conn.state is ConnectionState.CLOSING
        assert (stats.close_code, stats.slow_consumer) == (4008, True)
        close_line = ndjson.close_line(4008, "slow consumer")
        # What is left: the rest of the frame the peer has begun, then the close line.
        assert stats.queued_frames == 1 and total.bytes == stats.queued_bytes == 3 + len(close_line)
        assert not conn.send_prepared(b"EEEE\n")
        window.grant(1000)
        await trio.testing.wait_all_tasks_blocked()
        assert window.out == b"AAAA\n" + close_line
        assert window.eof  # TCP: EOF after the close line; the reader waits for the peer's
        assert total.bytes == 0


async def test_drop_oldest_drops_whole_frames_after_the_partly_sent_one() -> None:
    total = QueueTotal()
    async with trio.open_nursery() as nursery:
        window = Window(room=2)
        conn = tcp(window, nursery, total, queue_max_frames=3, slow_consumer_policy="drop-oldest")
        for frame in (b"AAAA\n", b"BBBB\n", b"CCCC\n", b"DDDD\n", b"EEEE\n"):
            assert conn.send_prepared(frame)
        stats = conn.statistics()
        assert conn.state is ConnectionState.OPEN and not stats.slow_consumer
        assert (stats.dropped_frames, stats.queued_frames) == (2, 3)
        assert total.bytes == stats.queued_bytes == 3 + 5 + 5
        window.grant(1000)
        await trio.testing.wait_all_tasks_blocked()
        assert window.out == b"AAAA\nDDDD\nEEEE\n"


async def test_queue_total_adds_every_queue_and_calls_on_over_once() -> None:
    calls: list[None] = []
    total = QueueTotal(limit=10, on_over=lambda: calls.append(None))
    async with trio.open_nursery() as nursery:
        a, b = tcp(Window(), nursery, total), tcp(Window(), nursery, total)
        fast = tcp(Window(room=1000), nursery, total)
        fast.send_prepared(b"x" * 100)  # taken by the kernel at once: never counted
        a.send_prepared(b"12345\n")
        assert (total.bytes, total.over, calls) == (6, False, [])
        b.send_prepared(b"12345\n")
        assert (total.bytes, total.over, len(calls)) == (12, True, 1)
        a.send_prepared(b"12345\n")
        assert len(calls) == 1  # once, until the shedder has run
        assert total.bytes == a.queued_bytes + b.queued_bytes == 18
        b.abort()
        assert total.bytes == a.queued_bytes == 12
        total.over = False  # what the shedder does once it has run
        a.send_prepared(b"1\n")
        assert len(calls) == 2
        a.abort()
        assert total.bytes == 0


async def test_shed_closes_an_open_connection_4008_and_aborts_a_closing_one() -> None:
    total = QueueTotal()
    async with trio.open_nursery() as nursery:
        window = Window()
        conn = tcp(window, nursery, total)
        for _ in range(3):
            conn.send_prepared(b"data\n")
        conn.shed()
        assert conn.state is ConnectionState.CLOSING and conn.close_code == 4008
        assert conn.statistics().slow_consumer
        assert total.bytes == conn.queued_bytes == len(ndjson.close_line(4008, "slow consumer"))
        conn.shed()  # still waiting to send its close line: now it goes at once
        assert conn.closed and window.closed and total.bytes == 0


async def test_send_raises_connection_closed_when_closed_while_it_waits() -> None:
    async with trio.open_nursery() as nursery:
        conn = tcp(Window(), nursery, queue_max_frames=1)
        conn.send_prepared(b"first\n")
        raised: list[ConnectionClosed] = []

        async def waiting_send() -> None:
            try:
                await conn.send("second")
            except ConnectionClosed as exc:
                raised.append(exc)

        nursery.start_soon(waiting_send)
        await trio.testing.wait_all_tasks_blocked()
        assert not raised
        conn.abort()
    assert len(raised) == 1 and (raised[0].code, raised[0].reason) == (1006, "aborted")


# --- over real transports --------------------------------------------------------------------


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
        # The writer counts a send before it can yield, so by the time the peer has read
        # the last frame the queue is empty.
        assert conn.statistics().queued_frames == 0
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
