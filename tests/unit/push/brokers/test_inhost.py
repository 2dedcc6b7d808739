"""The embedded broker in one process: a sequencer behind real Unix sockets, and
workers' hubs on InHostBrokers, as ``serve --workers N`` runs them apart."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trioserve import CloseCode, Config, Hub
from trioserve.protocol.messages import encode_publication
from trioserve.push.brokers import BrokerUnavailable
from trioserve.push.brokers.inhost import InHostBroker
from trioserve.push.brokers.relay import RelayServer
from trioserve.push.brokers.sequencer import Sequencer
from trioserve.push.history import History

from ..helpers import LINES

LIMIT = 10.0


@attrs.define(eq=False)
class Sub:
    """A subscriber that keeps what it is sent, and how many sends carried it."""

    framing: Any = LINES
    got: list[bytes] = attrs.Factory(list)
    sends: int = 0
    closed: int | None = None
    changed: trio.Event = attrs.Factory(trio.Event)

    def send_prepared(self, data: bytes, count: int = 1) -> bool:
        self.got += data.splitlines()
        self.sends += 1
        self.changed.set()
        self.changed = trio.Event()
        return True

    def start_close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = code

    async def wait_for(self, count: int) -> None:
        while len(self.got) < count:
            await self.changed.wait()


@attrs.define
class Host:
    sequencer: Sequencer
    dir: Path
    scope: trio.CancelScope
    nursery: trio.Nursery

    async def worker(self, worker_id: int, config: Config | None = None) -> tuple[Hub, InHostBroker]:
        config = config or Config()
        broker = InHostBroker(self.dir / f"b{worker_id}.sock")
        hub = Hub(config.hub_max_pending, History(config.history_for), broker)
        await self.nursery.start(hub.run)
        await self.nursery.start(broker.run)
        return hub, broker


@asynccontextmanager
async def host(workers: int = 2, config: Config | None = None) -> AsyncIterator[Host]:
    # A short path: a unix socket's must fit in 107 bytes, and pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    try:
        sequencer = Sequencer((config or Config()).history_for, clock=trio.current_time)
        relay = RelayServer(sequencer, {w: path / f"b{w}.sock" for w in range(1, workers + 1)})
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:
                await nursery.start(relay.serve)
                yield Host(sequencer, path, scope, nursery)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_a_publication_from_one_worker_reaches_the_others_subscribers_in_order() -> None:
    with trio.fail_after(LIMIT):
        async with host() as h:
            hub1, b1 = await h.worker(1)
            hub2, b2 = await h.worker(2)
            assert b1.epoch("t") == b2.epoch("t") == h.sequencer.epoch
            subs = [Sub(), Sub()]
            for hub, sub in zip((hub1, hub2), subs, strict=True):
                await hub.broker.join("t")
                hub.subscribe(sub, "t")  # type: ignore[arg-type]
            assert await b1.publish("t", {"n": 1}) == 1
            assert await b2.publish("t", {"n": 2}) == 2
            for sub in subs:
                await sub.wait_for(2)
                assert sub.got == [encode_publication("t", 1, {"n": 1}), encode_publication("t", 2, {"n": 2})]
            h.nursery.cancel_scope.cancel()


async def test_a_run_of_publishes_is_one_round_trip_and_one_fan_out_batch_on_every_worker() -> None:
    with trio.fail_after(LIMIT):
        async with host() as h:
            hub1, b1 = await h.worker(1)
            hub2, _b2 = await h.worker(2)
            subs = [Sub(), Sub()]
            for hub, sub in zip((hub1, hub2), subs, strict=True):
                await hub.broker.join("t")
                hub.subscribe(sub, "t")  # type: ignore[arg-type]
            batches = [hub1.statistics().batches, hub2.statistics().batches]
            results = await b1.publish_many([("t", i) for i in range(100)])
            assert results == list(range(1, 101))
            for hub, sub, before in zip((hub1, hub2), subs, batches, strict=True):
                await sub.wait_for(100)
                assert sub.got == [encode_publication("t", i + 1, i) for i in range(100)]
                assert sub.sends == 1
                assert hub.statistics().batches == before + 1
            h.nursery.cancel_scope.cancel()


async def test_join_names_the_position_and_fetch_and_head_reach_the_sequencers_history() -> None:
    with trio.fail_after(LIMIT):
        async with host() as h:
            _hub1, b1 = await h.worker(1)
            hub2, b2 = await h.worker(2)
            for i in range(5):
                await b1.publish("t", i)
            assert await b2.head("t") == (h.sequencer.epoch, 5)  # not joined: asks
            assert not b2.joined("t")
            await b2.join("t")
            assert b2.joined("t") and hub2.position("t") == 5
            assert await b2.head("t") == (h.sequencer.epoch, 5)  # joined: its own view
            entries, upto = await b2.fetch("t", 2)
            assert upto == 5
            assert entries == [(off, encode_publication("t", off, off - 1)) for off in (3, 4, 5)]
            assert await b2.fetch("t", 2, limit=1) == ([(3, encode_publication("t", 3, 2))], 3)
            # Recovery on the worker that published nothing: the sequencer's history.
            recovery = hub2.recover("t", b2.epoch("t"), 1, fetched=await b2.fetch("t", 1))
            assert recovery.recovered and len(recovery.publications) == 4
            h.nursery.cancel_scope.cancel()


async def test_after_leave_no_more_relays_and_a_new_join_starts_at_the_position() -> None:
    with trio.fail_after(LIMIT):
        async with host() as h:
            _hub1, b1 = await h.worker(1)
            hub2, b2 = await h.worker(2)
            sub = Sub()
            await b2.join("t")
            hub2.subscribe(sub, "t")  # type: ignore[arg-type]
            await b1.publish("t", 1)
            await sub.wait_for(1)
            hub2.unsubscribe(sub, "t")  # type: ignore[arg-type]
            assert not b2.joined("t")
            await b1.publish("t", 2)
            await b2.flush()
            assert h.sequencer.joined("t") == frozenset()
            await b2.join("t")
            assert hub2.position("t") == 2
            hub2.subscribe(sub, "t")  # type: ignore[arg-type]
            await b1.publish("t", 3)
            await sub.wait_for(2)
            assert sub.got[1] == encode_publication("t", 3, 3)
            h.nursery.cancel_scope.cancel()


async def test_flush_returns_after_everything_sequenced_before_it_is_in_the_hub() -> None:
    with trio.fail_after(LIMIT):
        async with host() as h:
            _hub1, b1 = await h.worker(1)
            hub2, b2 = await h.worker(2)
            sub = Sub()
            await b2.join("t")
            hub2.subscribe(sub, "t")  # type: ignore[arg-type]
            await b1.publish_many([("t", i) for i in range(50)])
            await hub2.flush()
            assert len(sub.got) == 50
            # Closed (the whole server drains): refused, and said so.
            h.sequencer.close()
            with pytest.raises(BrokerUnavailable, match="draining"):
                await b1.publish("t", "late")
            h.nursery.cancel_scope.cancel()


async def test_when_the_supervisor_goes_every_request_fails_and_lost_is_set() -> None:
    with trio.fail_after(LIMIT):
        async with host() as h:
            hub1, b1 = await h.worker(1)
            await b1.join("t")
            h.scope.cancel()  # the relay server's sockets close
            await b1.lost.wait()
            assert "supervisor" in b1.lost_reason
            with pytest.raises(BrokerUnavailable):
                await b1.publish("t", 1)
            with pytest.raises(BrokerUnavailable):
                await b1.fetch("t", 0)
            await hub1.flush()  # returns: nothing more will come
            h.nursery.cancel_scope.cancel()


async def test_a_gap_closes_the_topics_subscribers_and_a_repeat_is_dropped() -> None:
    # Cannot happen on a working socket; if it did, nothing may be skipped silently.
    broker = InHostBroker("/nonexistent")
    hub = Hub(broker=broker)
    sub = Sub()
    broker._start_topic("t", 0)
    hub.subscribe(sub, "t")  # type: ignore[arg-type]
    broker._relay("t", 1, b"one")
    broker._relay("t", 1, b"again")
    assert sub.closed is None
    broker._relay("t", 3, b"three")
    assert sub.closed == CloseCode.TRY_AGAIN_LATER
    broker._relay("t", 4, b"four")
    assert hub.statistics().pending == 3  # one, three, four
    broker._relay("other", 1, b"not joined")
    assert hub.statistics().pending == 3


async def test_a_worker_that_cannot_reach_the_supervisor_fails_to_start() -> None:
    broker = InHostBroker("/nonexistent/b1.sock")
    Hub(broker=broker)
    async with trio.open_nursery() as nursery:
        with pytest.raises(BrokerUnavailable, match="cannot reach the supervisor"):
            await nursery.start(broker.run)


async def test_a_history_page_says_when_history_no_longer_reaches_back() -> None:
    with trio.fail_after(LIMIT):
        config = Config(history_size=2)
        async with host(config=config) as h:
            hub1, b1 = await h.worker(1, config)
            for i in range(5):
                await b1.publish("t", i)
            assert await hub1.history_page("t", 3, 10) == (
                (encode_publication("t", 4, 3), encode_publication("t", 5, 4)), True)
            assert await hub1.history_page("t", 5, 10) == ((), True)
            assert await hub1.history_page("t", 0, 10) == ((), False)
            assert await hub1.history_page("never", 0, 10) == ((), True)
            h.nursery.cancel_scope.cancel()


async def test_presence_spans_workers_and_a_gone_workers_members_leave() -> None:
    from trioserve.protocol.messages import encode_presence_event

    with trio.fail_after(LIMIT):
        async with host() as h:
            hub1, b1 = await h.worker(1)
            b2 = InHostBroker(h.dir / "b2.sock")
            Hub(broker=b2)
            gone = trio.CancelScope()

            async def run2(task_status: trio.TaskStatus[None]) -> None:
                with gone:
                    await b2.run(task_status=task_status)

            await h.nursery.start(run2)
            assert (b1.node, b2.node) == ("w1", "w2") and b1.shares_presence
            watcher = Sub()
            await b1.join("room")
            hub1.subscribe(watcher, "room")  # type: ignore[arg-type]
            b1.member_joined("room", {"client": "a", "conn": "c1@w1", "transport": "t"}, None)
            assert await b1.members("room") == []  # its own are not "the other workers'"
            bob = {"client": "bob", "conn": "c1@w2", "transport": "t"}
            await b2.join("room")
            joined = encode_presence_event("join", "room", bob)
            b2.member_joined("room", bob, joined)
            # Queued, not awaited: a request behind it on the same socket sees it
            # (and so does any request the sequencer reads after that one).
            assert await b2.members("room") == [{"client": "a", "conn": "c1@w1", "transport": "t"}]
            assert await b1.members("room") == [bob]
            await watcher.wait_for(1)
            assert watcher.got == [joined]
            left = encode_presence_event("leave", "room", bob)
            b2.member_left("room", bob, left)
            await watcher.wait_for(2)
            assert watcher.got[1] == left and await b1.members("room") == []
            # Worker 2 goes (its socket closes): its members leave, with their events.
            b2.member_joined("room", bob, joined)
            await watcher.wait_for(3)
            gone.cancel()
            await watcher.wait_for(4)
            assert watcher.got[3] == left
            assert await b1.members("room") == []
            h.nursery.cancel_scope.cancel()


async def test_a_control_message_reaches_every_other_worker_and_the_count_says_how_many() -> None:
    with trio.fail_after(LIMIT):
        async with host(workers=3) as h:
            got: dict[int, list[bytes]] = {1: [], 2: [], 3: []}
            arrived = trio.Event()
            brokers = []
            for w in (1, 2, 3):
                _, broker = await h.worker(w)
                broker.on_control(lambda m, w=w: (got[w].append(m), arrived.set()))
                brokers.append(broker)
            assert await brokers[0].broadcast(b'{"q":1}') == 2
            while not (got[2] and got[3]):
                arrived = trio.Event()
                await arrived.wait()
            assert got == {1: [], 2: [b'{"q":1}'], 3: [b'{"q":1}']}
            h.nursery.cancel_scope.cancel()
