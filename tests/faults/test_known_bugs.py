"""Small deterministic reproducers of the bugs the fault-injection runs found.

All of them are fixed now; each stays as a regression test.
docs/reliability.md (Fault injection) has the figures.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from ..conftest import RedisServer
from ..peers import OP_CLOSE, RawWebSocket

pytestmark = pytest.mark.faults


async def test_drain_delivers_a_publication_redis_accepted_before_it(
    start_server: Any, redis: RedisServer
) -> None:
    rs = await start_server(broker=redis.url)
    with trio.fail_after(10):
        ws = await RawWebSocket.connect(rs.port)
        await ws.send_json({"op": "subscribe", "topic": "t", "id": 1})
        assert (await ws.recv_json())["ok"] is True
        result = await rs.server.hub.publish("t", "accepted before the drain")
        assert result.offset == 1
        got: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rs.server.drain)
            while (frame := await ws.recv_frame()).opcode != OP_CLOSE:
                got.append(frame.json()["offset"])
            assert frame.close_code == 1001
            await ws.send_close(1001)
        await ws.aclose()
    assert got == [1]


async def test_max_connections_holds_under_concurrent_upgrades(start_server: Any) -> None:
    rs = await start_server(max_connections=10)
    held: list[RawWebSocket] = []

    async def one() -> None:
        try:
            held.append(await RawWebSocket.connect(rs.port))
        except AssertionError:  # upgrade refused (503)
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one)
        for ws in held:
            await ws.aclose()
    assert len(held) <= 10, f"{len(held)} upgrades accepted with max_connections=10"
