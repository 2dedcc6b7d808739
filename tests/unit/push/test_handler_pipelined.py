"""The push handler with a pipelined broker (the Redis broker's publish_later):
a connection's publishes are queued one after another without waiting for
their answers, and replies still come in the order of the commands."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trioserve import Config, ConnectionClosed, Hub
from trioserve.push import handler
from trioserve.push.brokers import Broker, BrokerUnavailable
from trioserve.push.brokers.base import Published
from trioserve.push.handler import push_handler

from .test_handler import Context, FakeClient


class PipelinedBroker(Broker):
    """Queues publish_later() calls until the test answers them; publish() (the
    fallback) answers at once."""

    synchronous = False
    pipelined = True

    def __init__(self, room: int = 100) -> None:
        self.room = room
        self.queued: list[tuple[str, Any, Published]] = []
        self.awaited: list[tuple[str, Any]] = []
        self.offset = 0

    def epoch(self, topic: str) -> str:
        return "e"

    def publish_later(self, topic: str, data: Any, done: Published) -> bool:
        if len(self.queued) >= self.room:
            return False
        self.queued.append((topic, data, done))
        return True

    async def publish(self, topic: str, data: Any) -> int:
        await trio.lowlevel.checkpoint()
        self.awaited.append((topic, data))
        self.offset += 1
        return self.offset

    def answer(self, error: BaseException | None = None) -> None:
        queued, self.queued = self.queued, []
        for _, _, done in queued:
            if error is None:
                self.offset += 1
                done(self.offset, None)
            else:
                done(0, error)


def publishes(*ids: int) -> list[dict[str, Any]]:
    return [{"op": "publish", "topic": "t", "data": i, "id": i} for i in ids]


def context(broker: PipelinedBroker) -> Context:
    return Context(config=Config(client_publish=True), hub=Hub(broker=broker))


async def handle_until_closed(conn: FakeClient, ctx: Context) -> None:
    with pytest.raises(ConnectionClosed):
        await push_handler(conn, ctx)  # type: ignore[arg-type]


async def test_publishes_are_queued_together_and_replies_keep_the_commands_order() -> None:
    broker = PipelinedBroker()
    ctx = context(broker)
    conn = FakeClient([*publishes(1, 2, 3), {"op": "ping", "id": "p"}])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_until_closed, conn, ctx)
        await trio.testing.wait_all_tasks_blocked()
        # All three are with the broker, none answered; the ping's reply waits for them.
        assert [data for _, data, _ in broker.queued] == [1, 2, 3]
        assert conn.sent == []
        broker.answer()
    assert conn.replies() == [
        {"id": 1, "ok": True, "offset": 1, "subscribers": 0},
        {"id": 2, "ok": True, "offset": 2, "subscribers": 0},
        {"id": 3, "ok": True, "offset": 3, "subscribers": 0},
        {"id": "p", "ok": True, "op": "pong"},
    ]
    assert broker.awaited == []


async def test_a_refused_batch_answers_each_publish_with_its_own_error() -> None:
    broker = PipelinedBroker()
    ctx = context(broker)
    conn = FakeClient([*publishes(1, 2), {"op": "ping", "id": "p"}])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_until_closed, conn, ctx)
        await trio.testing.wait_all_tasks_blocked()
        broker.answer(BrokerUnavailable("redis: timed out"))
    replies = conn.replies()
    assert [r["id"] for r in replies] == [1, 2, "p"]
    for r in replies[:2]:
        assert r["error"] == {"code": "unavailable", "message": "broker unavailable: redis: timed out"}


async def test_an_error_reply_waits_for_the_publishes_before_it() -> None:
    broker = PipelinedBroker()
    ctx = context(broker)
    conn = FakeClient([*publishes(1), b"{not json"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_until_closed, conn, ctx)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.sent == []
        broker.answer()
    replies = conn.replies()
    assert replies[0]["id"] == 1 and replies[0]["ok"] is True
    assert replies[1]["error"]["code"] == "bad_request"


async def test_past_max_ahead_a_publish_waits_for_the_answers_and_publishes_as_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler, "MAX_AHEAD", 2)
    broker = PipelinedBroker()
    ctx = context(broker)
    conn = FakeClient(publishes(1, 2, 3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_until_closed, conn, ctx)
        await trio.testing.wait_all_tasks_blocked()
        assert [data for _, data, _ in broker.queued] == [1, 2] and broker.awaited == []
        broker.answer()
    assert broker.awaited == [("t", 3)]
    assert [(r["id"], r["offset"]) for r in conn.replies()] == [(1, 1), (2, 2), (3, 3)]


async def test_a_full_broker_queue_falls_back_to_waiting() -> None:
    broker = PipelinedBroker(room=1)
    ctx = context(broker)
    conn = FakeClient(publishes(1, 2))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_until_closed, conn, ctx)
        await trio.testing.wait_all_tasks_blocked()
        assert [data for _, data, _ in broker.queued] == [1]
        broker.answer()
    assert broker.awaited == [("t", 2)]
    assert [r["id"] for r in conn.replies()] == [1, 2]


async def test_a_draining_hub_refuses_at_once_and_forbidden_stays_forbidden() -> None:
    broker = PipelinedBroker()
    ctx = context(broker)
    ctx.hub.close()
    replies = await _run_all(ctx, FakeClient(publishes(1)))
    assert replies == [{"id": 1, "ok": False,
                        "error": {"code": "unavailable", "message": "server is draining"}}]
    forbidden = Context(hub=Hub(broker=PipelinedBroker()))  # no --client-publish
    replies = await _run_all(forbidden, FakeClient(publishes(2)))
    assert replies[0]["error"]["code"] == "forbidden"


async def test_an_answer_after_the_handler_ended_does_no_harm() -> None:
    broker = PipelinedBroker()
    ctx = context(broker)
    conn = FakeClient(publishes(1))
    await handle_until_closed(conn, ctx)  # the client is gone before the answer
    broker.answer()  # the reply goes to the connection, which drops it if closed
    assert conn.replies() == [{"id": 1, "ok": True, "offset": 1, "subscribers": 0}]


async def _run_all(ctx: Context, conn: FakeClient) -> list[Any]:
    await handle_until_closed(conn, ctx)
    return conn.replies()
