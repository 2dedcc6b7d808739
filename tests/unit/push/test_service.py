"""service.publish: the one place that picks the hub's synchronous or asynchronous
path, waits or refuses on a full inbox, and names every refusal."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trioserve import ErrorCode, Hub
from trioserve.push.service import PublishRefused, publish

from .helpers import RemoteBroker


async def refusal(hub: Hub, *, wait: bool) -> PublishRefused:
    with pytest.raises(PublishRefused) as info:
        await publish(hub, "t", 1, wait=wait)
    return info.value


@pytest.mark.parametrize("wait", [False, True])
async def test_the_memory_path_has_no_checkpoint(wait: bool) -> None:
    # Neither a cancel point (a cancelled scope would stop it) nor a schedule
    # point (a task started before it would get to run): a burst read in one
    # chunk reaches the hub together.
    hub = Hub()
    other_ran = trio.Event()

    async def other() -> None:
        other_ran.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        with trio.CancelScope() as scope:
            scope.cancel()
            first = await publish(hub, "t", "a", wait=wait)
            second = await publish(hub, "t", "b", wait=wait)
        assert not scope.cancelled_caught and not other_ran.is_set()
    assert (first.offset, second.offset) == (1, 2)
    assert hub.statistics().pending == 2


async def test_a_full_inbox_is_refused_at_once_without_wait() -> None:
    hub = Hub(max_pending=1)  # no fan-out task: the inbox stays full
    hub.publish_nowait("t", 0)
    refused = await refusal(hub, wait=False)
    assert refused.code is ErrorCode.UNAVAILABLE
    assert refused.message == "overloaded: 1 publications waiting for fan-out"
    assert refused.retry_after == 1
    assert hub.statistics().pending == 1


async def test_a_full_inbox_is_waited_out_with_wait() -> None:
    hub = Hub(max_pending=1)
    hub.publish_nowait("t", 0)
    offsets: list[int] = []
    published = trio.Event()

    async def publisher() -> None:
        offsets.append((await publish(hub, "t", 1, wait=True)).offset)
        published.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        await trio.testing.wait_all_tasks_blocked()
        assert offsets == []  # parked, not refused
        await nursery.start(hub.run)  # the fan-out makes room
        with trio.fail_after(5):
            await published.wait()
        nursery.cancel_scope.cancel()
    assert offsets == [2]


@pytest.mark.parametrize("wait", [False, True])
@pytest.mark.parametrize("remote", [False, True], ids=["memory", "remote"])
async def test_a_draining_hub_is_refused_with_no_retry(wait: bool, remote: bool) -> None:
    hub = Hub(broker=RemoteBroker() if remote else None)
    hub.close()
    refused = await refusal(hub, wait=wait)
    assert (refused.code, refused.message, refused.retry_after) == (
        ErrorCode.UNAVAILABLE, "server is draining", None)


@pytest.mark.parametrize("wait", [False, True])
async def test_a_broker_that_is_down_is_refused_with_a_retry(wait: bool) -> None:
    hub = Hub(broker=RemoteBroker(down=True))
    refused = await refusal(hub, wait=wait)
    assert (refused.code, refused.message, refused.retry_after) == (
        ErrorCode.UNAVAILABLE, "broker unavailable: connection refused", 1)
    assert str(refused) == refused.message


async def test_an_asynchronous_broker_is_awaited_even_without_wait() -> None:
    # The hub cannot publish to it without waiting (publish_nowait would raise).
    broker = RemoteBroker()
    hub = Hub(broker=broker)
    result = await publish(hub, "t", {"x": 1}, wait=False)
    assert (result.offset, result.subscribers) == (1, 0)
    assert [offset for offset, _ in broker.published["t"]] == [1]
    assert hub.statistics().pending == 1
