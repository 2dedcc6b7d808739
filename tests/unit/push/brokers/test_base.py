"""The broker seam: what the base Broker does for a broker that overrides only
what it must, and the hub's fit to HubPort, the part of it a broker may use."""

from __future__ import annotations

import inspect

import pytest
import trio
import trio.testing

from trioserve import Hub
from trioserve.push.brokers import Broker, HubPort


class OneEpoch(Broker):
    """A broker that overrides only its epoch."""

    def epoch(self, topic: str) -> str:
        return "e1"


def test_the_hub_has_every_method_a_broker_may_call() -> None:
    members = [name for name in vars(HubPort) if not name.startswith("_")]
    assert {"deliver_nowait", "wait_for_space", "position", "close_subscribers"} <= set(members)
    for name in members:
        declared, actual = getattr(HubPort, name), getattr(Hub, name)
        assert inspect.iscoroutinefunction(declared) == inspect.iscoroutinefunction(actual), name
        assert list(inspect.signature(declared).parameters) == list(inspect.signature(actual).parameters)


async def test_a_broker_is_synchronous_and_publishes_nothing_unless_it_says_how() -> None:
    broker = Broker()
    assert broker.synchronous
    with pytest.raises(NotImplementedError):
        broker.epoch("t")
    with pytest.raises(NotImplementedError):
        broker.publish_nowait("t", 1)
    with pytest.raises(NotImplementedError):
        await broker.publish("t", 1)


async def test_attach_gives_the_broker_its_hub() -> None:
    broker = OneEpoch()
    hub = Hub(broker=broker)
    assert broker.hub is hub and hub.broker is broker


async def test_head_is_the_epoch_and_the_hubs_position() -> None:
    hub = Hub(broker=OneEpoch())
    assert await hub.broker.head("t") == ("e1", 0)
    hub.deliver_nowait("t", 1, b'{"op":"pub"}')
    hub.deliver_nowait("t", 2, b'{"op":"pub"}')
    assert await hub.broker.head("t") == ("e1", 0)  # position counts what was fanned out
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await hub.flush()
        nursery.cancel_scope.cancel()
    assert await hub.broker.head("t") == ("e1", 2)


async def test_the_base_has_no_history_to_add_and_nothing_to_wait_for() -> None:
    broker = OneEpoch()
    Hub(broker=broker)
    assert await broker.fetch("t", 5) == ([], 5)
    assert await broker.fetch("t", 5, limit=10) == ([], 5)
    with trio.move_on_after(1) as waited:
        await broker.flush()
        await broker.join("t")
    assert not waited.cancelled_caught
    broker.leave("t")


async def test_run_reports_started_and_runs_until_cancelled() -> None:
    broker = OneEpoch()
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        await trio.testing.wait_all_tasks_blocked()
        assert len(nursery.child_tasks) == 1  # still running
        nursery.cancel_scope.cancel()
