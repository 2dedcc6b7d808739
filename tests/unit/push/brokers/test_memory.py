"""MemoryBroker: this process's offsets, its one epoch, and the payload it hands the hub."""

from __future__ import annotations

import trio

from trioserve import Hub
from trioserve.protocol.messages import encode_publication
from trioserve.push.brokers.memory import MemoryBroker


async def fanned_out(hub: Hub) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await hub.flush()
        nursery.cancel_scope.cancel()


async def test_offsets_start_at_one_per_topic_and_leave_no_gaps() -> None:
    broker = MemoryBroker()
    hub = Hub(broker=broker)
    assert [broker.publish_nowait("a", i) for i in range(3)] == [1, 2, 3]
    assert broker.publish_nowait("b", "x") == 1
    assert await broker.publish("a", 3) == 4
    await fanned_out(hub)
    assert (hub.position("a"), hub.position("b")) == (4, 1)


async def test_the_hub_gets_the_encoded_publication_in_offset_order() -> None:
    broker = MemoryBroker()
    hub = Hub(broker=broker)
    for data in ({"k": [1, None]}, "two", 3.5):
        broker.publish_nowait("t", data)
    assert hub.statistics().pending == 3  # in the inbox before any checkpoint
    await fanned_out(hub)
    held, complete = hub.history_after("t", 0, 10)
    assert complete
    assert held == (encode_publication("t", 1, {"k": [1, None]}), encode_publication("t", 2, "two"),
                    encode_publication("t", 3, 3.5))


async def test_one_epoch_per_broker_for_every_topic() -> None:
    # History dies with the process: a new broker (a restarted server) is a new epoch,
    # so a client that presents the old one learns its gap cannot be known.
    first, second = MemoryBroker(), MemoryBroker()
    assert first.epoch("a") == first.epoch("b")
    assert first.epoch("a") != second.epoch("a")
    assert len(first.epoch("a")) == 16 and int(first.epoch("a"), 16) >= 0
    hub = Hub(broker=first)
    first.publish_nowait("a", 1)
    await fanned_out(hub)
    assert await first.head("a") == (first.epoch("a"), 1)


# trio's rule: an operation that raises Cancelled did not happen (Hub.publish keeps
# it too). The hub never calls this for a synchronous broker; a program might.
async def test_a_cancelled_publish_does_not_publish() -> None:
    broker = MemoryBroker()
    hub = Hub(broker=broker)
    with trio.CancelScope() as scope:
        scope.cancel()
        await broker.publish("t", 1)
    assert not scope.cancelled_caught or hub.statistics().publications == 0
