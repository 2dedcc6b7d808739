"""Presence across two nodes on one Redis: a topic's presence list and its
join/leave events cover both nodes, and a node's members go when its clients
do, or, when the node stops without a word, once its liveness key expires."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio

from trioserve import Config, Server
from trioserve.push.brokers.redis import RedisBroker
from trioserve.push.brokers.redis_presence import members_key

from ..conftest import RedisServer
from ..peers import RawWebSocket
from ..serverproc import STARTUP_TIMEOUT
from .test_embedded_presence import check_presence_spans, client_on, conns, event, request, until_conns
from .test_redis_batching import redis_call
from .test_workers import close_all, run_workers

pytestmark = pytest.mark.system

LIMIT = 30
EVENTS = {"presence_events": ["room.*"]}


async def test_presence_and_join_leave_events_span_the_nodes(start_server: Any, redis: RedisServer) -> None:
    node_a = await start_server(broker=redis.url, **EVENTS)
    node_b = await start_server(broker=redis.url, **EVENTS)
    name_a, name_b = node_a.server.hub.broker.node, node_b.server.hub.broker.node
    assert re.fullmatch(r"[0-9a-f]{8}", name_a) and name_a != name_b
    with trio.fail_after(LIMIT):
        a, b = await RawWebSocket.connect(node_a.port), await RawWebSocket.connect(node_b.port)
        async with a.stream, b.stream:
            await check_presence_spans(a, b, name_a, name_b, b_sees_a_at_once=False)


async def test_a_stopped_nodes_members_expire_and_leave(
    start_server: Any, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RedisBroker, "presence_refresh", 0.2)
    monkeypatch.setattr(RedisBroker, "presence_ttl", 1.0)
    node_a = await start_server(broker=redis.url, **EVENTS)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as doomed:
            # Node b runs in its own nursery, so the test can stop it with no cleanup.
            server_b = Server(Config(port=0, tcp_port=0, broker=redis.url, **EVENTS))
            await doomed.start(server_b.serve)
            port_b = server_b.addresses["ws+http"][0][1]
            a, b = await RawWebSocket.connect(node_a.port), await RawWebSocket.connect(port_b)
            await request(a, {"op": "subscribe", "topic": "room.1", "id": 1})
            await request(b, {"op": "subscribe", "topic": "room.1", "id": 1})
            await request(b, {"op": "subscribe", "topic": "plain", "id": 2})
            theirs = (await event(a, "join"))["client"]["conn"]
            await until_conns(a, "plain", lambda found: theirs in found)
            doomed.cancel_scope.cancel()
        # Cancelled: its writer sent nothing more, so its members are still in Redis ...
        assert theirs.encode() in await redis_call(redis.port, "HKEYS", members_key("room.1"))
        # ... until its liveness key expires: node a watches the nodes whose joins
        # it saw, so it sweeps them and sends their leave event with nobody asking
        # for presence; then they are gone from the list too.
        async with a.stream:
            assert (await event(a, "leave"))["client"]["conn"] == theirs
            await until_conns(a, "room.1", lambda found: theirs not in found)
            await until_conns(a, "plain", lambda found: theirs not in found)
            # Swept from Redis too, and node a's own member is still there (refreshed).
            keys = await redis_call(redis.port, "HKEYS", members_key("room.1"))
            assert theirs.encode() not in keys and len(keys) == 1
        await b.aclose()


async def test_each_worker_is_a_node(redis: RedisServer, tmp_path: Path) -> None:
    # serve --workers 2 --broker redis://: each worker is its own node.
    config = tmp_path / "presence.toml"
    config.write_text('presence_events = ["room.*"]\n')
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--config", str(config), "--broker", redis.url) as sp:
            a = await client_on(sp.port, "1")
            b = await client_on(sp.port, "2")
            try:
                await request(a, {"op": "subscribe", "topic": "room.1", "id": 1})
                (mine,) = await conns(a, "room.1")
                await request(b, {"op": "subscribe", "topic": "room.1", "id": 1})
                theirs = (await event(a, "join"))["client"]["conn"]
                assert mine.split("@")[1] != theirs.split("@")[1]
                assert await conns(a, "room.1") == sorted([mine, theirs])
            finally:
                await close_all([a, b])
