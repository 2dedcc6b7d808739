"""The library API as the README shows it: handlers, routes, publishing from a task."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio_websocket

from trioserve import Connection, Request, Response

from .helpers import http_request


async def echo(conn: Connection) -> None:
    async for message in conn:
        await conn.send(message)


async def test_custom_ws_handler_echoes_text_and_binary(start_server: Any) -> None:
    rs = await start_server(server_kwargs={"ws_handler": echo})
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(rs.ws_url) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\xff")
            assert await ws.get_message() == b"\x00\xff"


async def test_custom_route_and_publish_from_a_task(start_server: Any) -> None:
    rs = await start_server()

    async def hello(req: Request) -> Response:
        return Response(200, json.dumps({"path": req.path, "q": req.query}).encode())

    rs.server.add_route("GET", "/hello", hello)

    async def ticker() -> None:
        for i in range(3):
            await rs.server.hub.publish("ticks", i)
            await trio.sleep(0)

    with trio.fail_after(10):
        resp = await http_request(rs.port, "GET", "/hello?x=1")
        assert resp.status == 200 and resp.json() == {"path": "/hello", "q": {"x": ["1"]}}
        async with trio_websocket.open_websocket_url(rs.ws_url) as ws:
            await ws.send_message(json.dumps({"op": "subscribe", "topic": "ticks"}))
            assert json.loads(await ws.get_message())["ok"] is True
            rs.nursery.start_soon(ticker)
            got = [json.loads(await ws.get_message())["data"] for _ in range(3)]
    assert got == [0, 1, 2]
