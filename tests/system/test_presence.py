"""Presence lists, and join/leave events on topics configured for them."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from ..peers import RawWebSocket

pytestmark = pytest.mark.system

LIMIT = 20


async def request(ws: RawWebSocket, cmd: dict[str, Any]) -> dict[str, Any]:
    await ws.send_json(cmd)
    while True:
        msg = await ws.recv_json()
        if msg.get("id") == cmd["id"]:
            return msg  # type: ignore[no-any-return]


async def test_presence_lists_subscribers(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(LIMIT):
        a, b = await RawWebSocket.connect(rs.port), await RawWebSocket.connect(rs.port)
        async with a.stream, b.stream:
            await request(a, {"op": "subscribe", "topic": "room", "id": 1})
            await request(b, {"op": "subscribe", "topic": "room", "id": 1})
            reply = await request(a, {"op": "presence", "topic": "room", "id": 2})
            clients = reply["clients"]
            assert len(clients) == 2 and {c["transport"] for c in clients} == {"websocket"}
            assert len({c["conn"] for c in clients}) == 2
            empty = await request(a, {"op": "presence", "topic": "nobody-here", "id": 3})
            assert empty["clients"] == []


async def test_join_and_leave_events(start_server: Any) -> None:
    rs = await start_server(presence_events=("room.*",))
    with trio.fail_after(LIMIT):
        a = await RawWebSocket.connect(rs.port)
        async with a.stream:
            await request(a, {"op": "subscribe", "topic": "room.1", "id": 1})
            await request(a, {"op": "subscribe", "topic": "quiet", "id": 2})
            b = await RawWebSocket.connect(rs.port)
            await request(b, {"op": "subscribe", "topic": "room.1", "id": 1})
            join = await a.recv_json()
            assert join["op"] == "join" and join["topic"] == "room.1"
            assert join["client"]["client"] == "anonymous"
            await request(b, {"op": "subscribe", "topic": "quiet", "id": 2})  # no events here
            await request(b, {"op": "unsubscribe", "topic": "room.1", "id": 3})
            leave = await a.recv_json()
            assert leave["op"] == "leave" and leave["client"] == join["client"]
            await request(b, {"op": "subscribe", "topic": "room.1", "id": 4})
            assert (await a.recv_json())["op"] == "join"
            await b.aclose()  # disconnecting leaves every topic
            leave = await a.recv_json()
            assert leave["op"] == "leave" and leave["topic"] == "room.1"
            reply = await request(a, {"op": "presence", "topic": "room.1", "id": 5})
            assert len(reply["clients"]) == 1
