"""Connection tokens end to end: who gets in, what they may do, expiry and refresh."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import trio

from ..peers import OP_CLOSE, NdjsonClient, RawWebSocket, http_request, open_socket, upgrade_head

pytestmark = pytest.mark.system

SECRET = "test-secret-0123456789-0123456789-abcdef"
LIMIT = 20


def token(sub: str = "alice", ttl: float = 3600, key: str = SECRET, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, key, algorithm="HS256")


async def closed_with(ws: RawWebSocket) -> tuple[int | None, str]:
    while True:
        frame = await ws.recv_frame()
        if frame.opcode == OP_CLOSE:
            return frame.close_code, frame.close_reason


async def test_valid_token_subscribes_within_its_claim(start_server: Any) -> None:
    rs = await start_server(token_secret=SECRET)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port, path="/ws?token=" + token(subscribe=["chat.*"]))
        async with ws.stream:
            await ws.send_json({"op": "subscribe", "topic": "chat.lobby", "id": 1})
            assert (await ws.recv_json())["ok"] is True
            await ws.send_json({"op": "subscribe", "topic": "news", "id": 2})
            reply = await ws.recv_json()
            assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
            assert "news" in reply["error"]["message"]
            await ws.send_json({"op": "publish", "topic": "chat.lobby", "data": 1, "id": 3})
            assert (await ws.recv_json())["error"]["code"] == "forbidden"
            await ws.send_json({"op": "presence", "topic": "chat.lobby", "id": 4})
            assert (await ws.recv_json())["error"]["code"] == "forbidden"


async def test_publish_and_presence_claims(start_server: Any) -> None:
    rs = await start_server(token_secret=SECRET)
    t = token(sub="bob", subscribe=["room"], publish=["room"], presence=True)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port, path="/ws?token=" + t)
        async with ws.stream:
            await ws.send_json({"op": "subscribe", "topic": "room", "id": 1})
            await ws.recv_json()
            await ws.send_json({"op": "publish", "topic": "room", "data": "hi", "id": 2})
            replies = [await ws.recv_json(), await ws.recv_json()]
            assert {"id": 2, "ok": True, "offset": 1, "subscribers": 1} in replies
            await ws.send_json({"op": "presence", "topic": "room", "id": 3})
            reply = await ws.recv_json()
            assert [c["client"] for c in reply["clients"]] == ["bob"]


@pytest.mark.parametrize(
    ("path", "code_in_reason"),
    [
        ("/ws", "token_missing"),
        ("/ws?token=garbage", "token_invalid"),
        ("/ws?token=" + token(ttl=-10), "token_expired"),
        ("/ws?token=" + token(key="not-the-secret-but-long-enough-1234567"), "bad_signature"),
    ],
)
async def test_refused_tokens_close_4001_with_a_named_reason(
    start_server: Any, path: str, code_in_reason: str
) -> None:
    rs = await start_server(token_secret=SECRET)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port, path=path)
        async with ws.stream:
            code, reason = await closed_with(ws)
    assert code == 4001 and code_in_reason in reason
    assert rs.server.statistics().auth_failures == 1
    # The server carries on for a valid client.
    with trio.fail_after(LIMIT):
        ok = await RawWebSocket.connect(rs.port, path="/ws?token=" + token(subscribe=["*"]))
        async with ok.stream:
            await ok.send_json({"op": "ping", "id": 1})
            assert (await ok.recv_json())["op"] == "pong"


async def test_bearer_header_on_the_upgrade(start_server: Any) -> None:
    rs = await start_server(token_secret=SECRET)
    with trio.fail_after(LIMIT):
        stream = await open_socket(rs.port)
        async with stream:
            head, _ = upgrade_head(rs.port)
            head = head.replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {token()}\r\n\r\n".encode())
            await stream.send_all(head)
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101 ")
    assert rs.server.statistics().auth_failures == 0


async def test_anonymous_can_be_allowed_beside_tokens(start_server: Any) -> None:
    rs = await start_server(token_secret=SECRET, anonymous=True, client_publish=False)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            await ws.send_json({"op": "subscribe", "topic": "anything", "id": 1})
            assert (await ws.recv_json())["ok"] is True
            await ws.send_json({"op": "publish", "topic": "anything", "data": 1, "id": 2})
            assert (await ws.recv_json())["error"]["code"] == "forbidden"


async def test_tcp_connect_line(start_server: Any) -> None:
    rs = await start_server(token_secret=SECRET)
    with trio.fail_after(LIMIT):
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            await client.send({"op": "connect", "token": "bad", "id": 1})
            reply = await client.recv()
            assert reply["ok"] is False and reply["error"]["code"] == "unauthorized"
            await client.send({"op": "connect", "token": token(subscribe=["t"]), "id": 2})
            assert await client.recv() == {"id": 2, "ok": True, "client": "alice"}
            await client.send({"op": "subscribe", "topic": "t", "id": 3})
            assert (await client.recv())["ok"] is True
        other = await NdjsonClient.connect(rs.tcp_port)
        async with other.stream:
            await other.send({"op": "subscribe", "topic": "t"})
            line = await other.recv()
            assert line["op"] == "close" and line["code"] == 4001 and "connect" in line["reason"]


async def test_expiry_refresh_required_then_refresh(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(token_secret=SECRET, refresh_grace=30, ping_interval=1000)
    with trio.fail_after(1000):
        ws = await RawWebSocket.connect(rs.port, path="/ws?token=" + token(ttl=60, subscribe=["*"]))
        async with ws.stream:
            start = trio.current_time()
            assert await ws.recv_json() == {"op": "refresh_required"}
            assert trio.current_time() - start == pytest.approx(60, abs=2)
            await ws.send_json({"op": "refresh", "token": token(ttl=3600), "id": 9})
            assert await ws.recv_json() == {"id": 9, "ok": True, "client": "alice"}
            await trio.sleep(120)  # past the old expiry and grace: still connected
            await ws.send_json({"op": "ping", "id": 10})
            assert (await ws.recv_json())["id"] == 10


async def test_expiry_without_refresh_closes_4001(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(token_secret=SECRET, refresh_grace=30, ping_interval=1000)
    with trio.fail_after(1000):
        ws = await RawWebSocket.connect(rs.port, path="/ws?token=" + token(ttl=60))
        async with ws.stream:
            assert await ws.recv_json() == {"op": "refresh_required"}
            start = trio.current_time()
            code, reason = await closed_with(ws)
            assert trio.current_time() - start == pytest.approx(30, abs=1)
    assert code == 4001 and "expired" in reason


async def test_refresh_for_another_subject_is_refused(start_server: Any) -> None:
    rs = await start_server(token_secret=SECRET)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port, path="/ws?token=" + token())
        async with ws.stream:
            await ws.send_json({"op": "refresh", "token": token(sub="mallory"), "id": 1})
            reply = await ws.recv_json()
            assert reply["error"]["code"] == "unauthorized" and "mallory" in reply["error"]["message"]


async def test_origin_check(start_server: Any) -> None:
    rs = await start_server(allowed_origins=("https://app.example",))
    with trio.fail_after(LIMIT):
        for origin, status in (("https://app.example", b"101"), ("https://evil.example", b"403")):
            stream = await open_socket(rs.port)
            async with stream:
                head, _ = upgrade_head(rs.port)
                await stream.send_all(head.replace(b"\r\n\r\n", f"\r\nOrigin: {origin}\r\n\r\n".encode()))
                response = await stream.receive_some(4096)
                assert response.split(b" ")[1] == status, response
                if status == b"403":
                    assert b"evil.example" in response


async def test_history_api_needs_the_api_key(start_server: Any) -> None:
    rs = await start_server(api_key="k3y")
    rs.server.hub.publish_nowait("t", 1)
    await rs.server.hub.flush()
    with trio.fail_after(LIMIT):
        assert (await http_request(rs.port, "GET", "/api/history?topic=t")).status == 401
        ok = await http_request(rs.port, "GET", "/api/history?topic=t",
                                headers=[("Authorization", "Bearer k3y")])
    assert ok.status == 200 and [p["data"] for p in ok.json()["publications"]] == [1]
