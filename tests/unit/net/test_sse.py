"""SseConnection: its head, its refusals, the per-stream id on shared events, heartbeats, close."""

from __future__ import annotations

from typing import Any

import trio

from trioserve import Config, ConnectionClosed
from trioserve.net.httpd import Request
from trioserve.net.sse import SSE, SseConnection

from ..helpers import PairFactory

CORS = [(b"access-control-allow-origin", b"*")]


class Cursor:
    """A stand-in position: the id is the key and the offset."""

    def id_line(self, key: str, offset: int) -> bytes:
        return b"id: %s-%d\n\n" % (key.encode(), offset)


async def read_all(stream: trio.abc.Stream) -> bytes:
    """To the server's EOF; then the client closes too, which ends the server's wait."""
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    return data


async def start(nursery: trio.Nursery, pair: PairFactory, **config: Any) -> tuple[SseConnection, Any]:
    transport, client = pair()
    request = Request("GET", "/sse", {"topic": ["t"]}, [], b"", "peer")

    async def serve(task_status: trio.TaskStatus[SseConnection]) -> None:
        async with trio.open_nursery() as writers:
            conn = SseConnection(transport, Config(**config), writers, "peer", request, CORS)
            task_status.started(conn)
            try:
                while True:
                    await conn.receive()
            except ConnectionClosed:
                pass
            await conn.close()

    return await nursery.start(serve), client


async def test_head_shared_events_with_each_streams_id_then_close(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, client = await start(nursery, pair)
        assert conn.take_request().query == {"topic": ["t"]}
        assert conn.accept(b"event: subscribed\ndata: {}\n\n")
        conn.cursor = Cursor()
        data = SSE.frame_open is not None and SSE.frame_open([b"1", b"2"])
        assert data == b"data: 1\n\ndata: 2\n"
        assert conn.send_at(data, 2, "t", 9)
        conn.send_encoded(b'{"op":"join"}')  # presence: a whole event, no id
        conn.start_close(1001)
        out = await read_all(client)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK", b"server: trioserve", b"content-type: text/event-stream",
        b"cache-control: no-store", b"x-accel-buffering: no", b"connection: close",
        b"access-control-allow-origin: *"]
    events, _, close = body.rpartition(b"event: close\n")
    assert events == (b"retry: 2000\n\nevent: subscribed\ndata: {}\n\n"
                      b"data: 1\n\ndata: 2\nid: t-9\n\ndata: {\"op\":\"join\"}\n\n")
    assert close.startswith(b'data: {"code":1001,"reason":"going away"}\nretry: ')
    assert close.endswith(b"\n\n") and 1000 <= int(close.split(b"retry: ")[1]) <= 5000
    assert conn.close_code == 1001


async def test_a_refusal_before_the_head_is_an_http_error(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, client = await start(nursery, pair)
        conn.refuse(403, "forbidden", "not that topic")
        out = await read_all(client)
    assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"access-control-allow-origin: *\r\n" in out
    assert out.endswith(b'\r\n\r\n{"ok":false,"error":{"code":"forbidden","message":"not that topic"}}')
    assert not conn.accept()  # too late: the answer went out


async def test_a_token_refused_by_the_server_is_a_401(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, client = await start(nursery, pair)
        conn.start_close(4001, "unauthorized: token_expired")
        out = await read_all(client)
    assert out.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert out.endswith(b'{"ok":false,"error":{"code":"unauthorized",'
                        b'"message":"unauthorized: token_expired"}}')


async def test_heartbeats_are_comments_and_a_reading_peer_stays(pair: PairFactory,
                                                                autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        conn, client = await start(nursery, pair, ping_interval=25, ping_timeout=10)
        conn.accept()
        got = b""
        while got.count(b":\n\n") < 3:
            got += await client.receive_some(65536)
        assert conn.state.value == "open"
        assert got.endswith(b"retry: 2000\n\n:\n\n:\n\n:\n\n")
        nursery.cancel_scope.cancel()
