"""The Redis broker with a real redis-server: offsets across nodes, recovery, faults."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from ..conftest import RedisServer, start_redis
from ..peers import RawWebSocket, http_publish, http_request
from .helpers import next_pub, subscribe_reply

pytestmark = pytest.mark.system

LIMIT = 30


async def two_nodes(start_server: Any, redis: RedisServer, **config: Any) -> tuple[Any, Any]:
    a = await start_server(broker=redis.url, **config)
    b = await start_server(broker=redis.url, **config)
    return a, b


async def test_offsets_are_shared_across_nodes(start_server: Any, redis: RedisServer) -> None:
    a, b = await two_nodes(start_server, redis)
    with trio.fail_after(LIMIT):
        on_a, on_b = await RawWebSocket.connect(a.port), await RawWebSocket.connect(b.port)
        async with on_a.stream, on_b.stream:
            reply_a, reply_b = await subscribe_reply(on_a, "news"), await subscribe_reply(on_b, "news")
            assert reply_a["epoch"] == reply_b["epoch"] != "" and reply_a["offset"] == 0
            for i in range(5):  # alternate the node that takes the publish
                node = a if i % 2 == 0 else b
                resp = await http_publish(node.port, "news", {"i": i})
                assert resp.status == 200 and resp.json()["offset"] == i + 1
            for ws in (on_a, on_b):
                pubs = [await next_pub(ws) for _ in range(5)]
                assert [p["offset"] for p in pubs] == [1, 2, 3, 4, 5]
                assert [p["data"]["i"] for p in pubs] == [0, 1, 2, 3, 4]


async def test_a_client_moves_to_another_node_and_recovers_exactly(
    start_server: Any, redis: RedisServer
) -> None:
    a, b = await two_nodes(start_server, redis)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(a.port)
        first = await subscribe_reply(ws, "t")
        for i in range(3):
            await http_publish(a.port, "t", i)
        seen = [(await next_pub(ws))["offset"] for _ in range(3)]
        await ws.aclose()
        for i in range(3, 10):  # published while the client is away, on node b
            await http_publish(b.port, "t", i)
        ws = await RawWebSocket.connect(b.port)  # reconnects to the other node
        async with ws.stream:
            reply = await subscribe_reply(ws, "t", {"epoch": first["epoch"], "offset": seen[-1]})
            assert reply["recovered"] is True
            assert [p["offset"] for p in reply["publications"]] == [4, 5, 6, 7, 8, 9, 10]
            await http_publish(a.port, "t", "live")
            live = await next_pub(ws)
            assert (live["offset"], live["data"]) == (11, "live")


async def test_history_from_a_node_with_no_subscribers_has_the_real_epoch_and_offset(
    start_server: Any, redis: RedisServer
) -> None:
    # Node b never joined the topic, so only Redis knows its epoch and head.
    a, b = await two_nodes(start_server, redis)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(a.port)
        async with ws.stream:
            first = await subscribe_reply(ws, "h")
            for i in range(3):
                await http_publish(a.port, "h", i)
            assert [(await next_pub(ws))["offset"] for _ in range(3)] == [1, 2, 3]
            for node in (a, b):
                page = (await http_request(node.port, "GET", "/api/history?topic=h&since=1")).json()
                assert (page["epoch"], page["offset"], page["complete"]) == (first["epoch"], 3, True), page
                assert [p["offset"] for p in page["publications"]] == [2, 3]
            assert "h" not in b.server.hub.topics()
            # A topic nobody has published to yet: offset 0, and an epoch to recover from.
            fresh = (await http_request(b.port, "GET", "/api/history?topic=never")).json()
            assert fresh["offset"] == 0 and fresh["epoch"] != "" and fresh["publications"] == []


async def test_a_node_that_misses_publications_catches_up_from_history(
    start_server: Any, redis: RedisServer
) -> None:
    a, b = await two_nodes(start_server, redis)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(b.port)
        async with ws.stream:
            await subscribe_reply(ws, "t")
            await http_publish(a.port, "t", 0)
            assert (await next_pub(ws))["offset"] == 1
            # Cut node b's pub/sub connection; node a keeps publishing meanwhile.
            killer = await trio.open_tcp_stream("127.0.0.1", redis.port)
            await killer.send_all(b"CLIENT KILL TYPE pubsub\r\n")
            await killer.receive_some(100)
            await killer.aclose()
            for i in range(1, 6):
                await http_publish(a.port, "t", i)
            offsets = [(await next_pub(ws))["offset"] for _ in range(5)]
    # Whether a message arrived before the cut or was fetched from history
    # after it, node b delivers every offset once, in order.
    assert offsets == [2, 3, 4, 5, 6]


async def test_redis_down_then_back(start_server: Any, redis: RedisServer) -> None:
    a = await start_server(broker=redis.url)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(a.port)
        async with ws.stream:
            first = await subscribe_reply(ws, "t")
            await http_publish(a.port, "t", "before")
            assert (await next_pub(ws))["offset"] == 1
            redis.process.kill()
            await redis.process.wait()
            # Local connections stay up; publishing fails with a clear error.
            resp = await http_publish(a.port, "t", "during")
            assert resp.status == 503 and resp.json()["error"]["code"] == "unavailable"
            await ws.send_json({"op": "ping", "id": "p"})
            assert (await ws.recv_json())["id"] == "p"
            # Redis comes back without its data: the history is gone, so the
            # topic has a new epoch, and the subscriber is told to recover.
            redis.process = (await start_redis(redis.port)).process
            while True:
                resp = await http_publish(a.port, "t", "after")
                if resp.status == 200:
                    break
                await trio.sleep(0.05)
            frame = await ws.recv_frame()
            while frame.opcode != 0x8:
                frame = await ws.recv_frame()
            assert frame.close_code == 1013
        ws = await RawWebSocket.connect(a.port)
        async with ws.stream:
            reply = await subscribe_reply(ws, "t", {"epoch": first["epoch"], "offset": 1})
            assert reply["recovered"] is False and reply["epoch"] != first["epoch"]


async def redis_command(redis: RedisServer, command: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", redis.port)
    async with stream:
        await stream.send_all(command + b"\r\n")
        return bytes(await stream.receive_some(4096))


async def test_a_node_listens_only_to_topics_it_has_subscribers_for(
    start_server: Any, redis: RedisServer
) -> None:
    a = await start_server(broker=redis.url)
    with trio.fail_after(LIMIT):
        assert b"ts:pub:room" not in await redis_command(redis, b"PUBSUB CHANNELS ts:pub:*")
        ws = await RawWebSocket.connect(a.port)
        async with ws.stream:
            await subscribe_reply(ws, "room")
            assert b"ts:pub:room" in await redis_command(redis, b"PUBSUB CHANNELS ts:pub:*")
            await ws.send_json({"op": "unsubscribe", "topic": "room", "id": "u"})
            assert (await ws.recv_json())["id"] == "u"
            while b"ts:pub:room" in await redis_command(redis, b"PUBSUB CHANNELS ts:pub:*"):
                await trio.sleep(0.01)


async def test_client_publish_while_redis_is_down_is_unavailable(
    start_server: Any, redis: RedisServer
) -> None:
    a = await start_server(broker=redis.url, client_publish=True)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(a.port)
        async with ws.stream:
            await subscribe_reply(ws, "t")
            redis.process.kill()
            await redis.process.wait()
            await ws.send_json({"op": "publish", "topic": "t", "data": 1, "id": "p"})
            reply = await ws.recv_json()
            assert reply["id"] == "p" and reply["error"]["code"] == "unavailable"
            assert "redis" in reply["error"]["message"]
