"""``GET /sse``: Server-Sent Events, read by a raw HTTP client (what ``curl -N`` sees).

Every publication is one event with the WebSocket's JSON as its data; the
``id:`` is a cursor over all of the stream's topics, which a reconnect gives
back (``Last-Event-ID`` or ``?since=``) to get exactly what it missed, or a
``gap`` event.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
import trio

from trioserve.net.sse import SseConnection

from ..peers import RawWebSocket, SseStream, http_publish, http_request
from .helpers import next_pub, subscribe_reply, wait_until

pytestmark = pytest.mark.system

SECRET = "test-secret-0123456789-0123456789-abcdef"


def token(sub: str = "alice", ttl: float = 3600, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256")


async def opened(port: int, query: str,
                 headers: list[tuple[str, str]] | None = None) -> tuple[SseStream, Any]:
    """A stream past its start: the ``retry:`` block, then its ``subscribed`` event."""
    s = await SseStream.open(port, query, headers or [])
    assert s.status == 200, await s.body()
    assert s.headers["content-type"] == "text/event-stream"
    assert s.headers["cache-control"] == "no-store"
    first = await s.next_block()
    assert first is not None and first.retry is not None and first.retry > 0 and first.data is None
    subscribed = await s.next_event()
    assert subscribed.event == "subscribed" and subscribed.id
    return s, subscribed


async def test_publications_are_the_websocket_json_with_a_cursor_id(start_server: Any) -> None:
    rs = await start_server()
    s, subscribed = await opened(rs.port, "topic=news&topic=chat")
    assert [t["topic"] for t in subscribed.json()["topics"]] == ["news", "chat"]
    ws = await RawWebSocket.connect(rs.port)
    await subscribe_reply(ws, "news")
    async with s.stream, ws.stream:
        await http_publish(rs.port, "news", {"a": 1})
        await http_publish(rs.port, "chat", "hi")
        first, second = await s.next_event(), await s.next_event()
        assert first.event is None and second.event is None
        ws_text = json.dumps(await next_pub(ws), separators=(",", ":"))
        assert first.data == ws_text == '{"op":"pub","topic":"news","offset":1,"data":{"a":1}}'
        assert second.json() == {"op": "pub", "topic": "chat", "offset": 1, "data": "hi"}
        # Every id differs, and is URL-safe.
        ids = {subscribed.id, first.id, second.id}
        assert len(ids) == 3 and all(i and all(c.isalnum() or c in "._-" for c in i) for i in ids)
        stats = rs.server.statistics()
        assert (stats.sse_connections, stats.connects_total.get("sse")) == (1, 1)


async def test_reconnect_with_last_event_id_gets_exactly_what_it_missed(start_server: Any) -> None:
    rs = await start_server()
    s, _ = await opened(rs.port, "topic=a&topic=b")
    await http_publish(rs.port, "a", 1)
    await http_publish(rs.port, "b", 1)
    async with s.stream:
        await s.next_event()
        last = await s.next_event()
    assert last.json()["offset"] == 1 and last.json()["topic"] == "b"
    await wait_until(lambda: rs.server.statistics().sse_connections == 0, what="stream closed")
    # Published while no stream was open, interleaved over both topics.
    for i in range(2, 5):
        await http_publish(rs.port, "a", i)
        await http_publish(rs.port, "b", i)
    for how in ("header", "since"):
        query, headers = "topic=a&topic=b", [("Last-Event-ID", last.id or "")]
        if how == "since":
            query, headers = f"topic=a&topic=b&since={last.id}", []
        s = await SseStream.open(rs.port, query, headers)
        async with s.stream:
            assert s.status == 200
            got = []
            while (ev := await s.next_event()).event != "subscribed":
                got.append((ev.json()["topic"], ev.json()["offset"]))
            # The same cursor again: the header round's live publication is missed too.
            a_last = 4 if how == "header" else 5
            expected = [("a", i) for i in range(2, a_last + 1)] + [("b", 2), ("b", 3), ("b", 4)]
            assert got == expected, how
            assert [(t["offset"], t["recovered"]) for t in ev.json()["topics"]] == [(a_last, True),
                                                                                  (4, True)]
            # Then live, once.
            await http_publish(rs.port, "a", "live")
            ev_live = await s.next_event()
            assert (ev_live.json()["offset"], ev_live.json()["data"]) == (5 if how == "header" else 6, "live")
            cursor_after = ev_live.id
        # A cursor taken mid-recovery resumes from there: no duplicate.
        s = await SseStream.open(rs.port, "topic=a&topic=b", [("Last-Event-ID", cursor_after or "")])
        async with s.stream:
            ev = await s.next_event()
            assert ev.event == "subscribed", ev


async def test_gap_event_when_history_cannot_fill_it(start_server: Any) -> None:
    rs = await start_server(history_size=3)
    s, subscribed = await opened(rs.port, "topic=g&topic=ok")
    await s.aclose()
    for i in range(5):
        await http_publish(rs.port, "g", i)
    await http_publish(rs.port, "ok", "x")
    s = await SseStream.open(rs.port, "topic=g&topic=ok", [("Last-Event-ID", subscribed.id)])
    async with s.stream:
        gap = await s.next_event()
        assert gap.event == "gap" and gap.id
        epoch = rs.server.hub.epoch_of("g")
        assert gap.json() == {"topic": "g", "epoch": epoch, "offset": 5}
        recovered = await s.next_event()
        assert recovered.json()["topic"] == "ok" and recovered.json()["offset"] == 1
        summary = (await s.next_event()).json()["topics"]
        assert [(t["topic"], t["recovered"]) for t in summary] == [("g", False), ("ok", True)]
        await http_publish(rs.port, "g", "live")
        assert (await s.next_event()).json()["offset"] == 6
    # A cursor from another epoch (this server's cursor format, another broker's history).
    foreign = "1." + subscribed.id.split(".")[1][:12] + "0"
    foreign = foreign[:8] + ("A" if foreign[8] != "A" else "B") + foreign[9:]
    s = await SseStream.open(rs.port, "topic=g", [("Last-Event-ID", foreign)])
    async with s.stream:
        gap = await s.next_event()
        assert gap.event == "gap" and gap.json()["epoch"] == rs.server.hub.epoch_of("g")


async def test_bad_requests_get_named_errors(start_server: Any) -> None:
    rs = await start_server(max_subscriptions=2)
    for query, code in [("", "bad_request"), ("topic=bad%20topic", "bad_request"),
                        ("topic=a&topic=b&topic=c", "too_many_subscriptions"),
                        ("topic=a&since=2.abc", "bad_request"), ("topic=a&since=1.!!", "bad_request")]:
        s = await SseStream.open(rs.port, query)
        async with s.stream:
            assert s.status == 400, query
            assert json.loads(await s.body())["error"]["code"] == code, query
    resp = await http_request(rs.port, "POST", "/sse?topic=a")
    assert resp.status == 405
    # The server carries on.
    s, _ = await opened(rs.port, "topic=a")
    await s.aclose()


async def test_token_auth_in_query_or_header(start_server: Any) -> None:
    rs = await start_server(token_secret=SECRET)
    for headers, query, status, reason in [
        ([], "topic=a", 401, "token"),
        ([], f"topic=a&token={token(ttl=-10)}", 401, "token_expired"),
        ([], "topic=a&token=garbage", 401, "unauthorized"),
        ([], f"topic=secret&token={token(subscribe=['public.*'])}", 403, "secret"),
    ]:
        s = await SseStream.open(rs.port, query, headers)
        async with s.stream:
            assert s.status == status, query
            error = json.loads(await s.body())["error"]
            assert error["code"] == ("unauthorized" if status == 401 else "forbidden")
            assert reason in error["message"], error
    assert rs.server.statistics().auth_failures == 3
    s, _ = await opened(rs.port, f"topic=public.x&token={token(subscribe=['public.*'])}")
    await s.aclose()
    s, _ = await opened(rs.port, "topic=a", [("Authorization", f"Bearer {token(subscribe=['a'])}")])
    await s.aclose()


async def test_cors_follows_allowed_origins(start_server: Any) -> None:
    rs = await start_server(allowed_origins=["https://app.example"])
    s, _ = await opened(rs.port, "topic=a", [("Origin", "https://app.example")])
    assert s.headers["access-control-allow-origin"] == "https://app.example"
    assert s.headers["access-control-allow-credentials"] == "true"
    await s.aclose()
    s = await SseStream.open(rs.port, "topic=a", [("Origin", "https://evil.example")])
    async with s.stream:
        assert s.status == 403 and "evil" in json.loads(await s.body())["error"]["message"]
    pre = await http_request(rs.port, "OPTIONS", "/sse", headers=[
        ("Origin", "https://app.example"), ("Access-Control-Request-Method", "GET"),
        ("Access-Control-Request-Headers", "authorization, last-event-id")])
    assert pre.status == 204
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    allowed = pre.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "last-event-id" in allowed
    # With no list, any page may read the stream (tokens, not cookies, authenticate).
    rs2 = await start_server()
    s, _ = await opened(rs2.port, "topic=a", [("Origin", "https://any.example")])
    assert s.headers["access-control-allow-origin"] == "*"
    await s.aclose()


async def test_heartbeat_comments_at_the_ping_interval(start_server: Any) -> None:
    rs = await start_server(ping_interval=0.1, ping_timeout=5)
    s, _ = await opened(rs.port, "topic=a")
    async with s.stream:
        with trio.fail_after(10):
            comments = 0
            while comments < 3:
                block = await s.next_block()
                assert block is not None and block.comment, block
                comments += 1
        # Heartbeats keep a reading stream open.
        assert rs.server.statistics().sse_connections == 1


async def test_drain_flushes_then_ends_with_a_jittered_retry(start_server: Any) -> None:
    rs = await start_server(drain_timeout=10)
    s, _ = await opened(rs.port, "topic=d")
    async with s.stream:
        for i in range(200):
            rs.server.hub.publish_nowait("d", i)
        rs.nursery.start_soon(rs.server.drain)
        offsets = []
        while True:
            ev = await s.next_event()
            if ev.event == "close":
                break
            offsets.append(ev.json()["offset"])
        assert offsets == list(range(1, 201))
        assert ev.json() == {"code": 1001, "reason": "going away"}
        assert ev.retry is not None and 1000 <= ev.retry <= 5000
        assert await s.next_block() is None  # then the response ends


async def test_slow_stream_is_closed_4008(start_server: Any) -> None:
    rs = await start_server(queue_max_bytes=64 * 1024, close_timeout=2)
    s = await SseStream.open(rs.port, "topic=s", rcvbuf=4096)
    async with s.stream:
        assert s.status == 200
        conns = [c for c in rs.server.connections if isinstance(c, SseConnection)]
        assert len(conns) == 1
        pad = "x" * 1000
        n = 0
        while conns[0].state.value == "open":
            assert n < 100_000, "the slow stream's queue never hit its limit"
            for _ in range(50):
                n += 1
                rs.server.hub.publish_nowait("s", {"n": n, "pad": pad})
            await rs.server.hub.flush()
        assert conns[0].statistics().slow_consumer is True
        # What it reads is whole events, in order, then the close event.
        expected = 1
        with trio.fail_after(10):
            while True:
                ev = await s.next_event()
                if ev.event == "close":
                    break
                if ev.event is None:
                    assert ev.json()["offset"] == expected
                    expected += 1
        assert ev.json()["code"] == 4008


async def test_limits_and_presence_apply_to_streams(start_server: Any) -> None:
    rs = await start_server(max_connections=2, presence_events=("room",))
    ws = await RawWebSocket.connect(rs.port)
    with trio.fail_after(10):
        await subscribe_reply(ws, "room")
        s, _ = await opened(rs.port, "topic=room")
        async with s.stream:
            joined = await ws.recv_json()
            assert (joined["op"], joined["client"]["transport"]) == ("join", "sse")
            over = await SseStream.open(rs.port, "topic=room")
            async with over.stream:
                assert over.status == 503 and "max_connections" in (await over.body()).decode()
            # Presence reaches the stream too (framed once, no id).
            await ws.send_json({"op": "unsubscribe", "topic": "room", "id": 2})
            leave = await s.next_event()
            assert leave.json()["op"] == "leave" and leave.id is None
        await ws.aclose()


async def test_a_stream_that_goes_away_is_forgotten(start_server: Any) -> None:
    rs = await start_server()
    s, _ = await opened(rs.port, "topic=a")
    await s.aclose()
    await wait_until(lambda: not rs.server.hub.topics(), what="the stream's subscription to go")
    assert rs.server.statistics().sse_connections == 0


async def test_plain_since_per_topic_after_a_websocket(start_server: Any) -> None:
    """A client that kept (epoch, offset) from a WebSocket resumes on a stream."""
    rs = await start_server()
    ws = await RawWebSocket.connect(rs.port)
    async with ws.stream:
        reply = await subscribe_reply(ws, "p")
        await http_publish(rs.port, "p", 1)
        assert (await next_pub(ws))["offset"] == 1
    for i in (2, 3):
        await http_publish(rs.port, "p", i)
    s = await SseStream.open(rs.port, f"topic=p&topic=q&since.p={reply['epoch']}:1")
    async with s.stream:
        assert [(await s.next_event()).json()["offset"] for _ in range(2)] == [2, 3]
        summary = (await s.next_event()).json()["topics"]
        assert [(t["topic"], t.get("recovered")) for t in summary] == [("p", True), ("q", None)]
    s = await SseStream.open(rs.port, "topic=p&since.p=nocolon")
    async with s.stream:
        assert s.status == 400 and "since.p" in json.loads(await s.body())["error"]["message"]
