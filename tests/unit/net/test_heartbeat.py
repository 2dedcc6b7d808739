"""Heartbeats: the one task that pings every idle connection of a server.

Most tests use connections reduced to what the sweep asks of them
(``ping_if_idle``), to see what it asks and when; the last runs the sweep over
real connections. How a reader's deadline leans on the sweep's slack is in
test_connection.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from trioserve import Config, Connection, WebSocketConnection
from trioserve.net import heartbeat
from trioserve.net.heartbeat import Heartbeats

from ...peers import OP_PING, RawWebSocket
from ..helpers import PairFactory, listen_only


class Idle:
    """A connection as the sweep sees it: it answers whether it pinged, and remembers the asks."""

    def __init__(self, pings: bool = True):
        self.pings = pings
        self.asked: list[tuple[float, float]] = []

    def ping_if_idle(self, cutoff: float, now: float) -> bool:
        self.asked.append((cutoff, now))
        return self.pings


@pytest.mark.parametrize(("interval", "timeout", "tick", "slack"), [
    (4, 10, 0.5, 10.5),  # an eighth of the interval...
    (8, 3, 1.0, 4.0),
    (25, 10, 1.0, 11.0),  # ...but at most a second
])
def test_tick_and_slack(interval: float, timeout: float, tick: float, slack: float) -> None:
    beats = Heartbeats(interval, timeout, list)
    assert (beats.tick, beats.slack) == (tick, slack)


async def test_a_sweep_asks_each_connection_with_the_cutoff_and_counts_the_pings(autojump_clock: Any) -> None:
    conns = [Idle(), Idle(pings=False), Idle()]
    beats = Heartbeats(25, 10, lambda: conns)
    now = trio.current_time()
    assert beats.sweep() == 2
    for conn in conns:
        assert conn.asked == [(now - 25, now)]


async def test_run_sweeps_once_a_tick_over_the_connections_of_the_moment(autojump_clock: Any) -> None:
    first, later = Idle(), Idle()
    conns = [first]
    beats = Heartbeats(8, 3, lambda: conns)  # a tick of 1 s
    async with trio.open_nursery() as nursery:
        await nursery.start(beats.run)
        start = trio.current_time()
        await trio.sleep(0.5)
        assert first.asked == []  # the first sweep waits a tick
        await trio.sleep(1)
        conns.append(later)
        await trio.sleep(1)
        assert [now - start for _, now in first.asked] == [1, 2]
        assert [now - start for _, now in later.asked] == [2]
        nursery.cancel_scope.cancel()


async def test_a_long_walk_lets_other_tasks_run_between_chunks(autojump_clock: Any) -> None:
    chunk = heartbeat._CHUNK
    order: list[object] = []
    first_chunk_done = trio.Event()

    class Marker(Idle):
        def __init__(self, index: int):
            super().__init__(pings=False)
            self.index = index

        def ping_if_idle(self, cutoff: float, now: float) -> bool:
            if self.index == chunk - 1:
                first_chunk_done.set()
            if self.index in (chunk, 2 * chunk):
                order.append(self.index)
            return False

    async def other_task() -> None:
        await first_chunk_done.wait()
        order.append("other task")

    conns = [Marker(i) for i in range(2 * chunk + 1)]
    beats = Heartbeats(8, 3, lambda: conns)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await nursery.start(beats.run)
        await trio.sleep(beats.tick + 0.5)
        nursery.cancel_scope.cancel()
    # Woken during the first chunk, the other task runs before the third chunk at the
    # latest (the scheduler may order it either side of the second).
    assert order.index("other task") < order.index(2 * chunk)


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
