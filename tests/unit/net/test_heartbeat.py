"""Heartbeats: the one task that pings every idle connection of a server."""

from __future__ import annotations

from typing import Any

import trio

from trioserve import Config, Connection, WebSocketConnection
from trioserve.net.heartbeat import Heartbeats

from ...peers import OP_PING, RawWebSocket
from ..helpers import PairFactory, listen_only


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
