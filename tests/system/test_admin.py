"""The status page's data: ``GET /admin`` and the ``/admin/ws`` stream, with one
process and with ``serve --workers 2`` (every frame covers every worker).
The page itself in Chromium: tests/system/test_admin_browser.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from ..conftest import RedisServer
from ..peers import RawWebSocket, http_request
from ..serverproc import STARTUP_TIMEOUT
from .test_embedded_presence import client_on
from .test_workers import close_all, run_workers

pytestmark = pytest.mark.system

KEY = "admin-key-0123456789"
LIMIT = 20


async def admin(port: int, key: str = KEY) -> RawWebSocket:
    ws = await RawWebSocket.connect(port, "/admin/ws")
    await ws.send_json({"op": "auth", "key": key})
    return ws


async def frame_where(ws: RawWebSocket, predicate: Any) -> dict[str, Any]:
    """The first stats frame *predicate* holds of (the caller bounds the wait)."""
    while True:
        msg = await ws.recv_json()
        if msg["op"] == "stats" and predicate(msg):
            return msg  # type: ignore[no-any-return]


async def test_the_page_is_served(start_server: Any) -> None:
    rs = await start_server(api_key=KEY)
    resp = await http_request(rs.port, "GET", "/admin")
    assert resp.status == 200 and resp.headers["content-type"] == "text/html; charset=utf-8"
    assert b'data-testid="connections"' in resp.body


@pytest.mark.parametrize("first", [{"op": "auth", "key": "wrong"}, {"op": "auth"}, {"key": KEY}, "nonsense"])
async def test_a_wrong_or_missing_key_closes_the_stream(start_server: Any, first: Any) -> None:
    rs = await start_server(api_key=KEY)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port, "/admin/ws")
        if isinstance(first, str):
            await ws.send_text(first)
        else:
            await ws.send_json(first)
        closed = await ws.wait_closed()
        assert (closed.code, closed.reason) == (4001, "unauthorized: wrong or missing API key")
        assert rs.server.statistics().auth_failures == 1


async def test_the_stream_needs_no_token_where_clients_do(start_server: Any) -> None:
    rs = await start_server(api_key=KEY, token_secret="test-secret-0123456789-0123456789-abcdef")
    with trio.fail_after(LIMIT):
        ws = await admin(rs.port)
        assert await ws.recv_json() == {"op": "auth", "ok": True}
        assert (await frame_where(ws, lambda f: True))["connections"]["total"] == 1


async def test_the_stream_skips_the_connect_proxy(start_server: Any) -> None:
    # Port 9 (discard) on loopback: nothing listens, so any proxied upgrade would get 503.
    rs = await start_server(api_key=KEY, proxy_connect_url="http://127.0.0.1:9/connect")
    with trio.fail_after(LIMIT):
        assert (await http_request(rs.port, "GET", "/ws", headers=[
            ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")])).status == 503
        ws = await admin(rs.port)
        assert await ws.recv_json() == {"op": "auth", "ok": True}


async def test_the_stream_follows_connections_topics_and_disconnects(start_server: Any) -> None:
    rs = await start_server(api_key=KEY)
    with trio.fail_after(LIMIT):
        ws = await admin(rs.port)
        assert await ws.recv_json() == {"op": "auth", "ok": True}
        first = await frame_where(ws, lambda f: True)
        assert first["connections"] == {"websocket": 1, "tcp": 0, "total": 1}  # the stream itself
        (node,) = first["nodes"]
        assert node["node"] == "local" and node["state"] == "ready"
        clients = [await RawWebSocket.connect(rs.port) for _ in range(3)]
        for i, c in enumerate(clients):
            await c.send_json({"op": "subscribe", "topic": "busy" if i else "quiet", "id": 1})
            assert (await c.recv_json())["ok"] is True
        frame = await frame_where(ws, lambda f: f["connections"]["total"] == 4)
        assert [(t["topic"], t["subscribers"]) for t in frame["top_subscribers"]] == [("busy", 2),
                                                                                       ("quiet", 1)]
        for n in range(5):
            assert (await http_request(rs.port, "POST", "/api/publish",
                                       b'{"topic":"busy","data":%d}' % n,
                                       [("Authorization", f"Bearer {KEY}")])).status == 200
        frame = await frame_where(ws, lambda f: f["top_rate"])
        assert frame["top_rate"][0]["topic"] == "busy" and frame["publications_per_s"] > 0
        assert frame["deliveries_per_s"] > 0 and frame["latency"]["samples"] == 5
        assert frame["latency"]["p50"] is not None
        await clients[0].send_close(4321, "gone fishing")
        await clients[0].wait_closed()
        frame = await frame_where(ws, lambda f: f["connections"]["total"] == 3)
        assert any(d["code"] == 4321 and d["reason"] == "gone fishing" for d in frame["disconnects"]), frame
        await close_all(clients[1:])
        await frame_where(ws, lambda f: f["connections"]["total"] == 1)


async def test_the_stream_covers_every_worker(tmp_path: Path) -> None:
    config = tmp_path / "admin.toml"
    config.write_text(f'api_key = "{KEY}"\n')
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--config", str(config)) as sp:
            on_1, on_2 = await client_on(sp.port, "1"), await client_on(sp.port, "2")
            ws = await admin(sp.port)
            frame = await frame_where(ws, lambda f: f["connections"]["total"] == 3)
            assert [(n["worker"], n["state"]) for n in frame["nodes"]] == [(1, "ready"), (2, "ready")]
            assert sorted(n["connections"] for n in frame["nodes"]) == [1, 2]  # the stream is on one
            assert frame["missing"] == 0
            await close_all([on_1, on_2])
            await frame_where(ws, lambda f: f["connections"]["total"] == 1)
            assert (await (await admin(sp.port, "wrong")).wait_closed()).code == 4001


async def test_the_stream_covers_every_node_on_redis(start_server: Any, redis: RedisServer) -> None:
    a = await start_server(broker=redis.url, api_key=KEY)
    b = await start_server(broker=redis.url, api_key=KEY)
    with trio.fail_after(LIMIT):
        clients = [await RawWebSocket.connect(b.port) for _ in range(2)]
        ws = await admin(a.port)
        frame = await frame_where(ws, lambda f: f["connections"]["total"] == 3)
        assert sorted(n["node"] for n in frame["nodes"]) == sorted(
            [a.server.hub.broker.node, b.server.hub.broker.node])
        await close_all(clients)
        await frame_where(ws, lambda f: f["connections"]["total"] == 1)
