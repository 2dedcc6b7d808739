"""Interop with the websockets library (asyncio and sync clients), run in a worker thread.

The server runs on the test's Trio loop; the client runs on its own loop (or
blocking) in a thread, so the two never share a scheduler.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any

import pytest
import trio
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect as sync_connect

from ..peers import HOST, dumps

pytestmark = pytest.mark.system

# Each client-side wait is bounded so the worker thread ends even if the server hangs;
# the Trio side has its own, longer bound around the thread.
CLIENT_TIMEOUT = 10.0


def _http_publish_blocking(port: int, topic: str, data: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("POST", "/api/publish", body=dumps({"topic": topic, "data": data}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


async def _asyncio_flow(url: str, port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with asyncio.timeout(CLIENT_TIMEOUT):
        async with async_connect(url) as sub:
            await sub.send(dumps({"op": "subscribe", "topic": "t", "id": 1}))
            out["ack"] = json.loads(await sub.recv())

            out["http"] = await asyncio.to_thread(_http_publish_blocking, port, "t", {"via": "http"})
            out["pub_http"] = json.loads(await sub.recv())

            async with async_connect(url) as publisher:
                await publisher.send(dumps({"op": "publish", "topic": "t", "data": {"via": "ws"}, "id": 2}))
                out["publish_reply"] = json.loads(await publisher.recv())
            out["pub_client"] = json.loads(await sub.recv())

            await sub.send(dumps({"op": "ping", "id": 3}))
            out["pong"] = json.loads(await sub.recv())
            # Protocol-level ping: the waiter resolves when the server's pong arrives.
            await (await sub.ping(b"hello"))

            await sub.close(code=1000, reason="bye")
            out["close_code"] = sub.close_code
            out["close_rcvd"] = (sub.protocol.close_rcvd.code, sub.protocol.close_rcvd.reason) \
                if sub.protocol.close_rcvd else None
    return out


async def test_asyncio_client_flow(start_server: Any) -> None:
    rs = await start_server(client_publish=True)
    with trio.fail_after(CLIENT_TIMEOUT + 5):
        out = await trio.to_thread.run_sync(asyncio.run, _asyncio_flow(rs.ws_url, rs.port),
                                            abandon_on_cancel=True)
    epoch = rs.server.hub.epoch_of("t")
    assert out["ack"] == {"id": 1, "ok": True, "topic": "t", "epoch": epoch, "offset": 0}
    assert out["http"] == (200, {"ok": True, "offset": 1, "subscribers": 1})
    assert out["pub_http"] == {"op": "pub", "topic": "t", "offset": 1, "data": {"via": "http"}}
    assert out["publish_reply"] == {"id": 2, "ok": True, "offset": 2, "subscribers": 1}
    assert out["pub_client"] == {"op": "pub", "topic": "t", "offset": 2, "data": {"via": "ws"}}
    assert out["pong"] == {"id": 3, "ok": True, "op": "pong"}
    assert out["close_code"] == 1000
    # The server echoes the client's close code (reason is its own choice).
    assert out["close_rcvd"] is not None and out["close_rcvd"][0] == 1000


def _sync_oversize(url: str, limit: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with sync_connect(url, open_timeout=CLIENT_TIMEOUT, close_timeout=CLIENT_TIMEOUT) as ws:
        ws.send(dumps({"op": "ping", "id": 1}))
        out["pong"] = json.loads(ws.recv(timeout=CLIENT_TIMEOUT))
        ws.send("x" * (limit + 1))
        try:
            out["unexpected"] = ws.recv(timeout=CLIENT_TIMEOUT)
        except ConnectionClosedError as exc:
            out["rcvd"] = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else None
    return out


async def test_sync_client_sees_1009_for_oversize_message(start_server: Any) -> None:
    rs = await start_server(max_message_size=1000)
    with trio.fail_after(CLIENT_TIMEOUT + 5):
        out = await trio.to_thread.run_sync(_sync_oversize, rs.ws_url, 1000, abandon_on_cancel=True)
    assert out["pong"] == {"id": 1, "ok": True, "op": "pong"}
    assert "unexpected" not in out, out
    assert out["rcvd"] == (1009, "message too big")
