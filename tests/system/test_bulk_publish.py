"""Bulk publishing with real peers: ``publish_batch`` over WebSocket and TCP,
``POST /api/publish`` with an array, ``POST /api/broadcast``, and
``hub.publish_many()``; with the memory broker and with a real redis-server.

One offset per publication, in order; a batch over the limit or with a bad
entry is refused whole, with a named error, and publishes nothing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from trioserve.protocol.messages import MAX_BATCH_PUBLICATIONS

from ..conftest import RedisServer
from ..peers import NdjsonClient, RawWebSocket, http_request
from .helpers import next_pub, subscribe_reply

pytestmark = pytest.mark.system

LIMIT = 20


async def post(port: int, path: str, body: Any) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await http_request(port, "POST", path, raw, [("Content-Type", "application/json")])
    return resp.status, resp.json()


async def pubs(ws: RawWebSocket, count: int) -> list[dict[str, Any]]:
    return [await next_pub(ws) for _ in range(count)]


async def test_publish_batch_over_websocket_one_offset_each_in_order(start_server: Any) -> None:
    node = await start_server(client_publish=True)
    with trio.fail_after(LIMIT):
        sub = await RawWebSocket.connect(node.port)
        for topic in ("a", "b"):
            await subscribe_reply(sub, topic)
        pub = await RawWebSocket.connect(node.port)
        batch = [{"topic": t, "data": {"n": n}} for n, t in enumerate(["a", "b", "a", "a", "b"])]
        reply = await pub.request({"op": "publish_batch", "id": 7, "publications": batch})
        assert reply["id"] == 7 and reply["ok"] is True
        assert [(r["ok"], r["offset"], r["subscribers"]) for r in reply["results"]] == [
            (True, 1, 1), (True, 1, 1), (True, 2, 1), (True, 3, 1), (True, 2, 1)]
        got = await pubs(sub, 5)
        # Per topic in offset order; the hub may send a round's topics in either order.
        for topic, offsets, ns in (("a", [1, 2, 3], [0, 2, 3]), ("b", [1, 2], [1, 4])):
            mine = [p for p in got if p["topic"] == topic]
            assert [p["offset"] for p in mine] == offsets
            assert [p["data"]["n"] for p in mine] == ns


async def test_publish_batch_over_tcp(start_server: Any) -> None:
    node = await start_server(client_publish=True)
    with trio.fail_after(LIMIT):
        client = await NdjsonClient.connect(node.tcp_port)
        reply = await client.request({"op": "publish_batch", "id": "x",
                                      "publications": [{"topic": "t", "data": i} for i in range(3)]})
        assert reply["ok"] is True
        assert [r["offset"] for r in reply["results"]] == [1, 2, 3]


async def test_a_bad_batch_is_refused_whole_with_a_named_error(start_server: Any) -> None:
    node = await start_server(client_publish=True)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(node.port)
        too_many = [{"topic": "t", "data": 1}] * (MAX_BATCH_PUBLICATIONS + 1)
        reply = await ws.request({"op": "publish_batch", "id": 1, "publications": too_many})
        assert reply["error"]["code"] == "batch_too_large"
        reply = await ws.request({"op": "publish_batch", "id": 2,
                                  "publications": [{"topic": "t", "data": 1}, {"topic": "bad topic!"}]})
        assert reply["error"]["code"] == "bad_request"
        assert "publications[1]" in reply["error"]["message"]
        reply = await ws.request({"op": "publish_batch", "id": 3, "publications": []})
        assert reply["error"]["code"] == "bad_request"
        # Nothing of the refused batches was published, and the connection carries on.
        reply = await ws.request({"op": "publish", "id": 4, "topic": "t", "data": 1})
        assert reply["offset"] == 1


async def test_publish_batch_needs_publish_rights(start_server: Any) -> None:
    node = await start_server()  # no --client-publish
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(node.port)
        reply = await ws.request({"op": "publish_batch", "id": 1,
                                  "publications": [{"topic": "t", "data": 1}]})
        assert reply["error"]["code"] == "forbidden"


async def test_http_publish_array_and_broadcast(start_server: Any) -> None:
    node = await start_server()
    with trio.fail_after(LIMIT):
        sub = await RawWebSocket.connect(node.port)
        for topic in ("r1", "r2", "r3"):
            await subscribe_reply(sub, topic)
        status, body = await post(node.port, "/api/publish",
                                  [{"topic": "r1", "data": "x"}, {"topic": "r1", "data": "y"}])
        assert status == 200
        assert [(r["ok"], r["offset"]) for r in body] == [(True, 1), (True, 2)]
        status, body = await post(node.port, "/api/broadcast", {"topics": ["r1", "r2", "r3"], "data": "z"})
        assert status == 200
        assert [(r["ok"], r["offset"], r["subscribers"]) for r in body] == [
            (True, 3, 1), (True, 1, 1), (True, 1, 1)]
        got = await pubs(sub, 5)
        assert sorted((p["topic"], p["offset"], p["data"]) for p in got) == [
            ("r1", 1, "x"), ("r1", 2, "y"), ("r1", 3, "z"), ("r2", 1, "z"), ("r3", 1, "z")]
        # A single publication keeps its object answer.
        status, body = await post(node.port, "/api/publish", {"topic": "r2", "data": 1})
        assert (status, body["offset"]) == (200, 2)


async def test_http_batch_limits(start_server: Any) -> None:
    node = await start_server(max_message_size=4096)
    with trio.fail_after(LIMIT):
        status, body = await post(node.port, "/api/publish",
                                  [{"topic": "t", "data": 0}] * (MAX_BATCH_PUBLICATIONS + 1))
        assert status == 413
        # The body limit answers first here: 1001 entries are over 4096 bytes.
        assert body["error"]["code"] == "too_large"
        node2 = await start_server()
        status, body = await post(node2.port, "/api/publish",
                                  [{"topic": "t", "data": 0}] * (MAX_BATCH_PUBLICATIONS + 1))
        assert (status, body["error"]["code"]) == (413, "batch_too_large")
        status, body = await post(node2.port, "/api/broadcast",
                                  {"topics": [f"t{i}" for i in range(MAX_BATCH_PUBLICATIONS + 1)],
                                   "data": 0})
        assert (status, body["error"]["code"]) == (413, "batch_too_large")
        status, body = await post(node2.port, "/api/broadcast", {"topics": ["a", "a"], "data": 0})
        assert (status, body["error"]["code"]) == (400, "bad_request")
        status, body = await post(node2.port, "/api/publish", [{"topic": "t"}])
        assert (status, body["error"]["code"]) == (400, "bad_request")
        # Nothing was published by the refused requests.
        status, body = await post(node2.port, "/api/publish", {"topic": "t", "data": 1})
        assert body["offset"] == 1


async def test_library_publish_many(start_server: Any) -> None:
    node = await start_server()
    hub = node.server.hub
    with trio.fail_after(LIMIT):
        sub = await RawWebSocket.connect(node.port)
        await subscribe_reply(sub, "lib")
        before = hub.statistics().batches
        results = await hub.publish_many([("lib", i) for i in range(50)])
        assert [r.offset for r in results] == list(range(1, 51))
        got = await pubs(sub, 50)
        assert [p["data"] for p in got] == list(range(50))
        # No checkpoint between them: one fan-out round carried all 50.
        assert hub.statistics().batches == before + 1


async def test_batches_with_the_redis_broker(start_server: Any, redis: RedisServer) -> None:
    a = await start_server(broker=redis.url, client_publish=True)
    b = await start_server(broker=redis.url)
    with trio.fail_after(LIMIT):
        sub = await RawWebSocket.connect(b.port)
        for topic in ("x", "y"):
            await subscribe_reply(sub, topic)
        ws = await RawWebSocket.connect(a.port)
        reply = await ws.request({"op": "publish_batch", "id": 1, "publications": [
            {"topic": "x", "data": 1}, {"topic": "y", "data": 2}, {"topic": "x", "data": 3}]})
        assert [r["offset"] for r in reply["results"]] == [1, 1, 2]
        status, body = await post(a.port, "/api/broadcast", {"topics": ["x", "y"], "data": 4})
        assert status == 200 and [r["offset"] for r in body] == [3, 2]
        results = await a.server.hub.publish_many([("y", 5)])
        assert results[0].offset == 3
        got = await pubs(sub, 6)
        assert sorted((p["topic"], p["offset"], p["data"]) for p in got) == [
            ("x", 1, 1), ("x", 2, 3), ("x", 3, 4), ("y", 1, 2), ("y", 2, 4), ("y", 3, 5)]
