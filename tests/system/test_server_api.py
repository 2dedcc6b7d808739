"""The server API (``/api/disconnect``, ``/api/unsubscribe``, ``/api/topics``, ``/api/info``)
end to end: one process with the memory broker, two nodes on a real Redis, and
``serve --workers 2`` with the embedded broker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from ..conftest import RedisServer
from ..peers import NdjsonClient, RawWebSocket, http_request
from ..serverproc import STARTUP_TIMEOUT
from .test_auth import closed_with
from .test_embedded_presence import client_on
from .test_embedded_presence import request as reply
from .test_workers import run_workers

pytestmark = pytest.mark.system

SECRET = "test-secret-0123456789-0123456789-abcdef"
KEY = "api-key-0123456789"
LIMIT = 20
CONFIG = {"token_secret": SECRET, "api_key": KEY}


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + 3600), "subscribe": ["*"]}, SECRET,
                      algorithm="HS256")


async def api(port: int, method: str, path: str, body: Any = None, key: str | None = KEY
              ) -> tuple[int, dict[str, Any]]:
    headers = [("Content-Type", "application/json")]
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await http_request(port, method, path, data, headers)
    return resp.status, resp.json()


async def user_ws(port: int, sub: str) -> RawWebSocket:
    return await RawWebSocket.connect(port, path="/ws?token=" + token(sub))


async def user_tcp(port: int, sub: str) -> NdjsonClient:
    client = await NdjsonClient.connect(port)
    assert (await client.request({"op": "connect", "token": token(sub), "id": 0}))["ok"] is True
    return client


async def ping(ws: RawWebSocket) -> list[dict[str, Any]]:
    """What arrives before the pong of a ping: everything sent before it."""
    await ws.send_json({"op": "ping", "id": "p"})
    before = []
    while (msg := await ws.recv_json()).get("id") != "p":
        before.append(msg)
    return before


# --- one process ------------------------------------------------------------------------------


async def test_disconnect_closes_every_connection_of_the_user_with_its_code(start_server: Any) -> None:
    rs = await start_server(**CONFIG)
    with trio.fail_after(LIMIT):
        a1, a2, bob = await user_ws(rs.port, "alice"), await user_ws(rs.port, "alice"), await user_ws(
            rs.port, "bob")
        tcp = await user_tcp(rs.tcp_port, "alice")
        status, body = await api(rs.port, "POST", "/api/disconnect",
                                 {"user": "alice", "code": 4010, "reason": "banned"})
        assert status == 200, body
        assert body == {"ok": True, "user": "alice", "disconnected": 3, "nodes": 1, "missing": 0}
        assert await closed_with(a1) == (4010, "banned")
        assert await closed_with(a2) == (4010, "banned")
        line = await tcp.recv()
        assert line["op"] == "close" and line["code"] == 4010 and line["reason"] == "banned", line
        assert await ping(bob) == []  # the others carry on
        # Closing already: not counted again.
        status, body = await api(rs.port, "POST", "/api/disconnect", {"user": "alice", "code": 4000})
        assert body["disconnected"] == 0


async def test_unsubscribe_removes_the_user_and_tells_the_client(start_server: Any) -> None:
    hooked: list[tuple[str, str]] = []
    rs = await start_server({"on_unsubscribe": lambda conn, topic: hooked.append((conn.claims.sub, topic))},
                            **CONFIG)
    with trio.fail_after(LIMIT):
        alice, bob = await user_ws(rs.port, "alice"), await user_ws(rs.port, "bob")
        for ws in (alice, bob):
            await reply(ws, {"op": "subscribe", "topic": "room", "id": 1})
            await reply(ws, {"op": "subscribe", "topic": "other", "id": 2})
        status, body = await api(rs.port, "POST", "/api/unsubscribe", {"user": "alice", "topic": "room"})
        assert status == 200 and body["unsubscribed"] == 1, body
        assert await alice.recv_json() == {"op": "unsubscribed", "topic": "room", "reason": "server"}
        assert hooked == [("alice", "room")]  # the library's hook (and the webhook) hear of it too
        assert (await api(rs.port, "POST", "/api/publish", {"topic": "room", "data": 1}))[0] == 200
        assert (await api(rs.port, "POST", "/api/publish", {"topic": "other", "data": 2}))[0] == 200
        assert [(await bob.recv_json())["data"] for _ in range(2)] == [1, 2]
        # The hub fans out in publishing order: had alice still been in room, its
        # publication would come before other's.
        assert await alice.recv_json() == {"op": "pub", "topic": "other", "offset": 1, "data": 2}
        # Not subscribed any more: nothing to do, and nothing sent.
        status, body = await api(rs.port, "POST", "/api/unsubscribe", {"user": "alice", "topic": "room"})
        assert body["unsubscribed"] == 0
        assert await ping(alice) == []


async def test_topics_and_info_of_one_node(start_server: Any) -> None:
    rs = await start_server(**CONFIG)
    with trio.fail_after(LIMIT):
        clients = [await user_ws(rs.port, f"u{i}") for i in range(3)]
        for i, ws in enumerate(clients):
            await reply(ws, {"op": "subscribe", "topic": "big", "id": 1})
            if i == 0:
                await reply(ws, {"op": "subscribe", "topic": "small", "id": 2})
        await api(rs.port, "POST", "/api/publish", {"topic": "small", "data": 1})
        for scope in ("", "?scope=node", "?scope=cluster"):
            status, body = await api(rs.port, "GET", "/api/topics" + scope)
            assert status == 200, body
            assert body["topics"][0] == {"topic": "big", "subscribers": 3, "offset": 0}
            assert body["topics"][1]["topic"] == "small" and body["topics"][1]["subscribers"] == 1
        status, body = await api(rs.port, "GET", "/api/info")
        assert status == 200, body
        (node,) = body["nodes"]
        assert node["node"] == "local" and node["state"] == "ready" and node["topics"] == 2
        assert node["connections"] == {"websocket": 3, "tcp": 0} and node["users"] == 3
        assert node["version"] and node["uptime"] >= 0


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/api/disconnect", {"code": 4000}, "user: missing"),
    ("/api/disconnect", {"user": "", "code": 4000}, "user: must be"),
    ("/api/disconnect", {"user": 7}, "user: must be"),
    ("/api/disconnect", {"user": "a", "code": 1000}, "code: must be an integer from 4000 to 4999"),
    ("/api/disconnect", {"user": "a", "code": 5000}, "code: must be"),
    ("/api/disconnect", {"user": "a", "code": "4000"}, "code: must be"),
    ("/api/disconnect", {"user": "a", "code": True}, "code: must be"),
    ("/api/disconnect", {"user": "a", "reason": 3}, "reason: must be a string"),
    ("/api/disconnect", {"user": "a", "reason": "x" * 124}, "reason: at most 123 bytes"),
    ("/api/disconnect", b"{not json", "invalid JSON"),
    ("/api/disconnect", [1], "body must be a JSON object"),
    ("/api/unsubscribe", {"user": "a"}, "topic: missing"),
    ("/api/unsubscribe", {"user": "a", "topic": ""}, "topic:"),
    ("/api/unsubscribe", {"topic": "room"}, "user: missing"),
    ("/api/topics?scope=galaxy", None, "scope: must be node"),
])
async def test_bad_requests_get_a_named_error(start_server: Any, path: str, body: Any, message: str) -> None:
    rs = await start_server(**CONFIG)
    with trio.fail_after(LIMIT):
        ws = await user_ws(rs.port, "a")
        method = "GET" if path.startswith("/api/topics") else "POST"
        status, answer = await api(rs.port, method, path, body)
        assert status == 400, answer
        assert answer["ok"] is False and answer["error"]["code"] == "bad_request"
        assert message in answer["error"]["message"], answer
        assert await ping(ws) == []  # nothing happened to anyone


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/disconnect"), ("POST", "/api/unsubscribe"),
                                              ("GET", "/api/topics"), ("GET", "/api/info")])
@pytest.mark.parametrize("key", [None, "wrong"])
async def test_a_missing_or_wrong_api_key_is_refused(start_server: Any, method: str, path: str,
                                                     key: str | None) -> None:
    rs = await start_server(**CONFIG)
    with trio.fail_after(LIMIT):
        alice = await user_ws(rs.port, "alice")
        await reply(alice, {"op": "subscribe", "topic": "room", "id": 1})
        status, body = await api(rs.port, method, path, {"user": "alice", "topic": "room", "code": 4000},
                                 key=key)
        assert status == 401 and body["error"]["code"] == "unauthorized", body
        assert await ping(alice) == []  # still connected and subscribed
        assert rs.server.hub.subscriber_count("room") == 1


# --- two nodes on Redis -----------------------------------------------------------------------


async def test_the_api_spans_two_nodes_on_redis(start_server: Any, redis: RedisServer) -> None:
    a = await start_server(broker=redis.url, **CONFIG)
    b = await start_server(broker=redis.url, **CONFIG)
    with trio.fail_after(LIMIT):
        on_a, on_b, bob = await user_ws(a.port, "alice"), await user_ws(b.port, "alice"), await user_ws(
            b.port, "bob")
        for ws in (on_a, on_b, bob):
            await reply(ws, {"op": "subscribe", "topic": "room", "id": 1})
        await reply(on_b, {"op": "subscribe", "topic": "only-b", "id": 2})
        status, body = await api(a.port, "GET", "/api/topics?scope=cluster")
        assert status == 200 and body["nodes"] == 2 and body["missing"] == 0, body
        assert {t["topic"]: t["subscribers"] for t in body["topics"]} == {"room": 3, "only-b": 1}
        status, body = await api(a.port, "GET", "/api/topics")
        assert {t["topic"]: t["subscribers"] for t in body["topics"]} == {"room": 1}
        status, body = await api(b.port, "GET", "/api/info")
        assert sorted(n["node"] for n in body["nodes"]) == sorted(
            [a.server.hub.broker.node, b.server.hub.broker.node])
        assert sorted(n["connections"]["websocket"] for n in body["nodes"]) == [1, 2]

        status, body = await api(b.port, "POST", "/api/unsubscribe", {"user": "alice", "topic": "room"})
        assert status == 200 and body["unsubscribed"] == 2 and body["nodes"] == 2, body
        for ws in (on_a, on_b):
            assert await ws.recv_json() == {"op": "unsubscribed", "topic": "room", "reason": "server"}
        assert await ping(bob) == []

        status, body = await api(a.port, "POST", "/api/disconnect",
                                 {"user": "alice", "code": 4011, "reason": "bye"})
        assert status == 200 and body["disconnected"] == 2, body
        assert await closed_with(on_a) == (4011, "bye")
        assert await closed_with(on_b) == (4011, "bye")
        assert await ping(bob) == []


# --- serve --workers 2 (the embedded broker) --------------------------------------------------


async def test_the_api_spans_the_workers(tmp_path: Path) -> None:
    config = tmp_path / "api.toml"
    config.write_text(f'api_key = "{KEY}"\ntoken_secret = "{SECRET}"\n')
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--config", str(config)) as sp:
            # Anonymous connections are refused here; client_on needs a way in.
            on_1 = await _user_on(sp.port, "1")
            on_2 = await _user_on(sp.port, "2")
            for ws in (on_1, on_2):
                await reply(ws, {"op": "subscribe", "topic": "room", "id": 1})
            status, body = await api(sp.port, "GET", "/api/info")
            assert status == 200, body
            assert [(n["worker"], n["state"], n["topics"]) for n in body["nodes"]] == [
                (1, "ready", 1), (2, "ready", 1)]
            status, body = await api(sp.port, "GET", "/api/topics?scope=cluster")
            assert body["topics"] == [{"topic": "room", "subscribers": 2, "offset": 0}], body
            status, body = await api(sp.port, "POST", "/api/unsubscribe", {"user": "alice", "topic": "room"})
            assert body["unsubscribed"] == 2, body
            for ws in (on_1, on_2):
                assert (await ws.recv_json())["op"] == "unsubscribed"
            status, body = await api(sp.port, "POST", "/api/disconnect",
                                     {"user": "alice", "code": 4010, "reason": "moved"})
            assert status == 200 and body["disconnected"] == 2 and body["nodes"] == 2, body
            assert await closed_with(on_1) == (4010, "moved")
            assert await closed_with(on_2) == (4010, "moved")


async def _user_on(port: int, worker: str) -> RawWebSocket:
    """An ``alice`` connection on *worker* (the kernel picks; others are closed again)."""
    return await client_on(port, worker, path="/ws?token=" + token("alice"))


async def test_the_python_client_ends_a_subscription_the_server_removed(start_server: Any) -> None:
    from trioserve.client import ServerError, connect

    rs = await start_server(**CONFIG)
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url, token=token("alice")) as alice:
            async with alice.subscribe("room") as sub:
                status, body = await api(rs.port, "POST", "/api/unsubscribe",
                                         {"user": "alice", "topic": "room"})
                assert status == 200 and body["unsubscribed"] == 1, body
                with pytest.raises(ServerError) as caught:
                    async for _ in sub:
                        pass
                assert caught.value.code == "unsubscribed"
