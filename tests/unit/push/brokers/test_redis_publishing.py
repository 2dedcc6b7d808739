"""The Redis broker's publish queue with its script call replaced: batching,
offsets, one send per batch, cancellation, runs of publications. No Redis: the system tests
(tests/system/test_redis_batching.py) run the real script."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from trioserve import Config
from trioserve.push.brokers import BrokerUnavailable
from trioserve.push.brokers.redis import RedisBroker, publish_call, take_batch

URL = "redis://127.0.0.1:1/0"  # never connected to


class FakeScript:
    """Stands in for the script call: records each, assigns offsets per topic like
    the script, and fails while ``down``; ``hold`` keeps calls waiting."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[Any]]] = []
        self.offsets: dict[str, int] = {}
        self.down = False
        self.hold = trio.Event()
        self.hold.set()

    async def __call__(self, script: Any, keys: list[str], args: list[Any]) -> tuple[Any, Any]:
        self.calls.append((keys, args))
        await self.hold.wait()
        if self.down:
            raise ConnectionError("connection refused")
        topic = keys[0][4:-5]  # ts:{T}:off
        first = self.offsets.get(topic, 0) + 1
        self.offsets[topic] = first + len(args) - 8
        return first, b"epoch"

    def suffixes(self, n: int) -> list[bytes]:
        return list(self.calls[n][1][7:])


@pytest.fixture
async def broker() -> AsyncIterator[tuple[RedisBroker, FakeScript]]:
    b = RedisBroker(URL, Config(broker=URL))
    fake = FakeScript()
    b._run_script = fake  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b._send_loop)
        yield b, fake
        nursery.cancel_scope.cancel()


async def publish_all(b: RedisBroker, items: list[tuple[str, Any]]) -> list[int | BaseException]:
    """Publish each concurrently (all queued in one scheduler round); results in order."""
    results: list[int | BaseException] = [0] * len(items)

    async def one(n: int, topic: str, data: Any) -> None:
        try:
            results[n] = await b.publish(topic, data)
        except BrokerUnavailable as exc:
            results[n] = exc

    async with trio.open_nursery() as nursery:
        for n, (topic, data) in enumerate(items):
            nursery.start_soon(one, n, topic, data)
    return results


async def test_concurrent_publications_are_one_call_and_each_gets_its_own_offset(
        broker: tuple[RedisBroker, FakeScript]) -> None:
    b, fake = broker
    results = await publish_all(b, [("t", i) for i in range(50)])
    assert len(fake.calls) == 1
    assert sorted(results) == list(range(1, 51))  # type: ignore[type-var]
    # Each publisher's data sits at the offset it was told (the script numbers
    # the call's publications from the first offset, in order).
    sent = fake.suffixes(0)
    assert [sent[r - 1] for r in results] == [b',"data":%d}' % i for i in range(50)]  # type: ignore[operator]
    assert b._inflight == 0


async def test_one_call_per_topic_in_a_batch(broker: tuple[RedisBroker, FakeScript]) -> None:
    b, fake = broker
    results = await publish_all(b, [("a", 1), ("b", 2), ("a", 3)])
    assert sorted(keys[0] for keys, _ in fake.calls) == ["ts:{a}:off", "ts:{b}:off"]
    # The tasks queue in any order: each topic has its own offsets.
    assert results[1] == 1 and sorted([results[0], results[2]]) == [1, 2]  # type: ignore[type-var]


async def test_a_failed_batch_fails_every_publisher_in_it_and_is_never_sent_again(
        broker: tuple[RedisBroker, FakeScript]) -> None:
    b, fake = broker
    fake.down = True
    results = await publish_all(b, [("t", i) for i in range(5)])
    assert all(isinstance(r, BrokerUnavailable) and "connection refused" in str(r) for r in results)
    assert len(fake.calls) == 1
    fake.down = False
    assert await publish_all(b, [("t", "after")]) == [1]
    assert len(fake.calls) == 2 and fake.suffixes(1) == [b',"data":"after"}']


async def test_publications_queued_while_a_batch_is_out_go_in_the_next(
        broker: tuple[RedisBroker, FakeScript]) -> None:
    b, fake = broker
    fake.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_all, b, [("t", 0)])
        await trio.testing.wait_all_tasks_blocked()
        assert len(fake.calls) == 1  # out, unanswered
        nursery.start_soon(publish_all, b, [("t", i) for i in range(1, 4)])
        await trio.testing.wait_all_tasks_blocked()
        assert len(fake.calls) == 1 and len(b._queue) == 3
        fake.hold.set()
    assert [len(args) - 7 for _, args in fake.calls] == [1, 3]


async def test_a_publish_cancelled_before_its_batch_is_sent_never_happens(
        broker: tuple[RedisBroker, FakeScript]) -> None:
    b, fake = broker
    fake.hold = trio.Event()
    doomed = trio.CancelScope()

    async def cancelled_later() -> None:
        with doomed:
            await b.publish("t", "cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_all, b, [("t", "first")])
        await trio.testing.wait_all_tasks_blocked()  # "first" is out, unanswered
        nursery.start_soon(cancelled_later)
        nursery.start_soon(publish_all, b, [("t", "kept")])
        await trio.testing.wait_all_tasks_blocked()
        assert len(b._queue) == 2
        doomed.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert [p.suffix for p in b._queue] == [b',"data":"kept"}']
        fake.hold.set()
    assert doomed.cancelled_caught
    assert [s for n in range(len(fake.calls)) for s in fake.suffixes(n)] == [
        b',"data":"first"}', b',"data":"kept"}']
    assert b._inflight == 0


async def test_publish_many_is_one_call_per_topic_and_answers_each_in_order(
        broker: tuple[RedisBroker, FakeScript]) -> None:
    b, fake = broker
    with trio.fail_after(5):
        results = await b.publish_many([("a", "x"), ("b", "y"), ("a", "z")])
    assert results == [1, 1, 2]
    assert sorted(len(args) - 7 for _, args in fake.calls) == [1, 2]
    assert b._inflight == 0


async def test_publish_many_gives_each_publication_its_error_when_redis_is_down(
        broker: tuple[RedisBroker, FakeScript]) -> None:
    b, fake = broker
    fake.down = True
    with trio.fail_after(5):
        results = await b.publish_many([("t", 1), ("t", 2)])
    assert all(isinstance(r, BrokerUnavailable) for r in results) and len(results) == 2
    assert len(fake.calls) == 1  # sent once, never again


async def test_stopping_the_sender_fails_whoever_still_waits() -> None:
    b = RedisBroker(URL, Config(broker=URL))
    fake = FakeScript()
    fake.hold = trio.Event()
    b._run_script = fake  # type: ignore[method-assign]
    answers: list[int | BaseException] = []

    async def queued_behind() -> None:
        answers.extend(await b.publish_many([("t", 2)]))

    stop = trio.CancelScope()

    async def sender() -> None:
        with stop:
            await b._send_loop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(publish_all, b, [("t", 1)])
        await trio.testing.wait_all_tasks_blocked()  # one batch out
        nursery.start_soon(queued_behind)  # queued behind it
        await trio.testing.wait_all_tasks_blocked()
        stop.cancel()
    assert len(answers) == 1 and isinstance(answers[0], BrokerUnavailable)
    assert b._inflight == 0 and not b._queue


def test_take_batch_keeps_to_the_count_and_the_bytes() -> None:
    class Pub:
        def __init__(self, size: int) -> None:
            self.suffix = b"x" * size

    queue = deque(Pub(10) for _ in range(5))
    assert len(take_batch(queue, max_count=3, max_bytes=1000)) == 3 and len(queue) == 2
    queue = deque(Pub(10) for _ in range(5))
    assert len(take_batch(queue, max_count=100, max_bytes=25)) == 2
    queue = deque([Pub(500)])
    assert len(take_batch(queue, max_count=100, max_bytes=25)) == 1  # one always goes


def test_publish_call_names_the_topics_keys_and_carries_each_suffix() -> None:
    keys, args = publish_call("room.1", [b',"data":1}', b',"data":2}'], 100, 299.5)
    assert keys == ["ts:{room.1}:off", "ts:{room.1}:hist", "ts:{room.1}:epoch"]
    assert args[0] == "ts:pub:room.1" and args[3:5] == [100, 300]
    assert args[6] == b'{"op":"pub","topic":"room.1","offset":'
    assert args[7:] == [b',"data":1}', b',"data":2}']
