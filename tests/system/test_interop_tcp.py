"""Raw TCP NDJSON clients over real sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from ..peers import NdjsonClient, http_publish
from .helpers import wait_until

pytestmark = pytest.mark.system


async def _expect_close_then_eof(client: NdjsonClient, code: int, reason: str) -> None:
    line = await client.recv_line()
    assert line is not None, "EOF without a close line"
    assert json.loads(line) == {"op": "close", "code": code, "reason": reason}
    assert await client.recv_line() is None, "data after the close line"


async def test_subscribe_publish_and_heartbeat(start_server: Any) -> None:
    rs = await start_server(client_publish=True)
    with trio.fail_after(15):
        sub = await NdjsonClient.connect(rs.tcp_port)
        pub = await NdjsonClient.connect(rs.tcp_port)
        async with sub.stream, pub.stream:
            await sub.send({"op": "subscribe", "topic": "ticks", "id": 1})
            assert await sub.recv() == {"id": 1, "ok": True, "topic": "ticks",
                "epoch": rs.server.hub.epoch_of("t"), "offset": 0}

            resp = await http_publish(rs.port, "ticks", {"n": 1})
            assert resp.json() == {"ok": True, "offset": 1, "subscribers": 1}
            assert await sub.recv() == {"op": "pub", "topic": "ticks", "offset": 1, "data": {"n": 1}}

            await pub.send({"op": "publish", "topic": "ticks", "data": {"n": 2}, "id": 9})
            assert await pub.recv() == {"id": 9, "ok": True, "offset": 2, "subscribers": 1}
            assert await sub.recv() == {"op": "pub", "topic": "ticks", "offset": 2, "data": {"n": 2}}

            # A ping line is answered by the connection itself, in the same shape
            # as the push protocol's reply to a ping on WebSocket.
            await sub.send_raw(b'{"op":"ping"}\n')
            assert await sub.recv_line() == b'{"ok":true,"op":"pong"}'
            await sub.send_raw(b'{"op":"ping","id":42}\r\n')
            assert json.loads(await sub.recv_line() or b"null") == {"id": 42, "ok": True, "op": "pong"}

            # Several commands in one segment are each answered, in order.
            await sub.send_raw(b'{"op":"ping","id":"a","x":1}\n\n{"op":"nope","id":"b"}\n')
            assert await sub.recv() == {"id": "a", "ok": True, "op": "pong"}
            reply = await sub.recv()
            assert reply["id"] == "b" and reply["ok"] is False
            assert reply["error"]["code"] == "unknown_op"

            # A line split across segments is reassembled.
            await sub.send_raw(b'{"op":"subscribe",')
            await sub.send_raw(b'"topic":"other","id":5}\n')
            assert await sub.recv() == {"id": 5, "ok": True, "topic": "other",
                "epoch": rs.server.hub.epoch_of("t"), "offset": 0}


async def test_invalid_json_line_gets_error_and_connection_stays(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            await client.send_raw(b"this is not json\n")
            reply = await client.recv()
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
            await client.send({"op": "ping", "id": 2, "pad": 0})
            assert await client.recv() == {"id": 2, "ok": True, "op": "pong"}


async def test_line_over_max_message_size_closes_1009(start_server: Any) -> None:
    rs = await start_server(max_message_size=1024)
    with trio.fail_after(15):
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            await client.send({"op": "ping", "id": 1, "pad": 0})
            assert await client.recv() == {"id": 1, "ok": True, "op": "pong"}
            line = b'{"op":"ping","pad":"' + b"x" * 1024 + b'"}\n'
            await client.send_raw(line)
            await _expect_close_then_eof(client, 1009, "line too long")
        await wait_until(lambda: not rs.server.connections, what="server to drop the client")


async def test_unterminated_line_over_limit_closes_1009(start_server: Any) -> None:
    # A peer that never sends a newline must not make the server buffer without bound.
    rs = await start_server(max_message_size=1024)
    with trio.fail_after(15):
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            await client.send_raw(b"y" * 1025)
            await _expect_close_then_eof(client, 1009, "line too long")


async def test_invalid_utf8_closes_1007(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            await client.send_raw(b'{"op":"ping","id":"\xff\xfe"}\n')
            await _expect_close_then_eof(client, 1007, "invalid UTF-8")


async def test_client_eof_is_a_clean_disconnect(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        client = await NdjsonClient.connect(rs.tcp_port)
        await client.send({"op": "subscribe", "topic": "t", "id": 1})
        assert (await client.recv())["ok"] is True
        assert rs.server.hub.subscriber_count("t") == 1
        await client.aclose()
        await wait_until(lambda: not rs.server.connections, what="server to drop the client")
        assert rs.server.hub.subscriber_count("t") == 0


async def test_client_publish_burst_past_hub_capacity_keeps_order(start_server: Any) -> None:
    # With a tiny hub inbox, a burst of client publishes (one segment, read in
    # one go) must wait for space rather than fail or reorder.
    rs = await start_server(client_publish=True, hub_max_pending=4)
    count = 60
    with trio.fail_after(15):
        sub = await NdjsonClient.connect(rs.tcp_port)
        pub = await NdjsonClient.connect(rs.tcp_port)
        async with sub.stream, pub.stream:
            await sub.send({"op": "subscribe", "topic": "q", "id": 0})
            await sub.send({"op": "subscribe", "topic": "q", "id": 1})  # twice: still one copy
            assert (await sub.recv())["ok"] is True
            assert (await sub.recv())["ok"] is True
            burst = b"".join(
                json.dumps({"op": "publish", "topic": "q", "data": i, "id": i}).encode() + b"\n"
                for i in range(1, count + 1)
            )
            await pub.send_raw(burst)
            replies = [await pub.recv() for _ in range(count)]
            assert replies == [{"id": i, "ok": True, "offset": i, "subscribers": 1}
                               for i in range(1, count + 1)]
            pubs = [await sub.recv() for _ in range(count)]
            assert pubs == [{"op": "pub", "topic": "q", "offset": i, "data": i} for i in range(1, count + 1)]
            await sub.send({"op": "ping", "id": "end", "x": 0})
            assert await sub.recv() == {"id": "end", "ok": True, "op": "pong"}
