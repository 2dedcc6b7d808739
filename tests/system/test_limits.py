"""Limits and errors: capacity, oversize and malformed input, handler failures, HTTP errors."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, open_websocket_url

from trioserve import Connection

from ..peers import (
    HOST,
    OP_CLOSE,
    OP_CONT,
    OP_TEXT,
    ByteReader,
    NdjsonClient,
    RawWebSocket,
    dumps,
    http_publish,
    http_request,
    open_socket,
    upgrade_head,
)
from .helpers import close_code, wait_until

pytestmark = pytest.mark.system


async def _request(ws: WebSocketConnection, msg: dict[str, Any]) -> Any:
    await ws.send_message(dumps(msg))
    return json.loads(await ws.get_message())


async def _assert_serving(url: str) -> None:
    async with open_websocket_url(url) as ws:
        assert await _request(ws, {"op": "ping", "id": "alive"}) == {"id": "alive", "ok": True, "op": "pong"}


# --- capacity ------------------------------------------------------------------------------------


async def test_over_max_connections_ws_gets_503_and_tcp_gets_1013(start_server: Any) -> None:
    rs = await start_server(max_connections=2)
    with trio.fail_after(15):
        async with open_websocket_url(rs.ws_url) as ws1:
            tcp = await NdjsonClient.connect(rs.tcp_port)
            async with tcp.stream:
                await tcp.send({"op": "ping", "id": 1, "x": 0})
                assert (await tcp.recv())["ok"] is True
                assert len(rs.server.connections) == 2

                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(rs.ws_url):
                        pass
                assert info.value.status_code == 503
                body = json.loads(info.value.body or b"")
                assert body["ok"] is False and body["error"]["code"] == "unavailable"

                extra = await NdjsonClient.connect(rs.tcp_port)
                async with extra.stream:
                    assert json.loads(await extra.recv_line() or b"null") == {
                        "op": "close", "code": 1013, "reason": "server at capacity",
                    }
                    assert await extra.recv_line() is None
                assert rs.server.statistics().rejected_connections >= 1

                # Existing connections are untouched by the refusals.
                assert await _request(ws1, {"op": "ping", "id": 2}) == {"id": 2, "ok": True, "op": "pong"}
            # Capacity frees up once a client leaves.
            await wait_until(lambda: len(rs.server.connections) == 1, what="TCP client to be dropped")
            await _assert_serving(rs.ws_url)


# --- client messages -------------------------------------------------------------------------------


async def test_oversize_ws_message_closes_1009_and_server_keeps_serving(start_server: Any) -> None:
    rs = await start_server(max_message_size=1024)
    with trio.fail_after(15):
        async with open_websocket_url(rs.ws_url) as ws:
            assert (await _request(ws, {"op": "ping", "id": 1}))["ok"] is True
            # Exactly the limit is allowed.
            exact = dumps({"op": "ping", "id": 2, "pad": ""})
            exact = exact.replace('"pad":""', '"pad":"' + "p" * (1024 - len(exact)) + '"')
            assert len(exact) == 1024
            assert await _request(ws, json.loads(exact)) == {"id": 2, "ok": True, "op": "pong"}
            await ws.send_message("x" * 1025)
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert close_code(info.value) == 1009
        await _assert_serving(rs.ws_url)


async def test_oversize_fragmented_ws_message_closes_1009(start_server: Any) -> None:
    # The limit is on the whole message, not on each fragment.
    rs = await start_server(max_message_size=1024)
    with trio.fail_after(15):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            await ws.send_frame(OP_TEXT, b"a" * 600, fin=False)
            await ws.send_frame(OP_CONT, b"b" * 600, fin=True)
            frame = await ws.recv_frame()
            assert frame.opcode == OP_CLOSE and frame.close_code == 1009, frame
        await _assert_serving(rs.ws_url)


async def test_invalid_utf8_text_frame_closes_1007(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            await ws.send_frame(OP_TEXT, b'{"op":"ping","id":"\xff"}')
            frame = await ws.recv_frame()
            assert frame.opcode == OP_CLOSE and frame.close_code == 1007, frame


async def test_unmasked_client_frame_closes_1002(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            await ws.send_frame(OP_TEXT, b'{"op":"ping","id":1}', mask=False)
            frame = await ws.recv_frame()
            assert frame.opcode == OP_CLOSE and frame.close_code == 1002, frame


async def test_invalid_json_gets_error_and_connection_stays_usable(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        async with open_websocket_url(rs.ws_url) as ws:
            await ws.send_message("{not json")
            reply = json.loads(await ws.get_message())
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
            assert "id" not in reply

            await ws.send_message("[1, 2]")
            reply = json.loads(await ws.get_message())
            assert reply["error"]["code"] == "bad_request"

            reply = await _request(ws, {"op": "subscribe", "id": 5})
            assert reply["id"] == 5 and reply["error"]["code"] == "bad_request"
            reply = await _request(ws, {"op": "subscribe", "topic": "has space", "id": 6})
            assert reply["id"] == 6 and reply["error"]["code"] == "bad_request"

            assert await _request(ws, {"op": "subscribe", "topic": "ok", "id": 7}) == {
                "id": 7, "ok": True, "topic": "ok", "epoch": rs.server.hub.epoch_of("ok"), "offset": 0,
            }


async def test_unknown_op_and_forbidden_publish(start_server: Any) -> None:
    rs = await start_server()  # client_publish is off by default
    with trio.fail_after(15):
        async with open_websocket_url(rs.ws_url) as ws:
            reply = await _request(ws, {"op": "frobnicate", "id": "u"})
            assert reply["id"] == "u" and reply["ok"] is False
            assert reply["error"]["code"] == "unknown_op"

            reply = await _request(ws, {"op": "publish", "topic": "t", "data": 1, "id": "f"})
            assert reply["id"] == "f" and reply["ok"] is False
            assert reply["error"]["code"] == "forbidden"
            assert rs.server.hub.statistics().publications == 0

            assert await _request(ws, {"op": "ping", "id": 1}) == {"id": 1, "ok": True, "op": "pong"}


# --- handler failure ----------------------------------------------------------------------------------


async def _echo_or_raise(conn: Connection) -> None:
    async for message in conn:
        if message == "boom":
            raise RuntimeError("the test asked for it")
        conn.send_nowait(message)


async def test_handler_exception_closes_1011_and_server_keeps_serving(start_server: Any) -> None:
    rs = await start_server(server_kwargs={"ws_handler": _echo_or_raise})
    with trio.fail_after(15):
        async with open_websocket_url(rs.ws_url) as other:
            async with open_websocket_url(rs.ws_url) as ws:
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
                await ws.send_message("boom")
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert close_code(info.value) == 1011
            await other.send_message("still here")
            assert await other.get_message() == "still here"
        async with open_websocket_url(rs.ws_url) as fresh:
            await fresh.send_message("new")
            assert await fresh.get_message() == "new"


# --- HTTP API --------------------------------------------------------------------------------------------


async def test_http_api_errors(start_server: Any) -> None:
    rs = await start_server(api_key="s3cret", max_message_size=1024)
    port = rs.port
    with trio.fail_after(15):
        resp = await http_request(port, "GET", "/healthz")
        assert (resp.status, resp.json()) == (200, {"status": "ok"})
        resp = await http_request(port, "GET", "/readyz")
        assert (resp.status, resp.json()) == (200, {"status": "ready"})

        resp = await http_publish(port, "t", 1)
        assert resp.status == 401
        assert resp.json()["error"]["code"] == "unauthorized"
        assert resp.headers.get("www-authenticate") == "Bearer"
        resp = await http_publish(port, "t", 1, api_key="wrong")
        assert resp.status == 401 and resp.json()["ok"] is False

        auth = [("Authorization", "Bearer s3cret"), ("Content-Type", "application/json")]
        resp = await http_request(port, "POST", "/api/publish", b"{nope", auth)
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request"
        resp = await http_request(port, "POST", "/api/publish", b'{"topic":"t"}', auth)
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request"
        resp = await http_request(port, "POST", "/api/publish", b'{"topic":"no spaces","data":1}', auth)
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request"

        resp = await http_request(port, "GET", "/nowhere")
        assert resp.status == 404 and resp.json()["error"]["code"] == "not_found"

        resp = await http_request(port, "GET", "/api/publish")
        assert resp.status == 405 and resp.json()["error"]["code"] == "method_not_allowed"
        assert resp.headers.get("allow") == "POST"

        big = dumps({"topic": "t", "data": "x" * 2048}).encode()
        resp = await http_request(port, "POST", "/api/publish", big, auth)
        assert resp.status == 413 and resp.json()["error"]["code"] == "too_large"

        # None of the refused requests published anything; the right one does.
        assert rs.server.hub.statistics().publications == 0
        resp = await http_publish(port, "t", {"ok": 1}, api_key="s3cret")
        assert (resp.status, resp.json()) == (200, {"ok": True, "offset": 1, "subscribers": 0})


def _post_blocking(port: int, body: bytes) -> tuple[int, bytes] | str:
    """POST the way most blocking clients do: send the whole body, then read the response."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("POST", "/api/publish", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError as exc:
        return repr(exc)
    finally:
        conn.close()


async def test_http_413_reaches_a_client_still_sending_a_large_body(start_server: Any) -> None:
    # 8 MB is more than the socket buffers between client and server hold, so the
    # client is still sending when the server answers 413. If the server then
    # closes with the rest unread, the kernel resets the connection and the
    # client sees ECONNRESET instead of the 413 (RFC 9112 section 9.6).
    rs = await start_server()
    body = dumps({"topic": "t", "data": "x" * 8_000_000}).encode()
    with trio.fail_after(20):
        result = await trio.to_thread.run_sync(_post_blocking, rs.port, body, abandon_on_cancel=True)
    assert isinstance(result, tuple), f"client got {result} instead of a 413 response"
    status, resp_body = result
    assert status == 413 and json.loads(resp_body)["error"]["code"] == "too_large"
    assert rs.server.hub.statistics().publications == 0


async def test_http_expect_100_continue_is_answered_before_the_body(start_server: Any) -> None:
    # Clients that send "Expect: 100-continue" (curl for large bodies, .NET,
    # many proxies) hold the body back until the server answers; RFC 9110
    # section 10.1.1 requires a 100 or a final status right after the headers.
    rs = await start_server()
    body = dumps({"topic": "t", "data": "after continue"}).encode()
    head = (f"POST /api/publish HTTP/1.1\r\nHost: {HOST}:{rs.port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n").encode()
    with trio.fail_after(15):
        stream = await open_socket(rs.port)
        async with stream:
            await stream.send_all(head)
            reader = ByteReader(stream)
            interim: bytes | None = None
            # curl waits 1 s before sending the body anyway; a server slower
            # than that is what this test is about.
            with trio.move_on_after(1.0):
                interim = await reader.read_until(b"\r\n\r\n")
            assert interim is not None, "no 100 Continue (or final status) within 1 s of the headers"
            assert interim.startswith(b"HTTP/1.1 100"), interim
            await stream.send_all(body)
            final = await reader.read_until(b"\r\n\r\n")
            assert final is not None and final.startswith(b"HTTP/1.1 200"), final
    assert rs.server.hub.statistics().publications == 1


async def test_http_keep_alive_serves_several_requests(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", rs.port)
        async with stream:
            req = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{rs.port}\r\n\r\n".encode()
            # Pipelined: both requests in one segment.
            await stream.send_all(req + req)
            data = b""
            while data.count(b'{"status":"ok"}') < 2:
                chunk = await stream.receive_some(65536)
                assert chunk, f"closed early: {data!r}"
                data += chunk
            assert data.count(b"HTTP/1.1 200 ") == 2


# --- invalid upgrades -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key", "version", "status", "header"),
    [
        ("/ws", "not-a-valid-key!", "13", 400, None),
        ("/ws", "c2hvcnQ=", "13", 400, None),  # valid base64, but not 16 bytes
        ("/ws", None, "8", 426, ("sec-websocket-version", "13")),
        ("/elsewhere", None, "13", 404, None),
    ],
    ids=["bad-key", "short-key", "version-8", "wrong-path"],
)
async def test_invalid_upgrade_requests(
    start_server: Any, path: str, key: str | None, version: str, status: int,
    header: tuple[str, str] | None,
) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        head, _ = upgrade_head(rs.port, path, key=key, version=version)
        resp = await http_request(rs.port, "GET", "", raw_head=head)
        assert resp.status == status, resp
        body = resp.json()
        assert body["ok"] is False
        assert body["error"]["code"] == ("not_found" if status == 404 else "bad_request")
        if header is not None:
            assert resp.headers.get(header[0]) == header[1]
        assert not rs.server.connections
        await _assert_serving(rs.ws_url)


async def test_upgrade_with_post_is_refused(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        head, _ = upgrade_head(rs.port)
        head = head.replace(b"GET ", b"POST ", 1)
        resp = await http_request(rs.port, "POST", "", raw_head=head)
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request"
