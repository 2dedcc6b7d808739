"""Graceful drain, in process, during a publish burst."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from trioserve import HubClosed

from ..peers import (
    OP_CLOSE,
    HttpResponse,
    NdjsonClient,
    RawWebSocket,
    http_publish,
    http_request,
    upgrade_head,
)
from .helpers import close_code, wait_until

pytestmark = pytest.mark.system

WS_SUBSCRIBERS = 80
TCP_SUBSCRIBERS = 20
TOPIC = "burst"


async def test_drain_mid_burst_delivers_everything_accepted_then_1001(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve.server")
    rs = await start_server()
    hub = rs.server.hub
    results: dict[str, tuple[list[int], int | None]] = {}
    ready = trio.Event()
    waiting = WS_SUBSCRIBERS + TCP_SUBSCRIBERS

    def mark_ready() -> None:
        nonlocal waiting
        waiting -= 1
        if waiting == 0:
            ready.set()

    async def ws_subscriber(i: int) -> None:
        async with open_websocket_url(rs.ws_url) as ws:
            await ws.send_message(json.dumps({"op": "subscribe", "topic": TOPIC, "id": 1}))
            assert json.loads(await ws.get_message())["ok"] is True
            mark_ready()
            offsets: list[int] = []
            try:
                while True:
                    offsets.append(json.loads(await ws.get_message())["offset"])
            except ConnectionClosed as exc:
                results[f"ws{i}"] = (offsets, close_code(exc))

    async def tcp_subscriber(i: int) -> None:
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            await client.send({"op": "subscribe", "topic": TOPIC, "id": 1})
            assert (await client.recv())["ok"] is True
            mark_ready()
            offsets: list[int] = []
            while (line := await client.recv_line()) is not None:
                msg = json.loads(line)
                if msg["op"] == "close":
                    code = msg["code"]
                    continue
                offsets.append(msg["offset"])
            results[f"tcp{i}"] = (offsets, code)

    accepted: list[int] = []
    refused = trio.Event()
    halfway = trio.Event()

    async def publisher() -> None:
        try:
            while True:
                # Bursts of 20 with no checkpoint, so the hub has a backlog when the drain starts.
                for _ in range(20):
                    accepted.append(hub.publish_nowait(TOPIC, {"n": len(accepted) + 1}).offset)
                if len(accepted) >= 300:
                    halfway.set()
                await trio.sleep(0)
        except HubClosed:
            refused.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(WS_SUBSCRIBERS):
                nursery.start_soon(ws_subscriber, i)
            for i in range(TCP_SUBSCRIBERS):
                nursery.start_soon(tcp_subscriber, i)
            await ready.wait()
            nursery.start_soon(publisher)
            await halfway.wait()
            await rs.server.drain(timeout=15)
            # The publisher's next call after the drain began was refused.
            await refused.wait()

    assert rs.server.draining
    total = len(accepted)
    assert accepted == list(range(1, total + 1))
    assert hub.statistics().publications == total
    assert len(results) == WS_SUBSCRIBERS + TCP_SUBSCRIBERS
    for name, (offsets, code) in results.items():
        assert offsets == list(range(1, total + 1)), f"{name} got {len(offsets)} of {total}"
        assert code == 1001, f"{name} closed with {code}"
    assert not rs.server.connections
    assert f"drained {WS_SUBSCRIBERS + TCP_SUBSCRIBERS}, forced 0" in caplog.text


async def _probe(port: int, method: str, path: str, raw_head: bytes | None = None) -> HttpResponse:
    try:
        return await http_request(port, method, path, raw_head=raw_head)
    except (OSError, AssertionError) as exc:
        raise AssertionError(
            f"{method} {path} during the drain got no HTTP response ({exc!r}); "
            "expected 503 from the still-listening HTTP port"
        ) from None


async def test_drain_reports_not_ready_and_refuses_upgrades(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve.server")
    # close_timeout is long, and the held client answers the close only when
    # the test lets it, so the drain is certainly still running during the probes.
    rs = await start_server(close_timeout=20)
    with trio.fail_after(20):
        held = await RawWebSocket.connect(rs.port)
        async with held.stream:
            await held.send_json({"op": "subscribe", "topic": TOPIC, "id": 1})
            assert (await held.recv_json())["ok"] is True
            assert (await http_request(rs.port, "GET", "/readyz")).status == 200

            async with trio.open_nursery() as nursery:
                nursery.start_soon(rs.server.drain, 15)
                await wait_until(lambda: rs.server.draining, what="drain to start")

                resp = await _probe(rs.port, "GET", "/readyz")
                assert (resp.status, resp.json()) == (503, {"status": "draining"})

                rejected = rs.server.statistics().rejected_connections
                head, _ = upgrade_head(rs.port)
                resp = await _probe(rs.port, "GET", "/ws", raw_head=head)
                assert resp.status == 503
                assert resp.json()["error"]["code"] == "unavailable"
                # Counted like a TCP connection refused while draining.
                assert rs.server.statistics().rejected_connections == rejected + 1

                try:
                    resp = await http_publish(rs.port, TOPIC, "too late")
                except OSError as exc:
                    raise AssertionError(f"publish during the drain got no response: {exc!r}") from None
                assert resp.status == 503 and resp.json()["error"]["code"] == "unavailable"

                frame = await held.recv_frame()
                assert frame.opcode == OP_CLOSE and frame.close_code == 1001, frame
                await held.send_close(1001)
            assert await held.reader.fill() is False, "expected EOF after the close handshake"
    assert "drained 1, forced 0" in caplog.text


async def test_drain_deadline_forces_a_client_that_never_answers(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve.server")
    # The per-connection close timeout is longer than the drain's, so only the
    # drain deadline can end this connection.
    rs = await start_server(close_timeout=30)
    with trio.fail_after(15):
        held = await RawWebSocket.connect(rs.port)
        async with held.stream:
            await held.send_json({"op": "ping", "id": 1})
            assert (await held.recv_json())["ok"] is True
            start = trio.current_time()
            await rs.server.drain(timeout=0.3)
            elapsed = trio.current_time() - start
            assert 0.25 <= elapsed < 5, elapsed
            assert not rs.server.connections
            # The close frame went out before the deadline; then the socket was closed.
            frame = await held.recv_frame()
            assert frame.opcode == OP_CLOSE and frame.close_code == 1001, frame
            assert await held.reader.fill() is False
    assert "drained 0, forced 1" in caplog.text, caplog.text
