"""The library API as the README shows it: handlers, routes, publishing from a task."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio_websocket

from trioserve import Command, Connection, ErrorCode, ProtocolError, Reject, Request, Response

from ..peers import http_request


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


async def test_custom_op_on_both_transports(start_server: Any) -> None:
    rs = await start_server()

    async def shout(conn: Connection, cmd: Command) -> dict[str, Any]:
        text = cmd.fields.get("text")
        if not isinstance(text, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'text' must be a string", cmd.id)
        conn.data["shouts"] = conn.data.get("shouts", 0) + 1
        return {"text": text.upper(), "count": conn.data["shouts"]}

    rs.server.add_op("shout", shout)
    with pytest.raises(ValueError):
        rs.server.add_op("subscribe", shout)
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(rs.ws_url) as ws:
            await ws.send_message(json.dumps({"op": "shout", "text": "hi", "id": 1}))
            assert json.loads(await ws.get_message()) == {"id": 1, "ok": True, "text": "HI", "count": 1}
            await ws.send_message(json.dumps({"op": "shout", "id": 2}))
            reply = json.loads(await ws.get_message())
            assert reply["id"] == 2 and reply["error"]["code"] == "bad_request"
        stream = await trio.open_tcp_stream("127.0.0.1", rs.tcp_port)
        async with stream:
            await stream.send_all(b'{"op":"shout","text":"tcp"}\n')
            assert json.loads(await stream.receive_some(1000)) == {"ok": True, "text": "TCP", "count": 1}


async def test_hooks_and_a_second_websocket_path(start_server: Any) -> None:
    events: list[str] = []

    async def on_connect(conn: Connection) -> None:
        events.append(f"connect {conn.transport_name}")
        if conn.data.get("banned") or conn.remote is None:
            raise Reject(4003, "banned")

    def on_disconnect(conn: Connection) -> None:
        events.append("disconnect")

    def on_subscribe(conn: Connection, topic: str) -> None:
        if topic.startswith("private."):
            raise ProtocolError(ErrorCode.FORBIDDEN, "no private topics")

    rs = await start_server(server_kwargs={
        "on_connect": on_connect, "on_disconnect": on_disconnect, "on_subscribe": on_subscribe})
    rs.server.add_websocket("/echo", echo)
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(rs.ws_url) as ws:
            await ws.send_message(json.dumps({"op": "subscribe", "topic": "private.x", "id": 1}))
            reply = json.loads(await ws.get_message())
            assert reply == {"id": 1, "ok": False,
                             "error": {"code": "forbidden", "message": "no private topics"}}
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{rs.port}/echo") as ws:
            await ws.send_message("back")
            assert await ws.get_message() == "back"
    with trio.fail_after(10):
        while events.count("disconnect") < 2:
            await trio.sleep(0.01)
    assert events == ["connect websocket", "disconnect", "connect websocket", "disconnect"]


async def test_on_connect_can_reject(start_server: Any) -> None:
    async def on_connect(conn: Connection) -> None:
        raise Reject(4003, "no entry today")

    rs = await start_server(server_kwargs={"on_connect": on_connect})
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(rs.ws_url) as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await ws.get_message()
    assert (info.value.reason.code, info.value.reason.reason) == (4003, "no entry today")
