"""Presence across ``serve --workers 2`` with the embedded broker: a topic's
presence list and its join/leave events cover both workers, and a worker's
members go when its clients do, or when it dies."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from ..peers import RawWebSocket
from ..serverproc import STARTUP_TIMEOUT, ServerProcess
from .test_workers import LIMIT, close_all, connections_by_worker, run_workers, worker_pids

pytestmark = pytest.mark.system


@asynccontextmanager
async def presence_workers(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    config = tmp_path / "presence.toml"
    config.write_text('presence_events = ["room.*"]\n')
    async with run_workers("--config", str(config)) as sp:
        yield sp


async def request(ws: RawWebSocket, cmd: dict[str, Any]) -> dict[str, Any]:
    """Send *cmd*; its reply (events before it are skipped, so read those first)."""
    await ws.send_json(cmd)
    while True:
        msg = await ws.recv_json()
        if msg.get("id") == cmd["id"]:
            assert msg["ok"] is True, msg
            return msg  # type: ignore[no-any-return]


async def event(ws: RawWebSocket, op: str) -> dict[str, Any]:
    """The next join or leave event."""
    while True:
        msg = await ws.recv_json()
        if msg.get("op") in ("join", "leave"):
            assert msg["op"] == op, msg
            return msg  # type: ignore[no-any-return]


async def client_on(port: int, worker: str, path: str = "/ws") -> RawWebSocket:
    """A connection on *worker* (the kernel picks; others are closed again)."""
    extra: list[RawWebSocket] = []
    try:
        while True:
            before = await connections_by_worker(port)
            ws = await RawWebSocket.connect(port, path)
            await request(ws, {"op": "ping", "id": "ping"})  # counted by now
            after = await connections_by_worker(port)
            (landed,) = [w for w, n in after.items() if n > before.get(w, 0)]
            if landed == worker:
                return ws
            extra.append(ws)
    finally:
        await close_all(extra)


async def conns(ws: RawWebSocket, topic: str) -> list[str]:
    reply = await request(ws, {"op": "presence", "topic": topic, "id": "presence"})
    return sorted(c["conn"] for c in reply["clients"])


async def until_conns(ws: RawWebSocket, topic: str, predicate: Any) -> list[str]:
    """Ask again until *predicate* holds of the presence list (the caller bounds it):
    another worker's subscribe reaches the supervisor a moment after its reply."""
    while not predicate(found := await conns(ws, topic)):
        await trio.sleep(0.01)
    return found


async def check_presence_spans(a: RawWebSocket, b: RawWebSocket, node_a: str, node_b: str, *,
                               b_sees_a_at_once: bool) -> None:
    """*a* on one node (or worker) and *b* on another: the presence list and the
    join/leave events of a topic cover both, and *b*'s member goes when *b* leaves
    or disconnects. ``conn`` ids end with ``@`` and the node's name."""
    await request(a, {"op": "subscribe", "topic": "room.1", "id": 1})
    await request(a, {"op": "subscribe", "topic": "plain", "id": 2})
    (mine,) = await conns(a, "room.1")
    assert re.fullmatch(rf"c\d+@{node_a}", mine), mine
    await request(b, {"op": "subscribe", "topic": "room.1", "id": 1})
    joined = (await event(a, "join"))["client"]
    assert joined["client"] == "anonymous" and joined["transport"] == "websocket"
    theirs = joined["conn"]
    assert re.fullmatch(rf"c\d+@{node_b}", theirs), theirs
    # The member is written before its event goes out: *a* lists it now.
    assert await conns(a, "room.1") == sorted([mine, theirs])
    if b_sees_a_at_once:
        assert await conns(b, "room.1") == sorted([mine, theirs])
    else:
        assert await until_conns(b, "room.1", lambda found: mine in found) == sorted([mine, theirs])
    await request(b, {"op": "unsubscribe", "topic": "room.1", "id": 2})
    assert (await event(a, "leave"))["client"] == joined
    assert await conns(a, "room.1") == [mine]
    await request(b, {"op": "subscribe", "topic": "room.1", "id": 3})
    assert (await event(a, "join"))["client"] == joined
    # A topic without presence events: the list spans the nodes too.
    await request(b, {"op": "subscribe", "topic": "plain", "id": 4})
    await until_conns(a, "plain", lambda found: theirs in found)
    await b.aclose()  # disconnecting leaves every topic
    assert (await event(a, "leave"))["client"] == joined
    assert await conns(a, "room.1") == [mine]
    assert await until_conns(a, "plain", lambda found: theirs not in found) == [mine]


async def test_presence_and_join_leave_events_span_the_workers(tmp_path: Path) -> None:
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with presence_workers(tmp_path) as sp:
            a = await client_on(sp.port, "1")
            b = await client_on(sp.port, "2")
            try:
                await check_presence_spans(a, b, "w1", "w2", b_sees_a_at_once=True)
            finally:
                await close_all([a, b])


async def test_a_killed_workers_members_leave(tmp_path: Path) -> None:
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with presence_workers(tmp_path) as sp:
            a = await client_on(sp.port, "1")
            b = await client_on(sp.port, "2")
            try:
                await request(a, {"op": "subscribe", "topic": "room.1", "id": 1})
                await request(b, {"op": "subscribe", "topic": "room.1", "id": 1})
                await request(b, {"op": "subscribe", "topic": "plain", "id": 2})
                theirs = (await event(a, "join"))["client"]["conn"]
                await until_conns(a, "plain", lambda found: theirs in found)
                victim = worker_pids(sp)[2]
                os.kill(victim, signal.SIGKILL)
                # Its socket to the supervisor closes: its members leave, with events.
                assert (await event(a, "leave"))["client"]["conn"] == theirs
                assert theirs not in await conns(a, "room.1")
                assert theirs not in await conns(a, "plain")
                await sp.wait_for_log(re.compile(rb"worker 2 \(pid %d\) killed by signal SIGKILL" % victim))
            finally:
                await a.aclose()
                with contextlib.suppress(Exception):
                    await b.aclose()
