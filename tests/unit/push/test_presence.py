"""Presence through the broker seam: the handler with a broker that shares
presence (a cluster's), and with the memory broker (one process, unchanged)."""

from __future__ import annotations

from typing import Any

import orjson

from trioserve import Config, Hub
from trioserve.push.brokers import BrokerUnavailable
from trioserve.push.brokers.memory import MemoryBroker
from trioserve.push.handler import leave_all

from .test_handler import Context, FakeClient, run

OTHERS = [{"client": "bob", "conn": "c3@w2", "transport": "tcp"}]


class SharingBroker(MemoryBroker):
    """The memory broker plus a recorded presence seam, as a cluster broker has it."""

    shares_presence = True
    node = "w1"

    def __init__(self, others: list[dict[str, Any]] | None = None, down: bool = False):
        super().__init__()
        self.calls: list[tuple[str, str, dict[str, Any], Any]] = []
        self.others = others
        self.down = down

    def member_joined(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        self.calls.append(("joined", topic, member, event and orjson.loads(event)))

    def member_left(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        self.calls.append(("left", topic, member, event and orjson.loads(event)))

    async def members(self, topic: str) -> list[dict[str, Any]] | None:
        if self.down:
            raise BrokerUnavailable("the supervisor is gone")
        return self.others


class Untouched(MemoryBroker):
    """The memory broker, failing if the handler uses the presence seam."""

    def member_joined(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        raise AssertionError("member_joined called")

    def member_left(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        raise AssertionError("member_left called")

    async def members(self, topic: str) -> list[dict[str, Any]] | None:
        raise AssertionError("members called")


ME = {"client": "anonymous", "conn": "c7@w1", "transport": "fake"}


async def test_a_sharing_broker_hears_of_joins_and_leaves_and_adds_the_other_nodes() -> None:
    broker = SharingBroker(OTHERS)
    ctx = Context(config=Config(presence_events=("room.*",)), hub=Hub(broker=broker))
    conn = FakeClient([{"op": "subscribe", "topic": "room.1", "id": 1},
                       {"op": "subscribe", "topic": "quiet", "id": 2},
                       {"op": "subscribe", "topic": "quiet", "id": 3},  # already: nothing new
                       {"op": "presence", "topic": "room.1", "id": 4},
                       {"op": "unsubscribe", "topic": "room.1", "id": 5},
                       {"op": "unsubscribe", "topic": "room.1", "id": 6}])  # not subscribed
    replies = await run(ctx, conn)
    assert replies[3]["clients"] == [ME, *OTHERS]
    assert broker.calls == [
        ("joined", "room.1", ME, {"op": "join", "topic": "room.1", "client": ME}),
        ("joined", "quiet", ME, None),  # no presence events there: the member alone
        ("left", "room.1", ME, {"op": "leave", "topic": "room.1", "client": ME}),
    ]
    # Disconnecting (the server's leave_all) leaves every topic still held.
    broker.calls.clear()
    topics = ctx.hub.topics_of(conn)
    ctx.hub.unsubscribe_all(conn)
    leave_all(ctx, conn, topics)  # type: ignore[arg-type]
    assert broker.calls == [("left", "quiet", ME, None)]


async def test_local_subscribers_get_the_event_once_with_the_qualified_id() -> None:
    broker = SharingBroker(None)
    ctx = Context(config=Config(presence_events=("room.*",)), hub=Hub(broker=broker))
    watcher = FakeClient([])
    ctx.hub.subscribe(watcher, "room.1")
    conn = FakeClient([{"op": "subscribe", "topic": "room.1", "id": 1},
                       {"op": "presence", "topic": "room.1", "id": 2}])
    conn.id = 8
    replies = await run(ctx, conn)
    assert [orjson.loads(m) for m in watcher.sent] == [
        {"op": "join", "topic": "room.1", "client": {**ME, "conn": "c8@w1"}}]
    # None from members(): this hub's subscribers are the whole answer.
    assert sorted(c["conn"] for c in replies[1]["clients"]) == ["c7@w1", "c8@w1"]


async def test_presence_answers_unavailable_when_the_broker_is_down() -> None:
    ctx = Context(hub=Hub(broker=SharingBroker(down=True)))
    replies = await run(ctx, FakeClient([{"op": "presence", "topic": "room.1", "id": 1}]))
    assert replies[0]["error"] == {"code": "unavailable", "message": "the supervisor is gone"}


async def test_the_memory_broker_is_never_asked_and_the_output_is_unchanged() -> None:
    ctx = Context(config=Config(presence_events=("room.*",)), hub=Hub(broker=Untouched()))
    watcher = FakeClient([])
    watcher.id = 1
    ctx.hub.subscribe(watcher, "room.1")
    conn = FakeClient([{"op": "subscribe", "topic": "room.1", "id": 1},
                       {"op": "presence", "topic": "room.1", "id": 2},
                       {"op": "unsubscribe", "topic": "room.1", "id": 3}])
    replies = await run(ctx, conn)
    me = {"client": "anonymous", "conn": "c7", "transport": "fake"}
    assert sorted(replies[1]["clients"], key=str) == [{**me, "conn": "c1"}, me]
    assert [orjson.loads(m) for m in watcher.sent] == [
        {"op": "join", "topic": "room.1", "client": me},
        {"op": "leave", "topic": "room.1", "client": me}]
