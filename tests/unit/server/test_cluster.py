"""The server API's questions to every node: as many answers as the broker says
it reached, a bounded wait for the rest, and answers to the other nodes' questions."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing

from trioserve import Config, Hub
from trioserve.net.connection import ConnectionState
from trioserve.push.brokers.memory import MemoryBroker
from trioserve.push.users import UserIndex
from trioserve.server.cluster import ANSWER_TIMEOUT, Cluster


class Broker(MemoryBroker):
    """Reaches *reached* other nodes; the test plays their part."""

    def __init__(self, reached: int) -> None:
        super().__init__()
        self.reached = reached
        self.node = "n1"
        self.sent: list[dict[str, Any]] = []
        self.changed = trio.Event()

    async def broadcast(self, message: bytes) -> int:
        self.sent.append(orjson.loads(message))
        self.changed.set()
        self.changed = trio.Event()
        return self.reached


@attrs.define(eq=False)
class Conn:
    state: ConnectionState = ConnectionState.OPEN
    closed: tuple[int, str] | None = None

    def start_close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.state = ConnectionState.CLOSING


@attrs.define
class Node:
    hub: Hub
    config: Config = attrs.Factory(Config)
    users: UserIndex = attrs.Factory(UserIndex)


def node(reached: int) -> tuple[Node, Broker, Cluster]:
    broker = Broker(reached)
    server = Node(Hub(broker=broker))
    return server, broker, Cluster(server)  # type: ignore[arg-type]


async def question(broker: Broker) -> dict[str, Any]:
    while not broker.sent:
        await broker.changed.wait()
    return broker.sent[-1]


async def test_the_answers_of_every_node_reached_and_nothing_missing() -> None:
    server, broker, cluster = node(reached=2)
    alice = Conn()
    server.users.set(alice, "alice")
    result: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _ask(cluster, result))
        q = await question(broker)
        assert q["kind"] == "disconnect" and q["args"] == {"user": "alice", "code": 4010, "reason": "r"}
        broker.control_arrived(orjson.dumps({"a": "someone-else.1", "data": {"disconnected": 9}}))
        for n in (2, 3):
            broker.control_arrived(orjson.dumps({"a": q["q"], "data": {"node": f"n{n}", "disconnected": n}}))
    answers, missing = result
    assert answers == [{"node": "n1", "disconnected": 1}, {"node": "n2", "disconnected": 2},
                       {"node": "n3", "disconnected": 3}]
    assert missing == 0 and alice.closed == (4010, "r")


async def _ask(cluster: Cluster, result: list[Any]) -> None:
    result.extend(await cluster.ask("disconnect", user="alice", code=4010, reason="r"))


async def test_a_node_that_does_not_answer_is_missing_after_the_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    _, broker, cluster = node(reached=2)
    result: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _ask(cluster, result))
        q = await question(broker)
        broker.control_arrived(orjson.dumps({"a": q["q"], "data": {"node": "n2", "disconnected": 0}}))
        started = trio.current_time()
    assert trio.current_time() - started == pytest.approx(ANSWER_TIMEOUT)
    answers, missing = result
    assert len(answers) == 2 and missing == 1
    # A late answer finds no one waiting: dropped.
    broker.control_arrived(orjson.dumps({"a": q["q"], "data": {}}))


async def test_another_nodes_question_is_done_here_and_answered() -> None:
    server, broker, cluster = node(reached=1)
    bob = Conn()
    server.users.set(bob, "bob")
    async with trio.open_nursery() as nursery:
        await nursery.start(cluster.run)
        broker.control_arrived(orjson.dumps(
            {"q": "x.7", "kind": "disconnect", "args": {"user": "bob", "code": 4000, "reason": "bye"}}))
        assert bob.closed == (4000, "bye")  # at once, in the broker's reader
        answer = await question(broker)
        assert answer == {"a": "x.7", "data": {"node": "n1", "disconnected": 1}}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("message", [b"not json", b'{"q":"x.1","kind":"explode","args":{}}',
                                     b'{"q":"x.1"}', b"[]"])
async def test_a_bad_control_message_is_logged_and_dropped(message: bytes,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    _, broker, _ = node(reached=0)
    broker.control_arrived(message)
    assert "bad control message" in caplog.text and broker.sent == []
