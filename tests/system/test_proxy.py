"""The proxy to the application's backend (docs/backend.md), against a real HTTP backend.

Each endpoint allows and refuses; then a backend that is slow, down, or
answering garbage: the client gets 503 / ``unavailable``, nothing is accepted
silently, and other clients carry on.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

import jwt
import pytest
import trio

from ..peers import NdjsonClient, RawWebSocket, Refused, SseStream, http_publish, http_request
from .appbackend import HOLD, AppBackend, app_backend
from .helpers import next_pub

pytestmark = pytest.mark.system

LIMIT = 15
SECRET = "proxy-test-secret-0123456789-0123456789"


def proxied(backend: AppBackend, *paths: str, **config: Any) -> dict[str, Any]:
    """Config for a server whose ``proxy_<path>_url`` point at *backend*."""
    return {**{f"proxy_{p}_url": backend.url(f"/{p}") for p in paths}, **config}


async def test_connect_proxy_lets_in_a_user_and_forwards_the_configured_headers(start_server: Any) -> None:
    async with app_backend() as backend:
        backend.replies["/connect"] = {"result": {"user": "alice", "data": {"plan": "pro"}}}
        rs = await start_server(**proxied(backend, "connect"))
        with trio.fail_after(LIMIT):
            ws = await RawWebSocket.connect(rs.port, headers=[
                ("Cookie", "session=abc"), ("Authorization", "Session xyz"), ("X-Other", "no")])
            async with ws.stream:
                await ws.request({"op": "subscribe", "topic": "room", "id": 1})
                reply = await ws.request({"op": "presence", "topic": "room", "id": 2})
                assert [c["client"] for c in reply["clients"]] == ["alice"]
                conn = reply["clients"][0]["conn"]
            (req,) = await backend.wait_for("/connect")
            assert req.json() == {"client": conn, "transport": "websocket", "remote": "127.0.0.1",
                                  "headers": {"Cookie": "session=abc", "Authorization": "Session xyz"}}


async def test_connect_proxy_refusal_is_the_upgrade_status(start_server: Any) -> None:
    async with app_backend() as backend:
        rs = await start_server(**proxied(backend, "connect"))
        with trio.fail_after(LIMIT):
            for code, status in ((401, 401), (403, 403), (7, 403)):
                backend.replies["/connect"] = {"error": {"code": code, "message": "who are you?"}}
                with pytest.raises(Refused) as refused:
                    await RawWebSocket.connect(rs.port)
                assert refused.value.status == status
                assert json.loads(refused.value.body)["error"] == {"code": "forbidden",
                                                                   "message": "who are you?"}
        assert rs.server.connections == frozenset()


async def test_tcp_connect_goes_through_the_proxy(start_server: Any) -> None:
    async with app_backend() as backend:
        backend.replies["/connect"] = lambda body: (
            {"result": {"user": "bob"}} if len(backend.requests("/connect")) == 1
            else {"error": {"code": 403, "message": "banned"}})
        rs = await start_server(**proxied(backend, "connect"))
        with trio.fail_after(LIMIT):
            tcp = await NdjsonClient.connect(rs.tcp_port)
            async with tcp.stream:
                # No claims before connect, even though anonymous clients are allowed.
                await tcp.send({"op": "subscribe", "topic": "t", "id": 0})
                assert (await tcp.recv())["code"] == 4001
            tcp = await NdjsonClient.connect(rs.tcp_port)
            async with tcp.stream:
                assert await tcp.request({"op": "connect", "id": 1}) == {"id": 1, "ok": True, "client": "bob"}
                assert (await tcp.request({"op": "subscribe", "topic": "t", "id": 2}))["ok"] is True
            tcp = await NdjsonClient.connect(rs.tcp_port)
            async with tcp.stream:
                await tcp.send({"op": "connect", "id": 1})
                assert await tcp.recv() == {"op": "close", "code": 4003, "reason": "banned"}
            assert [r.json()["transport"] for r in backend.requests("/connect")] == ["tcp", "tcp"]


async def test_a_valid_token_skips_the_connect_proxy(start_server: Any) -> None:
    async with app_backend() as backend:
        backend.replies["/connect"] = {"result": {"user": "from-backend"}}
        rs = await start_server(**proxied(backend, "connect", token_secret=SECRET))
        claims = {"sub": "tok", "exp": int(time.time()) + 600, "presence": True, "subscribe": ["*"]}
        good = jwt.encode(claims, SECRET)
        bad = jwt.encode(claims, "another-secret-0123456789-0123456789")
        with trio.fail_after(LIMIT):
            for token, who in ((good, "tok"), (bad, "from-backend")):
                ws = await RawWebSocket.connect(rs.port, path=f"/ws?token={token}")
                async with ws.stream:
                    await ws.request({"op": "subscribe", "topic": "room", "id": 1})
                    reply = await ws.request({"op": "presence", "topic": "room", "id": 2})
                    assert [c["client"] for c in reply["clients"]] == [who]
            tcp = await NdjsonClient.connect(rs.tcp_port)
            async with tcp.stream:
                reply = await tcp.request({"op": "connect", "token": good, "id": 1})
                assert reply == {"id": 1, "ok": True, "client": "tok"}
        # Only the upgrade with the bad token asked.
        assert len(backend.requests("/connect")) == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


GARBAGE: list[tuple[str, Any, str]] = [
    ("not JSON", (200, b"<html>oops</html>"), "not JSON"),
    ("wrong shape", {"allow": True}, "must be"),
    ("a list", (200, b"[1, 2]"), "must be"),
    ("no user", {"result": {"data": {}}}, "non-empty string"),
    ("a bad error", {"error": "no"}, "must be"),
    ("status 500", (500, b'{"result": {"user": "x"}}'), "HTTP status 500"),
]


@pytest.mark.parametrize(("what", "reply", "logged"), GARBAGE, ids=[g[0] for g in GARBAGE])
async def test_a_bad_connect_answer_is_503_and_logged(start_server: Any, caplog: pytest.LogCaptureFixture,
                                                     what: str, reply: Any, logged: str) -> None:
    async with app_backend() as backend:
        backend.replies["/connect"] = reply
        rs = await start_server(**proxied(backend, "connect"))
        with trio.fail_after(LIMIT), caplog.at_level(logging.WARNING, "trioserve.proxy"):
            with pytest.raises(Refused) as refused:
                await RawWebSocket.connect(rs.port)
            assert refused.value.status == 503
            assert json.loads(refused.value.body)["error"]["code"] == "unavailable"
            tcp = await NdjsonClient.connect(rs.tcp_port)
            async with tcp.stream:
                reply = await tcp.request({"op": "connect", "id": 1})
                assert reply["error"]["code"] == "unavailable"
                # Never accepted silently: still no claims.
                await tcp.send({"op": "subscribe", "topic": "t", "id": 2})
                assert (await tcp.recv())["code"] == 4001
        assert any(logged in r.getMessage() for r in caplog.records), caplog.text


async def test_a_backend_that_is_down_is_503(start_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    rs = await start_server(proxy_connect_url=f"{url}/connect", proxy_subscribe_url=f"{url}/subscribe")
    with trio.fail_after(LIMIT), caplog.at_level(logging.WARNING, "trioserve.proxy"):
        with pytest.raises(Refused) as refused:
            await RawWebSocket.connect(rs.port)
        assert refused.value.status == 503
    assert "unreachable" in caplog.text


async def test_subscribe_and_publish_proxies_allow_refuse_and_replace(start_server: Any) -> None:
    def subscribe(body: bytes) -> Any:
        topic = json.loads(body)["topic"]
        return {"error": {"code": 403, "message": "not for you"}} if topic == "secret" else {"result": {}}

    def publish(body: bytes) -> Any:
        req = json.loads(body)
        if req["topic"] == "ro":
            return {"error": {"code": 403, "message": "read-only"}}
        if req["topic"] == "keep":
            return {"result": {}}
        return {"result": {"data": {"text": req["data"]["text"].upper(), "by": req["user"]}}}

    async with app_backend() as backend:
        backend.replies.update({"/connect": {"result": {"user": "carol"}}, "/subscribe": subscribe,
                                "/publish": publish})
        # client_publish is off: the publish proxy decides instead.
        rs = await start_server(**proxied(backend, "connect", "subscribe", "publish"))
        with trio.fail_after(LIMIT):
            ws = await RawWebSocket.connect(rs.port)
            async with ws.stream:
                reply = await ws.request({"op": "subscribe", "topic": "secret", "id": 1})
                assert reply["error"] == {"code": "forbidden", "message": "not for you"}
                for topic in ("room", "keep"):
                    assert (await ws.request({"op": "subscribe", "topic": topic, "id": 2}))["ok"] is True
                await ws.send_json({"op": "publish", "topic": "room", "data": {"text": "hi"}, "id": 3})
                assert (await next_pub(ws))["data"] == {"text": "HI", "by": "carol"}
                await ws.send_json({"op": "publish", "topic": "keep", "data": [1], "id": 4})
                assert (await next_pub(ws))["data"] == [1]
                reply = await ws.request({"op": "publish", "topic": "ro", "data": 1, "id": 5})
                assert reply["error"] == {"code": "forbidden", "message": "read-only"}
                # A batch goes through the same proxy, entry by entry; one refusal refuses it whole.
                reply = await ws.request({"op": "publish_batch", "id": 6, "publications": [
                    {"topic": "room", "data": {"text": "a"}}, {"topic": "ro", "data": 2}]})
                assert reply["error"] == {"code": "forbidden", "message": "read-only"}
                await ws.send_json({"op": "publish_batch", "id": 7, "publications": [
                    {"topic": "room", "data": {"text": "b"}}, {"topic": "keep", "data": [2]}]})
                # The fan-out may run before the reply is written: take the three in any order.
                got = [await ws.recv_json() for _ in range(3)]
                (reply,) = [m for m in got if m.get("id") == 7]
                assert reply["ok"] is True and len(reply["results"]) == 2, reply
                assert [m["data"] for m in got if m.get("op") == "pub"] == [{"text": "B", "by": "carol"}, [2]]
        sub = backend.requests("/subscribe")[0].json()
        assert sub == {"client": sub["client"], "user": "carol", "transport": "websocket", "topic": "secret"}
        pub = backend.requests("/publish")[0].json()
        assert pub["topic"] == "room" and pub["data"] == {"text": "hi"} and pub["user"] == "carol"


async def test_rpc_is_forwarded_and_answered(start_server: Any) -> None:
    def rpc(body: bytes) -> Any:
        req = json.loads(body)
        if req["method"] == "sum":
            return {"result": sum(req["data"])}
        return {"error": {"code": 404, "message": f"no {req['method']}"}}

    async with app_backend() as backend:
        backend.replies["/rpc"] = rpc
        rs = await start_server(**proxied(backend, "rpc"))
        with trio.fail_after(LIMIT):
            tcp = await NdjsonClient.connect(rs.tcp_port)
            async with tcp.stream:
                assert await tcp.request({"op": "rpc", "method": "sum", "data": [1, 2], "id": 1}) == \
                    {"id": 1, "ok": True, "result": 3}
                assert (await tcp.request({"op": "rpc", "method": "x", "id": 2}))["error"] == \
                    {"code": "rpc_error", "message": "no x", "status": 404}
        assert backend.requests("/rpc")[0].json()["user"] == ""  # anonymous


async def test_the_python_client_calls_rpc(start_server: Any) -> None:
    from trioserve.client import ServerError, connect

    async with app_backend() as backend:
        backend.replies["/rpc"] = lambda body: (
            {"result": {"echo": json.loads(body)["data"]}} if json.loads(body)["method"] == "echo"
            else {"error": {"code": 409, "message": "busy"}})
        rs = await start_server(**proxied(backend, "rpc"))
        with trio.fail_after(LIMIT):
            async with connect(rs.ws_url) as client:
                assert await client.rpc("echo", [1, "a"]) == {"echo": [1, "a"]}
                with pytest.raises(ServerError) as caught:
                    await client.rpc("other")
                error = caught.value
                assert (error.code, error.message, error.status) == ("rpc_error", "busy", 409)
        # A server without an RPC backend: a named error, not a hang.
        plain = await start_server()
        with trio.fail_after(LIMIT):
            async with connect(plain.ws_url) as client:
                with pytest.raises(ServerError) as caught:
                    await client.rpc("echo")
                assert caught.value.code == "unknown_op" and caught.value.status is None


async def test_a_slow_backend_times_out_and_other_clients_carry_on(start_server: Any) -> None:
    async with app_backend() as backend:
        backend.replies["/subscribe"] = lambda body: (
            HOLD if json.loads(body)["topic"] == "slow" else {"result": {}})
        rs = await start_server(**proxied(backend, "subscribe", proxy_timeout=1.0))
        with trio.fail_after(LIMIT):
            slow = await RawWebSocket.connect(rs.port)
            other = await RawWebSocket.connect(rs.port)
            async with slow.stream, other.stream:
                assert (await other.request({"op": "subscribe", "topic": "news", "id": 1}))["ok"] is True
                await slow.send_json({"op": "subscribe", "topic": "slow", "id": 1})
                await slow.send_json({"op": "ping", "id": 2})
                await backend.wait_for("/subscribe", 2)  # the slow call is in the backend now
                # Meanwhile the server publishes to, and answers, everyone else.
                assert (await http_publish(rs.port, "news", "still here")).status == 200
                assert (await next_pub(other))["data"] == "still here"
                assert (await other.request({"op": "ping", "id": 2}))["ok"] is True
                reply = await slow.recv_json()
                assert reply["id"] == 1 and reply["error"]["code"] == "unavailable"
                assert "proxy_timeout" in reply["error"]["message"]
                # The connection's own commands keep their order behind the slow one.
                assert await slow.recv_json() == {"id": 2, "ok": True, "op": "pong"}


async def test_calls_in_flight_are_bounded(start_server: Any) -> None:
    async with app_backend() as backend:
        backend.replies["/subscribe"] = HOLD
        rs = await start_server(**proxied(backend, "connect", "subscribe", proxy_max_in_flight=1,
                                          proxy_timeout=20.0))
        backend.replies["/connect"] = {"result": {"user": "u"}}
        with trio.fail_after(LIMIT):
            first = await RawWebSocket.connect(rs.port)
            second = await RawWebSocket.connect(rs.port)
            async with first.stream, second.stream:
                await first.send_json({"op": "subscribe", "topic": "a", "id": 1})
                await backend.wait_for("/subscribe")
                reply = await second.request({"op": "subscribe", "topic": "b", "id": 1})
                assert reply["error"]["code"] == "unavailable"
                assert "proxy_max_in_flight" in reply["error"]["message"]
                with pytest.raises(Refused) as refused:
                    await RawWebSocket.connect(rs.port)
                assert refused.value.status == 503
                backend.release()
                reply = await first.recv_json()
                assert reply["id"] == 1 and reply["ok"] is True and reply["topic"] == "a"
        metrics = (await http_request(rs.port, "GET", "/metrics")).body.decode()
        assert 'trioserve_proxy_calls_total{outcome="unavailable"} 2.0' in metrics


async def test_an_sse_stream_asks_the_connect_proxy(start_server: Any) -> None:
    async with app_backend() as backend:
        backend.replies["/connect"] = lambda body: (
            {"result": {"user": "dora"}} if "session=ok" in json.loads(body)["headers"].get("Cookie", "")
            else {"error": {"code": 401, "message": "no session"}})
        rs = await start_server(**proxied(backend, "connect"))
        with trio.fail_after(LIMIT):
            refused = await SseStream.open(rs.port, "topic=room")
            assert refused.status == 401
            assert json.loads(await refused.body())["error"] == {"code": "forbidden", "message": "no session"}
            stream = await SseStream.open(rs.port, "topic=room", [("Cookie", "session=ok")])
            assert stream.status == 200
            assert (await stream.next_event()).event == "subscribed"
            ws = await RawWebSocket.connect(rs.port, headers=[("Cookie", "session=ok")])
            async with ws.stream:
                reply = await ws.request({"op": "presence", "topic": "room", "id": 1})
                (member,) = reply["clients"]
                assert (member["client"], member["transport"]) == ("dora", "sse")
            await stream.aclose()
        first = backend.requests("/connect")[1].json()
        assert first["transport"] == "sse" and first["client"] == member["conn"]


