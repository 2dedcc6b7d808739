"""Heartbeat and handshake timeouts with real sockets, on the autojump clock.

The default timeouts are used as they ship: virtual time makes them instant.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from ..peers import OP_CLOSE, OP_PING, OP_PONG, NdjsonClient, RawWebSocket, open_socket
from .helpers import wait_until

pytestmark = pytest.mark.system

PING_INTERVAL = 25.0
PING_TIMEOUT = 10.0
# Virtual seconds: long enough for several heartbeat rounds.
LIMIT = 200


async def test_ws_client_that_answers_pings_stays_connected(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            for _ in range(3):
                frame = await ws.recv_frame()
                assert frame.opcode == OP_PING, frame
                await ws.send_frame(OP_PONG, frame.payload)
            await ws.send_json({"op": "ping", "id": 1})
            assert await ws.recv_json() == {"id": 1, "ok": True, "op": "pong"}


async def test_ws_client_that_ignores_pings_is_closed_4002(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT, close_timeout=5)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            assert (await ws.recv_frame()).opcode == OP_PING
            frame = await ws.recv_frame()
            assert frame.opcode == OP_CLOSE, frame
            assert (frame.close_code, frame.close_reason) == (4002, "heartbeat timeout")
        await wait_until(lambda: not rs.server.connections, what="server to drop the client")


async def test_tcp_client_that_ignores_pings_is_closed_4002(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT)
    with trio.fail_after(LIMIT):
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            assert await client.recv_line() == b'{"op":"ping"}'
            assert json.loads(await client.recv_line() or b"null") == {
                "op": "close", "code": 4002, "reason": "heartbeat timeout",
            }
            assert await client.recv_line() is None
        await wait_until(lambda: not rs.server.connections, what="server to drop the client")


async def test_tcp_client_that_answers_pings_stays_connected(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT)
    with trio.fail_after(LIMIT):
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            for _ in range(3):
                assert await client.recv_line() == b'{"op":"ping"}'
                await client.send_raw(b'{"op":"pong"}\n')
            await client.send({"op": "ping", "id": 1, "x": 0})
            assert await client.recv() == {"id": 1, "ok": True, "op": "pong"}


async def test_incomplete_request_head_is_cut_off(start_server: Any, autojump_clock: Any) -> None:
    # Slowloris guard: half a request head must not hold a socket for long.
    rs = await start_server(handshake_timeout=10)
    with trio.fail_after(LIMIT):
        stream = await open_socket(rs.port)
        async with stream:
            await stream.send_all(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{rs.port}\r\n".encode())
            start = trio.current_time()
            assert await stream.receive_some(65536) == b""
            assert trio.current_time() - start == pytest.approx(10)


async def test_pings_come_from_the_sweep_on_time_without_waking_readers(
        start_server: Any, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server's one heartbeat task sends the pings (trioserve/net/heartbeat.py):
    # a reader whose peer answers is never woken by its own deadline.
    from trioserve.net.connection import Connection

    deadlines: list[float] = []
    original = Connection._on_deadline

    def counting(self: Connection) -> None:
        deadlines.append(trio.current_time())
        original(self)

    monkeypatch.setattr(Connection, "_on_deadline", counting)
    rs = await start_server(ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT)
    tick = min(1.0, PING_INTERVAL / 8)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            last_in = trio.current_time()
            for _ in range(3):
                frame = await ws.recv_frame()
                assert frame.opcode == OP_PING, frame
                waited = trio.current_time() - last_in
                assert PING_INTERVAL <= waited <= PING_INTERVAL + tick + 0.01, waited
                await ws.send_frame(OP_PONG, frame.payload)
                last_in = trio.current_time()
            assert deadlines == []
            # No pong this time: the reader's deadline closes within a tick of the timeout.
            frame = await ws.recv_frame()
            assert frame.opcode == OP_PING
            pinged = trio.current_time()
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.close_code) == (OP_CLOSE, 4002)
            assert PING_TIMEOUT <= trio.current_time() - pinged <= PING_TIMEOUT + tick + 0.01
            assert len(deadlines) == 1
