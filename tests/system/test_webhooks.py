"""Webhooks (docs/backend.md): batched, signed, retried, bounded, and flushed by a drain."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
import trio

from trioserve import Server

from ..peers import NdjsonClient, RawWebSocket, http_request
from .appbackend import AppBackend, Received, app_backend
from .helpers import wait_until

pytestmark = pytest.mark.system

LIMIT = 15
SECRET = "webhook-secret-0123456789"


def verifies(req: Received) -> bool:
    """What a receiver does: HMAC-SHA256 of the raw body under the secret, in constant time."""
    expected = "sha256=" + hmac.new(SECRET.encode(), req.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, req.headers.get("X-Trioserve-Signature", ""))


def delivered(backend: AppBackend) -> list[dict[str, Any]]:
    """The events of every POST the receiver accepted (the scripted 2xx ones)."""
    return [e for r in backend.requests("/webhook") if r.headers.get("X-Accepted") != "no"
            for e in r.json()["events"]]


class Flaky:
    """A receiver that answers 500 to the first *failures* POSTs (or until recover()), then 200."""

    def __init__(self, backend: AppBackend, failures: int | None):
        self.backend = backend
        self.failures = failures
        self.accepted: list[Received] = []

    def recover(self) -> None:
        self.failures = 0

    def __call__(self, body: bytes) -> Any:
        if self.failures is None or self.failures > 0:
            if self.failures is not None:
                self.failures -= 1
            return (500, b"down for maintenance")
        self.accepted.append(self.backend.requests("/webhook")[-1])
        return {}

    def events(self) -> list[dict[str, Any]]:
        return [e for r in self.accepted for e in r.json()["events"]]


def webhooks(backend: AppBackend, **config: Any) -> dict[str, Any]:
    return {"webhooks_url": backend.url("/webhook"), "webhooks_secret": SECRET, **config}


async def test_events_are_retried_until_the_receiver_recovers_and_signed(start_server: Any) -> None:
    async with app_backend() as backend:
        receiver = Flaky(backend, failures=3)
        backend.replies["/webhook"] = receiver
        rs = await start_server(**webhooks(backend))
        with trio.fail_after(LIMIT):
            ws = await RawWebSocket.connect(rs.port)
            async with ws.stream:
                await ws.request({"op": "subscribe", "topic": "room", "id": 1})
                await ws.request({"op": "unsubscribe", "topic": "room", "id": 2})
                await ws.send_close(4000, "bye")
                await ws.wait_closed()
            tcp = await NdjsonClient.connect(rs.tcp_port)
            await tcp.stream.aclose()
            await backend.wait_until(lambda: len(receiver.events()) >= 5)
        events = receiver.events()
        ws_client = events[0]["client"]
        assert [(e["event"], e["transport"]) for e in events] == [
            ("connect", "websocket"), ("unsubscribe", "websocket"), ("disconnect", "websocket"),
            ("connect", "tcp"), ("disconnect", "tcp")]
        assert events[1] == {"event": "unsubscribe", "user": "", "client": ws_client,
                             "transport": "websocket", "topic": "room"}
        assert events[2] == {"event": "disconnect", "user": "", "client": ws_client,
                             "transport": "websocket", "code": 4000, "reason": "bye"}
        requests = backend.requests("/webhook")
        assert len(requests) >= 4  # three failures, then what was queued meanwhile
        assert all(verifies(r) for r in requests)
        tampered = Received("/webhook", requests[-1].body + b" ", requests[-1].headers)
        assert not verifies(tampered)
        metrics = (await http_request(rs.port, "GET", "/metrics")).body.decode()
        assert "trioserve_webhook_failed_posts_total 3.0" in metrics
        assert "trioserve_webhook_events_delivered_total 5.0" in metrics


async def test_a_full_queue_drops_the_oldest_and_counts_them(start_server: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    async with app_backend() as backend:
        receiver = Flaky(backend, failures=None)  # down until recover()
        backend.replies["/webhook"] = receiver
        rs = await start_server(**webhooks(backend, webhooks_queue_size=3))
        server: Server = rs.server
        hooks = server.webhooks
        assert hooks is not None

        def emitted() -> int:
            counters = hooks.counters()
            return counters["delivered"] + counters["dropped"] + counters["queued"]

        with trio.fail_after(LIMIT):
            for n in range(1, 5):  # 8 events: connect and disconnect of four clients
                tcp = await NdjsonClient.connect(rs.tcp_port)
                await tcp.stream.aclose()
                await wait_until(lambda: emitted() == 2 * n, what=f"the events of client {n}")  # noqa: B023
            # A failure after the last event puts its batch back and trims the queue to the newest 3.
            failed = hooks.failed_posts
            await wait_until(lambda: hooks.failed_posts > failed, what="a failed POST")
            assert hooks.counters()["dropped"] == 5 and hooks.queued == 3
            receiver.recover()
            await backend.wait_until(lambda: len(receiver.events()) == 3)
        events = receiver.events()
        assert [e["event"] for e in events] == ["disconnect", "connect", "disconnect"]
        # The newest three survive: the last client's connect and disconnect, the one before's disconnect.
        assert events[1]["client"] == events[2]["client"] != events[0]["client"]
        metrics = (await http_request(rs.port, "GET", "/metrics")).body.decode()
        assert "trioserve_webhook_events_dropped_total 5.0" in metrics
        assert "webhook queue full" in caplog.text


async def test_a_drain_flushes_the_queue(start_server: Any) -> None:
    async with app_backend() as backend:
        backend.replies["/webhook"] = {}
        # A batch would wait for 1000 events or 100 ms; the drain sends at once.
        rs = await start_server(**webhooks(backend, webhooks_batch_size=1000, drain_timeout=10))
        with trio.fail_after(LIMIT):
            clients = [await RawWebSocket.connect(rs.port) for _ in range(3)]
            await backend.wait_until(lambda: len(delivered(backend)) == 3)  # the connects
            async with trio.open_nursery() as nursery:
                for ws in clients:
                    nursery.start_soon(_answer_close, ws)
                await rs.server.drain()
            # Everything, the disconnects too, was POSTed before drain() returned.
            events = delivered(backend)
        assert sorted(e["event"] for e in events) == ["connect"] * 3 + ["disconnect"] * 3
        assert {e["code"] for e in events if e["event"] == "disconnect"} == {1001}


async def _answer_close(ws: RawWebSocket) -> None:
    async with ws.stream:
        await ws.wait_closed()


async def test_on_unsubscribe_hook_sees_each_unsubscribe_and_a_failing_hook_is_logged(
        start_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[int, str]] = []

    def on_unsubscribe(conn: Any, topic: str) -> None:
        seen.append((conn.id, topic))
        if topic == "boom":
            raise RuntimeError("the application's bug")

    rs = await start_server({"on_unsubscribe": on_unsubscribe})
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            for topic in ("a", "boom"):
                await ws.request({"op": "subscribe", "topic": topic, "id": 1})
                assert (await ws.request({"op": "unsubscribe", "topic": topic, "id": 2}))["ok"] is True
            # Not subscribed any more: no second call.
            assert (await ws.request({"op": "unsubscribe", "topic": "a", "id": 3}))["ok"] is True
            assert (await ws.request({"op": "ping", "id": 4}))["ok"] is True
    (conn_id,) = {c for c, _ in seen}
    assert seen == [(conn_id, "a"), (conn_id, "boom")]
    assert "on_unsubscribe failed" in caplog.text
