"""SSE recovery with a network broker: Redis (two nodes) and the embedded one (``--workers 2``).

A stream's cursor is made on one node and given back to another: the topics'
epochs and offsets are the broker's, so recovery is exact wherever the
reconnect lands, including the part of the gap the node fetches from the broker.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from ..conftest import RedisServer
from ..peers import SseStream, http_publish
from ..serverproc import STARTUP_TIMEOUT
from .test_workers import run_workers

pytestmark = pytest.mark.system

LIMIT = 20


async def read_start(s: SseStream) -> list[tuple[str, int]]:
    """The recovered publications before the ``subscribed`` event, as (topic, offset)."""
    assert s.status == 200, await s.body()
    got = []
    while (ev := await s.next_event()).event != "subscribed":
        assert ev.event is None, ev
        got.append((ev.json()["topic"], ev.json()["offset"]))
    return got


async def reconnects_exactly_once(open_port: list[int], publish_port: list[int]) -> None:
    """Three rounds: publish while away (through *publish_port*), reconnect (to
    *open_port*, round robin) with the last id, and get exactly what was missed."""
    s = await SseStream.open(open_port[0], "topic=x&topic=y")
    await read_start(s)
    async with s.stream:
        await http_publish(publish_port[0], "x", 0)
        last = await s.next_event()
    assert (last.json()["topic"], last.json()["offset"]) == ("x", 1)
    seen = {"x": 1, "y": 0}
    for rnd in range(3):
        for _ in range(3):
            for topic in ("x", "y"):
                await http_publish(publish_port[rnd % len(publish_port)], topic, rnd)
        port = open_port[(rnd + 1) % len(open_port)]
        s = await SseStream.open(port, "topic=x&topic=y", [("Last-Event-ID", last.id or "")])
        async with s.stream:
            got = await read_start(s)
            expected = [(t, seen[t] + i) for t in ("x", "y") for i in (1, 2, 3)]
            assert got == expected, (rnd, port)
            seen = {"x": seen["x"] + 3, "y": seen["y"] + 3}
            await http_publish(publish_port[0], "y", "live")
            last = await s.next_event()
            seen["y"] += 1
            assert (last.json()["topic"], last.json()["offset"]) == ("y", seen["y"])


async def test_redis_two_nodes(start_server: Any, redis: RedisServer) -> None:
    a = await start_server(broker=redis.url)
    b = await start_server(broker=redis.url)
    with trio.fail_after(LIMIT):
        await reconnects_exactly_once([a.port, b.port], [b.port, a.port])


async def test_embedded_workers() -> None:
    async with run_workers() as sp:
        with trio.fail_after(LIMIT + STARTUP_TIMEOUT):
            await reconnects_exactly_once([sp.port], [sp.port])
