"""Interop with trio-websocket (wsproto-based client) over real sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from trioserve import ConnectionState

from ..peers import dumps, http_publish
from .helpers import wait_until

pytestmark = pytest.mark.system


async def _request(ws: WebSocketConnection, msg: dict[str, Any]) -> Any:
    await ws.send_message(dumps(msg))
    return json.loads(await ws.get_message())


async def test_subscribe_publish_ping_and_clean_close(start_server: Any) -> None:
    rs = await start_server(client_publish=True)
    with trio.fail_after(15):
        async with open_websocket_url(rs.ws_url) as sub, open_websocket_url(rs.ws_url) as pub:
            assert await _request(sub, {"op": "subscribe", "topic": "news", "id": 1}) == {
                "id": 1, "ok": True, "topic": "news", "epoch": rs.server.hub.epoch_of("t"), "offset": 0,
            }

            resp = await http_publish(rs.port, "news", {"headline": "from http"})
            assert resp.status == 200, resp
            assert resp.json() == {"ok": True, "offset": 1, "subscribers": 1}
            assert json.loads(await sub.get_message()) == {
                "op": "pub", "topic": "news", "offset": 1, "data": {"headline": "from http"},
            }

            reply = await _request(pub, {"op": "publish", "topic": "news", "data": [1, "two"], "id": "p"})
            assert reply == {"id": "p", "ok": True, "offset": 2, "subscribers": 1}
            assert json.loads(await sub.get_message()) == {
                "op": "pub", "topic": "news", "offset": 2, "data": [1, "two"],
            }

            # A late subscriber learns the current offset, so it can tell what it missed.
            assert await _request(pub, {"op": "subscribe", "topic": "news", "id": 2}) == {
                "id": 2, "ok": True, "topic": "news", "epoch": rs.server.hub.epoch_of("t"), "offset": 2,
            }

            assert await _request(sub, {"op": "ping", "id": 7}) == {"id": 7, "ok": True, "op": "pong"}
            # Protocol-level ping: trio-websocket returns once the matching pong arrives.
            await sub.ping(b"are-you-there")

            server_conns = set(rs.server.connections)
            assert len(server_conns) == 2
            await sub.aclose(code=1000, reason="bye")
            # The code the client records is the one in the server's echoed close frame.
            assert sub.closed is not None
            assert sub.closed.code == 1000

            await wait_until(lambda: len(rs.server.connections) == 1, what="server to drop the client")
            (gone,) = server_conns - set(rs.server.connections)
            assert gone.state is ConnectionState.CLOSED
            assert gone.close_code == 1000
            assert rs.server.hub.subscriber_count("news") == 1

            # The other connection is unaffected.
            assert await _request(pub, {"op": "ping", "id": 8}) == {"id": 8, "ok": True, "op": "pong"}


async def test_unsubscribe_stops_delivery(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        async with open_websocket_url(rs.ws_url) as ws:
            for topic in ("a", "b"):
                assert (await _request(ws, {"op": "subscribe", "topic": topic, "id": topic}))["ok"]
            assert await _request(ws, {"op": "unsubscribe", "topic": "a", "id": 3}) == {
                "id": 3, "ok": True, "topic": "a",
            }
            rs.server.hub.publish_nowait("a", "not for you")
            rs.server.hub.publish_nowait("b", "for you")
            # Had "a" been delivered it would arrive first: per-connection order is FIFO.
            assert json.loads(await ws.get_message()) == {"op": "pub", "topic": "b", "offset": 1,
                                                          "data": "for you"}


async def test_server_close_seen_by_client(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        async with open_websocket_url(rs.ws_url) as ws:
            await _request(ws, {"op": "ping", "id": 1})
            (conn,) = rs.server.connections
            conn.start_close(1000, "done here")
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason is not None
            assert (info.value.reason.code, info.value.reason.reason) == (1000, "done here")
        await wait_until(lambda: not rs.server.connections, what="server to drop the client")
        assert conn.state is ConnectionState.CLOSED
