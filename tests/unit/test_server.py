"""Server: drain order and deadlines, handshake timeout, capacity; autojump clock."""

from __future__ import annotations

import base64
import logging
import os
from typing import Any

import orjson
import pytest
import trio
import wsproto.events as wse

from trioserve import CloseCode, Connection

from .helpers import WSPeer


async def ws_connect(port: int, path: str = "/ws") -> WSPeer:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    peer = WSPeer(stream)
    rest = head.split(b"\r\n\r\n", 1)[1]
    if rest:
        peer.ws.receive_data(rest)
    return peer


async def subscribe(peer: WSPeer, topic: str) -> None:
    await peer.send(wse.TextMessage(orjson.dumps({"op": "subscribe", "topic": topic}).decode()))
    reply = orjson.loads(await peer.next_message())
    assert reply["ok"], reply


async def test_drain_flushes_then_closes_1001(start_server: Any, autojump_clock: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trioserve")
    rs = await start_server()
    peers = [await ws_connect(rs.port) for _ in range(3)]
    for p in peers:
        await subscribe(p, "news")
    for i in range(50):
        rs.server.hub.publish_nowait("news", i)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rs.server.drain)
        for p in peers:
            events = await p.read_until_eof()
            data = [orjson.loads(e.data)["data"] for e in events if isinstance(e, wse.TextMessage)]
            assert data == list(range(50))
            assert isinstance(events[-1], wse.CloseConnection) and events[-1].code == 1001
    assert "drained 3, forced 0" in caplog.text


async def test_drain_forces_silent_clients_at_the_deadline(
    start_server: Any, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trioserve")
    rs = await start_server(close_timeout=60)
    answering, silent = await ws_connect(rs.port), await ws_connect(rs.port)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rs.server.drain, 7)
        events = await answering.read_until_eof()
        assert events[-1].code == 1001  # type: ignore[attr-defined]
        event = await silent.next_event()
        assert isinstance(event, wse.CloseConnection) and event.code == 1001
        while await silent.stream.receive_some(100):  # never answer; wait for the cut
            pass
    assert trio.current_time() - start == pytest.approx(7)
    assert "drained 1, forced 1" in caplog.text


async def test_idle_http_and_half_requests_do_not_hold_a_drain(
    start_server: Any, autojump_clock: Any
) -> None:
    rs = await start_server(handshake_timeout=100)
    keepalive = await trio.open_tcp_stream("127.0.0.1", rs.port)
    await keepalive.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert b"200" in await keepalive.receive_some(4096)
    half = await trio.open_tcp_stream("127.0.0.1", rs.port)
    await half.send_all(b"GET /ws HTTP/1.1\r\nHost: t\r\n")
    await trio.sleep(1)
    start = trio.current_time()
    await rs.server.drain()
    assert trio.current_time() - start < 1
    assert await keepalive.receive_some(4096) == b""


async def http_get(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    response = b""
    while chunk := await stream.receive_some(4096):
        response += chunk
    return response


UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def test_readyz_and_upgrades_during_drain(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(close_timeout=60, drain_timeout=30)
    ready = await http_get(rs.port, b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert ready.startswith(b"HTTP/1.1 200 ")
    holdout = await ws_connect(rs.port)  # never answers the close, so the drain lasts
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rs.server.drain)
        event = await holdout.next_event()
        assert isinstance(event, wse.CloseConnection) and event.code == 1001
        ready = await http_get(rs.port, b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ready.startswith(b"HTTP/1.1 503 ") and b"draining" in ready
        assert b"connection: close" in ready  # no keep-alive while draining
        upgrade = await http_get(rs.port, UPGRADE)
        assert upgrade.startswith(b"HTTP/1.1 503 ") and b"draining" in upgrade
        health = await http_get(rs.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert health.startswith(b"HTTP/1.1 200 ")
        with pytest.raises(OSError):  # the TCP listener stopped at once
            await trio.open_tcp_stream("127.0.0.1", rs.tcp_port)
        publish = await http_get(
            rs.port, b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Length: 24\r\n\r\n"
            b'{"topic":"t","data":123}'
        )
        assert publish.startswith(b"HTTP/1.1 503 ")
    # Once the last connection is gone (forced at 30 s) the HTTP port closes too.
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", rs.port)


async def test_slowloris_handshake_is_cut_off(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(handshake_timeout=10)
    stream = await trio.open_tcp_stream("127.0.0.1", rs.port)
    start = trio.current_time()
    for _ in range(3):
        await stream.send_all(b"G")
        await trio.sleep(2)
    assert await stream.receive_some(100) == b""
    assert trio.current_time() - start == pytest.approx(10)


async def test_handler_exception_closes_1011_and_server_carries_on(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(conn: Connection) -> None:
        async for message in conn:
            if message == "boom":
                raise RuntimeError("handler bug")
            conn.send_nowait(message)

    rs = await start_server(server_kwargs={"ws_handler": handler})
    with trio.fail_after(10):
        peer = await ws_connect(rs.port)
        await peer.send(wse.TextMessage("boom"))
        events = await peer.read_until_eof()
        assert isinstance(events[-1], wse.CloseConnection)
        assert (events[-1].code, events[-1].reason) == (CloseCode.INTERNAL_ERROR, "internal error")
        other = await ws_connect(rs.port)
        await other.send(wse.TextMessage("hi"))
        assert await other.next_message() == "hi"
    assert "handler failed" in caplog.text and "handler bug" in caplog.text


async def test_connections_over_max_get_503(start_server: Any) -> None:
    rs = await start_server(max_connections=2)
    with trio.fail_after(10):
        _keep = [await ws_connect(rs.port), await ws_connect(rs.port)]
        response = await http_get(rs.port, UPGRADE)
    assert response.startswith(b"HTTP/1.1 503 ")
    assert b"max_connections" in response
    assert rs.server.statistics().connections == 2
