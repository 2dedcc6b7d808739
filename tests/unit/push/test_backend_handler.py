"""The push handler with an application backend (the proxy seam, push/backend.py).

The backend here is a plain object with the Backend protocol's methods; the
HTTP side (server/proxy.py) is tested against real backends in
tests/system/test_proxy.py.
"""

from __future__ import annotations

from typing import Any

import attrs

from trioserve import Config
from trioserve.protocol.claims import ANONYMOUS, Claims
from trioserve.protocol.codes import CloseCode
from trioserve.push.backend import (
    BackendRefused,
    BackendUnavailable,
    CallerInfo,
    ConnectRequest,
    ConnectResult,
)

from .test_handler import Context, FakeClient, run


@attrs.define
class Backend:
    """Answers from a table: topic or method -> result, BackendRefused or BackendUnavailable."""

    answers: dict[str, Any] = attrs.Factory(dict)
    calls: list[tuple[str, Any]] = attrs.Factory(list)
    connect_proxied: bool = True
    subscribe_proxied: bool = True
    publish_proxied: bool = True
    rpc_proxied: bool = True

    def _answer(self, key: str, default: Any) -> Any:
        answer = self.answers.get(key, default)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def subscribe(self, caller: CallerInfo, topic: str) -> None:
        self.calls.append(("subscribe", (caller, topic)))
        self._answer(topic, None)

    async def publish(self, caller: CallerInfo, topic: str, data: Any) -> Any:
        self.calls.append(("publish", (caller, topic, data)))
        return self._answer(topic, data)

    async def rpc(self, caller: CallerInfo, method: str, data: Any) -> Any:
        self.calls.append(("rpc", (caller, method, data)))
        return self._answer(method, None)

    async def connect(self, request: ConnectRequest) -> ConnectResult:
        self.calls.append(("connect", request))
        return self._answer("connect", ConnectResult("alice", {"plan": "pro"}))  # type: ignore[no-any-return]


def codes(replies: list[Any]) -> list[Any]:
    return [r["error"]["code"] if not r.get("ok", True) else "ok" for r in replies if "id" in r]


async def test_subscribe_asks_the_backend_and_a_refusal_is_forbidden() -> None:
    backend = Backend({"secret": BackendRefused(403, "not yours"),
                       "down": BackendUnavailable("the application's backend failed: HTTP status 500")})
    ctx = Context(backend=backend)
    conn = FakeClient([{"op": "subscribe", "topic": t, "id": i}
                       for i, t in enumerate(["room", "secret", "down"])])
    replies = await run(ctx, conn)
    assert codes(replies) == ["ok", "forbidden", "unavailable"]
    assert replies[1]["error"]["message"] == "not yours"
    assert "HTTP status 500" in replies[2]["error"]["message"]
    assert ctx.hub.topics_of(conn) == frozenset({"room"})  # type: ignore[arg-type]
    caller = backend.calls[0][1][0]
    assert caller == CallerInfo("c7", "", "fake")  # anonymous: user ""


async def test_publish_proxy_decides_instead_of_client_publish_and_may_replace_data() -> None:
    backend = Backend({"edited": {"text": "[edited]"}, "no": BackendRefused(403, "read-only")})
    ctx = Context(config=Config(client_publish=False), backend=backend)
    claims = Claims(sub="bob", publish=())
    conn = FakeClient([{"op": "subscribe", "topic": "edited", "id": 0},
                       {"op": "publish", "topic": "edited", "data": {"text": "raw"}, "id": 1},
                       {"op": "publish", "topic": "no", "data": 1, "id": 2}], claims=claims)
    replies = await run(ctx, conn)
    assert codes(replies) == ["ok", "ok", "forbidden"]
    pubs = [r for r in replies if r.get("op") == "pub"]
    assert pubs == [{"op": "pub", "topic": "edited", "offset": 1, "data": {"text": "[edited]"}}]
    assert backend.calls[1] == ("publish", (CallerInfo("c7", "bob", "fake"), "edited", {"text": "raw"}))


async def test_rpc_result_error_and_no_backend() -> None:
    backend = Backend({"add": 3, "fail": BackendRefused(409, "conflict")})
    conn = FakeClient([{"op": "rpc", "method": "add", "data": [1, 2], "id": 1},
                       {"op": "rpc", "method": "fail", "id": 2},
                       {"op": "rpc", "id": 3}])
    replies = await run(Context(backend=backend), conn)
    assert replies[0] == {"id": 1, "ok": True, "result": 3}
    assert replies[1] == {"id": 2, "ok": False,
                          "error": {"code": "rpc_error", "message": "conflict", "status": 409}}
    assert codes(replies)[2] == "bad_request"  # no method
    replies = await run(Context(), FakeClient([{"op": "rpc", "method": "add", "id": 1}]))
    assert replies[0]["error"]["code"] == "unknown_op"
    assert "proxy_rpc_url" in replies[0]["error"]["message"]


async def test_tcp_connect_without_token_asks_the_connect_proxy() -> None:
    backend = Backend()
    ctx = Context(backend=backend)
    conn = FakeClient([{"op": "connect", "id": 1}, {"op": "subscribe", "topic": "t", "id": 2}], claims=None)
    replies = await run(ctx, conn)
    assert replies[0] == {"id": 1, "ok": True, "client": "alice", "data": {"plan": "pro"}}
    assert codes(replies) == ["ok", "ok"]
    assert conn.claims is not None and conn.claims.sub == "alice"
    assert ctx.events == [("connect", "alice")]
    assert backend.calls[0] == ("connect", ConnectRequest("c7", "fake", "127.0.0.1"))


async def test_tcp_connect_refused_closes_4003_and_unavailable_lets_it_retry() -> None:
    refused = FakeClient([{"op": "connect", "id": 1}], claims=None)
    await run(Context(backend=Backend({"connect": BackendRefused(403, "banned")})), refused)
    assert refused.closed == (CloseCode.FORBIDDEN, "banned")
    assert refused.claims is None
    down = FakeClient([{"op": "connect", "id": 1}], claims=None)
    replies = await run(Context(backend=Backend({"connect": BackendUnavailable("timed out")})), down)
    assert codes(replies) == ["unavailable"] and down.claims is None and down.closed is None


async def test_connect_without_token_and_without_proxy_is_a_bad_request() -> None:
    replies = await run(Context(), FakeClient([{"op": "connect", "id": 1}], claims=None))
    assert replies[0]["error"] == {"code": "bad_request", "message": "'token' must be a non-empty string"}


async def test_unsubscribe_tells_the_server_once() -> None:
    ctx = Context()
    conn = FakeClient([{"op": "subscribe", "topic": "t", "id": 1},
                       {"op": "unsubscribe", "topic": "t", "id": 2},
                       {"op": "unsubscribe", "topic": "t", "id": 3}], claims=ANONYMOUS)
    await run(ctx, conn)
    assert ctx.events == [("unsubscribe", "t")]
