"""The h11 HTTP driver on its own: an HttpSite with its own routes, over a
memory stream, with no Server and no socket."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing

from trioserve import Config
from trioserve.net.admission import Admission, IdleScopes
from trioserve.net.httpd import HttpSite, Request, Response, Router, Upgrade, json_response, serve_http
from trioserve.net.transport import StreamTransport

UPGRADE = (b"GET /ws?token=abc HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


async def hello(req: Request) -> Response:
    return json_response(200, {"path": req.path, "query": req.query, "body": req.body.decode()})


async def broken(req: Request) -> Response:
    raise RuntimeError("a route bug")


def make_site(**config: Any) -> HttpSite:
    cfg = Config(**config)
    admission = Admission(cfg, set())
    admission.max_connections = 10
    router = Router({("GET", "/hello"): hello, ("POST", "/hello"): hello, ("GET", "/broken"): broken})
    return HttpSite(cfg, admission, IdleScopes(), router, {"/ws"})


async def exchange(site: HttpSite, request: bytes) -> tuple[Upgrade | None, bytes]:
    """Serve *request* (then EOF) on a memory stream; what serve_http returned and what it sent."""
    server, client = trio.testing.memory_stream_pair()
    result: list[Upgrade | None] = []

    async def serve() -> None:
        result.append(await serve_http(StreamTransport(server), site, "192.0.2.1:1234"))
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(request)
        if not request.startswith(b"GET /ws"):
            await client.send_eof()
        out = b""
        while chunk := await client.receive_some():
            out += chunk
    return result[0], out


def status(out: bytes) -> int:
    return int(out.split(b" ", 2)[1])


def body(out: bytes) -> Any:
    return orjson.loads(out.split(b"\r\n\r\n", 1)[1])


async def test_a_route_answers_with_its_query_and_body() -> None:
    upgrade, out = await exchange(make_site(), b"POST /hello?a=1 HTTP/1.1\r\nHost: t\r\n"
                                               b"Content-Length: 2\r\n\r\nhi")
    assert upgrade is None and status(out) == 200
    assert body(out) == {"path": "/hello", "query": {"a": ["1"]}, "body": "hi"}


async def test_keep_alive_serves_requests_in_turn() -> None:
    _, out = await exchange(make_site(), b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n" * 2)
    assert out.count(b"HTTP/1.1 200") == 2


@pytest.mark.parametrize(("request_line", "code", "error"), [
    (b"GET /nope", 404, "not_found"),
    (b"DELETE /hello", 405, "method_not_allowed"),
    (b"GET /broken", 500, "internal"),
])
async def test_router_errors_are_named(request_line: bytes, code: int, error: str) -> None:
    _, out = await exchange(make_site(), request_line + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status(out) == code and body(out)["error"]["code"] == error
    if code == 405:
        assert b"allow: GET, POST\r\n" in out


async def test_a_body_over_max_message_size_gets_413() -> None:
    _, out = await exchange(make_site(max_message_size=10),
                            b"POST /hello HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\n" + b"x" * 11)
    assert status(out) == 413 and body(out)["error"]["code"] == "too_large"


async def test_an_upgrade_returns_the_token_and_reserves_a_slot() -> None:
    site = make_site()
    upgrade, out = await exchange(site, UPGRADE + b"\r\n")
    assert out.startswith(b"HTTP/1.1 101 ")
    assert upgrade is not None and (upgrade.path, upgrade.token, upgrade.trailing) == ("/ws", "abc", b"")
    # The slot stays reserved until the server counts the connection.
    site.admission.reserve()
    assert site.admission.refusal(None) is None


async def test_an_upgrade_while_draining_gets_503_and_is_counted() -> None:
    site = make_site()
    site.admission.draining = True
    upgrade, out = await exchange(site, UPGRADE + b"\r\n")
    assert upgrade is None and status(out) == 503
    assert body(out)["error"] == {"code": "unavailable", "message": "server is draining"}
    assert site.admission.rejected == 1


async def test_an_upgrade_at_capacity_says_when_to_retry() -> None:
    site = make_site()
    site.admission.max_connections = 0
    _, out = await exchange(site, UPGRADE + b"\r\n")
    assert status(out) == 503 and b"retry-after: 1\r\n" in out.lower()


async def test_an_upgrade_from_a_foreign_origin_is_refused() -> None:
    site = make_site(allowed_origins=["https://app.example"])
    upgrade, out = await exchange(site, UPGRADE + b"Origin: https://evil.example\r\n\r\n")
    assert upgrade is None and status(out) == 403 and body(out)["error"]["code"] == "forbidden"
    upgrade, out = await exchange(site, UPGRADE + b"Origin: https://app.example\r\n\r\n")
    assert upgrade is not None


async def test_an_upgrade_on_another_path_is_404() -> None:
    _, out = await exchange(make_site(), UPGRADE.replace(b"/ws?", b"/other?") + b"\r\n")
    assert status(out) == 404 and b"/ws" in out


async def test_closing_the_idle_scopes_ends_a_wait_for_a_request() -> None:
    site = make_site()
    server, client = trio.testing.memory_stream_pair()
    done: list[Upgrade | None] = []

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        done.append(await serve_http(StreamTransport(server), site, None))

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        await client.send_all(b"GET /hel")  # a request that never completes
        await trio.testing.wait_all_tasks_blocked()
        site.idle.close()
    assert done == [None]
