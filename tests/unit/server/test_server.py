"""Server: drain order and deadlines, handshake timeout, capacity; autojump clock."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
import trio

from trioserve import CloseCode, Connection

from ...peers import OP_CLOSE, OP_TEXT, RawWebSocket, http_request


async def subscribe(peer: RawWebSocket, topic: str) -> None:
    await peer.send_text(orjson.dumps({"op": "subscribe", "topic": topic}).decode())
    reply = orjson.loads(await peer.recv_message())
    assert reply["ok"], reply


async def test_drain_flushes_then_closes_1001(start_server: Any, autojump_clock: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trioserve")
    rs = await start_server()
    peers = [await RawWebSocket.connect(rs.port) for _ in range(3)]
    for p in peers:
        await subscribe(p, "news")
    for i in range(50):
        rs.server.hub.publish_nowait("news", i)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rs.server.drain)
        for p in peers:
            frames = await p.read_until_eof()
            data = [f.json()["data"] for f in frames if f.opcode == OP_TEXT]
            assert data == list(range(50))
            assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1001
    assert "drained 3, forced 0" in caplog.text


async def test_drain_forces_silent_clients_at_the_deadline(
    start_server: Any, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trioserve")
    rs = await start_server(close_timeout=60)
    answering, silent = await RawWebSocket.connect(rs.port), await RawWebSocket.connect(rs.port)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rs.server.drain, 7)
        frames = await answering.read_until_eof()
        assert frames[-1].close_code == 1001
        frame = await silent.recv_frame()
        assert frame.opcode == OP_CLOSE and frame.close_code == 1001
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


UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def test_readyz_and_upgrades_during_drain(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(close_timeout=60, drain_timeout=30)
    ready = await http_request(rs.port, "GET", "/readyz")
    assert ready.status == 200
    holdout = await RawWebSocket.connect(rs.port)  # never answers the close, so the drain lasts
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rs.server.drain)
        frame = await holdout.recv_frame()
        assert frame.opcode == OP_CLOSE and frame.close_code == 1001
        # Without "Connection: close": the server must add it.
        ready = await http_request(rs.port, "GET", "/readyz",
                                   raw_head=b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ready.status == 503 and b"draining" in ready.body
        assert ready.headers.get("connection") == "close"  # no keep-alive while draining
        upgrade = await http_request(rs.port, "GET", "/ws", raw_head=UPGRADE)
        assert upgrade.status == 503 and b"draining" in upgrade.body
        health = await http_request(rs.port, "GET", "/healthz",
                                    raw_head=b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert health.status == 200
        with pytest.raises(OSError):  # the TCP listener stopped at once
            await trio.open_tcp_stream("127.0.0.1", rs.tcp_port)
        publish = await http_request(
            rs.port, "POST", "/api/publish", b'{"topic":"t","data":123}',
            raw_head=b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Length: 24\r\n\r\n",
        )
        assert publish.status == 503
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
        peer = await RawWebSocket.connect(rs.port)
        await peer.send_text("boom")
        frames = await peer.read_until_eof()
        assert frames[-1].opcode == OP_CLOSE
        close = frames[-1]
        assert (close.close_code, close.close_reason) == (CloseCode.INTERNAL_ERROR, "internal error")
        other = await RawWebSocket.connect(rs.port)
        await other.send_text("hi")
        assert await other.recv_message() == "hi"
    assert "handler failed" in caplog.text and "handler bug" in caplog.text


async def test_connections_over_max_get_503(start_server: Any) -> None:
    rs = await start_server(max_connections=2)
    with trio.fail_after(10):
        _keep = [await RawWebSocket.connect(rs.port), await RawWebSocket.connect(rs.port)]
        response = await http_request(rs.port, "GET", "/ws", raw_head=UPGRADE)
    assert response.status == 503
    assert b"max_connections" in response.body
    assert rs.server.statistics().connections == 2
