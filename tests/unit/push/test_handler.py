"""The push protocol handler on its own: a real Hub, and a connection and a
server that are only what the handler's protocols ask for (no socket)."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import pytest
import trio

from trioserve import Claims, CloseCode, Command, Config, ConnectionClosed, Hub, ProtocolError
from trioserve.protocol.claims import ANONYMOUS, AuthError
from trioserve.push.handler import client_info, push_handler

from .helpers import LINES, PipelinedBroker


class FakeClient:
    """A connection reduced to what the push handler uses."""

    transport_name = "fake"
    framing = LINES
    remote = "127.0.0.1"

    def __init__(self, messages: list[Any], claims: Claims | None = ANONYMOUS, allowed: bool = True):
        self.id = 7
        self.inbox = deque(orjson.dumps(m) if not isinstance(m, bytes) else m for m in messages)
        self.claims = claims
        self.allowed = allowed
        self.sent: list[bytes] = []
        self.closed: tuple[int, str | None] | None = None

    def set_claims(self, claims: Claims) -> None:
        self.claims = claims

    def check_rate(self) -> bool:
        return self.allowed

    def send_encoded(self, payload: bytes) -> bool:
        self.sent.append(payload)
        return True

    def send_prepared(self, data: bytes, count: int = 1) -> bool:
        self.sent.extend(data.splitlines())
        return True

    def start_close(self, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
        self.closed = (code, reason)

    async def receive(self) -> str | bytes:
        await trio.lowlevel.checkpoint()
        if not self.inbox or self.closed:
            raise ConnectionClosed(1000, None)
        return self.inbox.popleft()

    def receive_nowait(self) -> str | bytes | None:
        # Everything queued counts as already received (one chunk).
        return self.inbox.popleft() if self.inbox and not self.closed else None

    def replies(self) -> list[Any]:
        return [orjson.loads(p) for p in self.sent]


class Verifier:
    def verify(self, token: str, now: float | None = None) -> Claims:
        if token != "good":
            raise AuthError("bad_signature", "the token's signature does not verify")
        return Claims(sub="alice", exp=None, subscribe=("room.*",), publish=("room.1",), presence=True)


@attrs.define
class Context:
    """A server reduced to what the push handler uses."""

    config: Config = attrs.Factory(Config)
    hub: Hub = attrs.Factory(Hub)
    authenticator: Verifier | None = None
    ops: dict[str, Callable[[Any, Command], Awaitable[dict[str, Any] | None]]] = attrs.Factory(dict)
    op_names: frozenset[str] = frozenset()
    on_subscribe: Callable[[Any, str], None] | None = None
    auth_failures: int = 0
    backend: Any = None
    events: list[tuple[str, Any]] = attrs.Factory(list)

    def count_auth_failure(self) -> None:
        self.auth_failures += 1

    def identify(self, conn: Any) -> None:
        pass

    def unsubscribed(self, conn: Any, topic: str) -> None:
        self.events.append(("unsubscribe", topic))

    def connected(self, conn: Any) -> None:
        self.events.append(("connect", conn.claims.sub))


async def run(ctx: Context, conn: FakeClient) -> list[Any]:
    async with trio.open_nursery() as nursery:
        await nursery.start(ctx.hub.run)
        with pytest.raises(ConnectionClosed):
            await push_handler(conn, ctx)  # type: ignore[arg-type]
        await ctx.hub.flush()
        nursery.cancel_scope.cancel()
    return conn.replies()


async def test_subscribe_then_publish_reaches_the_subscriber() -> None:
    ctx = Context(config=Config(client_publish=True))
    conn = FakeClient([{"op": "subscribe", "topic": "t", "id": 1},
                       {"op": "publish", "topic": "t", "data": {"x": 1}, "id": 2}])
    replies = await run(ctx, conn)
    assert replies[0] == {"id": 1, "ok": True, "topic": "t", "epoch": ctx.hub.epoch_of("t"), "offset": 0}
    assert replies[1] == {"id": 2, "ok": True, "offset": 1, "subscribers": 1}
    assert replies[2] == {"op": "pub", "topic": "t", "offset": 1, "data": {"x": 1}}


async def test_client_publish_is_forbidden_unless_enabled() -> None:
    replies = await run(Context(), FakeClient([{"op": "publish", "topic": "t", "data": 1, "id": 3}]))
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == "forbidden"
    assert "--client-publish" in replies[0]["error"]["message"]


async def test_a_draining_hub_answers_unavailable() -> None:
    ctx = Context(config=Config(client_publish=True))
    ctx.hub.close()
    replies = await run(ctx, FakeClient([{"op": "publish", "topic": "t", "data": 1, "id": 4}]))
    assert replies[0]["error"] == {"code": "unavailable", "message": "server is draining"}
    assert replies[0]["id"] == 4


@pytest.mark.parametrize(("message", "code"), [
    (b"{not json", "bad_request"),
    ({"op": "dance", "id": 5}, "unknown_op"),
    ({"op": "subscribe", "id": 6}, "bad_request"),
])
async def test_bad_messages_get_named_errors_and_the_connection_carries_on(message: Any, code: str) -> None:
    conn = FakeClient([message, {"op": "ping", "id": 9}])
    replies = await run(Context(), conn)
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == code
    assert replies[1] == {"id": 9, "ok": True, "op": "pong"}


async def test_over_the_rate_limit_gets_rate_limited() -> None:
    replies = await run(Context(), FakeClient([{"op": "ping", "id": 1}], allowed=False))
    assert replies[0]["error"]["code"] == "rate_limited" and replies[0]["id"] == 1


async def test_recovery_replays_what_was_missed() -> None:
    ctx = Context()
    async with trio.open_nursery() as nursery:
        await nursery.start(ctx.hub.run)
        for i in range(3):
            ctx.hub.publish_nowait("t", i)
        await ctx.hub.flush()
        nursery.cancel_scope.cancel()
    since = {"epoch": ctx.hub.epoch_of("t"), "offset": 1}
    replies = await run(ctx, FakeClient([{"op": "subscribe", "topic": "t", "since": since, "id": 1}]))
    assert replies[0]["recovered"] is True and replies[0]["offset"] == 3
    assert [p["data"] for p in replies[0]["publications"]] == [1, 2]


async def test_without_claims_only_connect_is_accepted() -> None:
    conn = FakeClient([{"op": "subscribe", "topic": "t", "id": 1}], claims=None)
    assert await run(Context(authenticator=Verifier()), conn) == []
    assert conn.closed is not None and conn.closed[0] == CloseCode.UNAUTHORIZED


async def test_connect_with_a_token_sets_the_claims_and_they_are_enforced() -> None:
    ctx = Context(authenticator=Verifier())
    conn = FakeClient([{"op": "connect", "token": "bad", "id": 1},
                       {"op": "connect", "token": "good", "id": 2},
                       {"op": "subscribe", "topic": "other", "id": 3},
                       {"op": "subscribe", "topic": "room.1", "id": 4},
                       {"op": "presence", "topic": "room.1", "id": 5}], claims=None)
    replies = await run(ctx, conn)
    assert replies[0]["error"]["code"] == "unauthorized" and ctx.auth_failures == 1
    assert replies[1] == {"id": 2, "ok": True, "client": "alice"}
    assert replies[2]["error"]["code"] == "forbidden"
    assert replies[3]["ok"] is True
    assert replies[4]["clients"] == [client_info(conn)]  # type: ignore[arg-type]
    assert client_info(conn) == {"client": "alice", "conn": "c7", "transport": "fake"}  # type: ignore[arg-type]


async def test_custom_ops_and_on_subscribe_refusals() -> None:
    async def echo(conn: Any, cmd: Command) -> dict[str, Any]:
        return {"echo": cmd.fields.get("text")}

    def only_public(conn: Any, topic: str) -> None:
        if not topic.startswith("public."):
            raise ProtocolError("forbidden", "public topics only")

    ctx = Context(ops={"echo": echo}, op_names=frozenset({"echo"}), on_subscribe=only_public)
    replies = await run(ctx, FakeClient([{"op": "echo", "text": "hi", "id": 1},
                                         {"op": "subscribe", "topic": "secret", "id": 2}]))
    assert replies[0] == {"id": 1, "ok": True, "echo": "hi"}
    assert replies[1]["id"] == 2
    assert replies[1]["error"] == {"code": "forbidden", "message": "public topics only"}


async def test_max_subscriptions_counts_topics_per_connection() -> None:
    ctx = Context(config=Config(max_subscriptions=1))
    replies = await run(ctx, FakeClient([{"op": "subscribe", "topic": "a", "id": 1},
                                         {"op": "subscribe", "topic": "a", "id": 2},
                                         {"op": "subscribe", "topic": "b", "id": 3}]))
    assert [r["ok"] for r in replies] == [True, True, False]
    assert replies[2]["error"]["code"] == "too_many_subscriptions"


# --- a pipelined broker: a run of publishes goes out together --------------------------------


class RateAfter(FakeClient):
    """Over its rate limit from the *n*-th message on."""

    def __init__(self, messages: list[Any], n: int):
        super().__init__(messages)
        self.n = n
        self.counted = 0

    def check_rate(self) -> bool:
        self.counted += 1
        return self.counted < self.n


async def test_a_run_of_publishes_goes_to_a_pipelined_broker_whole_and_replies_keep_order() -> None:
    broker = PipelinedBroker()
    ctx = Context(config=Config(client_publish=True), hub=Hub(broker=broker))
    messages: list[Any] = [{"op": "publish", "topic": "t", "data": i, "id": i} for i in range(5)]
    messages += [{"op": "ping", "id": "p"}, {"op": "publish", "topic": "t", "data": 5, "id": 5},
                 b"{bad", {"op": "publish", "topic": "t", "data": 6, "id": 6}]
    conn = FakeClient(messages)
    replies = await run(ctx, conn)
    # The ping ends the first run; a malformed message the second.
    assert broker.runs == [5, 1, 1]
    assert [r.get("id") for r in replies] == [0, 1, 2, 3, 4, "p", 5, None, 6]
    assert [r["offset"] for r in replies if "offset" in r] == list(range(1, 8))
    assert replies[7]["error"]["code"] == "bad_request"


async def test_in_a_run_a_refused_publish_is_answered_in_its_place() -> None:
    broker = PipelinedBroker()
    hub = Hub(broker=broker)
    claims = Claims(sub="a", exp=None, subscribe=("*",), publish=("ok.*",), presence=False)
    conn = FakeClient([{"op": "publish", "topic": t, "data": 1, "id": i}
                       for i, t in enumerate(["ok.1", "no", "ok.2"])], claims=claims)
    replies = await run(Context(hub=hub), conn)
    assert broker.runs == [2]
    assert [r["ok"] for r in replies] == [True, False, True]
    assert replies[1]["error"]["code"] == "forbidden" and replies[1]["id"] == 1
    # Rate-limited in the middle of a run: said in its place, and not published.
    broker = PipelinedBroker()
    conn = RateAfter([{"op": "publish", "topic": "t", "data": i, "id": i} for i in range(4)], n=3)
    replies = await run(Context(config=Config(client_publish=True), hub=Hub(broker=broker)), conn)
    assert broker.runs == [2]
    assert [r.get("error", {}).get("code") for r in replies] == [None, None, "rate_limited", "rate_limited"]


async def test_a_run_refused_by_a_down_or_draining_broker_gets_one_error_per_publish() -> None:
    broker = PipelinedBroker(down=True)
    ctx = Context(config=Config(client_publish=True), hub=Hub(broker=broker))
    conn = FakeClient([{"op": "publish", "topic": "t", "data": i, "id": i} for i in range(3)])
    replies = await run(ctx, conn)
    assert [(r["id"], r["error"]["code"]) for r in replies] == [(0, "unavailable"), (1, "unavailable"),
                                                                (2, "unavailable")]
    ctx = Context(config=Config(client_publish=True), hub=Hub(broker=PipelinedBroker()))
    ctx.hub.close()
    replies = await run(ctx, FakeClient([{"op": "publish", "topic": "t", "data": 1, "id": 1}]))
    assert replies == [{"id": 1, "ok": False,
                        "error": {"code": "unavailable", "message": "server is draining"}}]
