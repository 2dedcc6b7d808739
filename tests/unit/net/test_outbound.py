"""The sending half (Sender): direct sends, the queue behind a short write and its
writer, the slow-consumer policies, and waiting sends."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from trioserve import ConnectionState
from trioserve.protocol import websocket

from ...peers import OP_CLOSE, OP_PING, OP_TEXT
from ..helpers import PairFactory, listen_only, memory_pair, socket_pair, start_ws


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
