"""Hub: offsets, subscriptions, batching fan-out, backpressure and flush."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from trioserve import Config, Connection, Hub, HubClosed, HubOverloaded, TcpConnection, WebSocketConnection

from ...peers import NdjsonClient, RawWebSocket
from ..helpers import socket_pair


async def _idle(conn: Connection) -> None:
    async for _ in conn:
        pass


async def _own(cls: type[Connection], transport: Any, *, task_status: Any) -> None:
    async with trio.open_nursery() as writers:
        conn = cls(transport, Config(), writers, "peer")
        task_status.started(conn)
        await _idle(conn)


async def ws_subscriber(nursery: trio.Nursery) -> tuple[Connection, RawWebSocket]:
    transport, client = socket_pair()
    return await nursery.start(_own, WebSocketConnection, transport), RawWebSocket(client)


async def tcp_subscriber(nursery: trio.Nursery) -> tuple[Connection, NdjsonClient]:
    transport, client = socket_pair()
    return await nursery.start(_own, TcpConnection, transport), NdjsonClient(client)


async def started_hub(nursery: trio.Nursery, **kwargs: Any) -> Hub:
    hub = Hub(**kwargs)
    await nursery.start(hub.run)
    return hub


async def test_offsets_count_per_topic() -> None:
    async with trio.open_nursery() as nursery:
        hub = await started_hub(nursery)
        assert [hub.publish_nowait("a", i).offset for i in range(3)] == [1, 2, 3]
        assert hub.publish_nowait("b", 0).offset == 1
        await hub.flush()
        assert (hub.position("a"), hub.position("b"), hub.position("c")) == (3, 1, 0)
        nursery.cancel_scope.cancel()


async def test_subscribe_unsubscribe_bookkeeping() -> None:
    async with trio.open_nursery() as nursery:
        hub = await started_hub(nursery)
        conn, _ = await ws_subscriber(nursery)
        assert hub.subscribe(conn, "a") and not hub.subscribe(conn, "a")
        assert hub.subscribe(conn, "b")
        assert hub.topics_of(conn) == {"a", "b"}
        assert hub.publish_nowait("a", 1).subscribers == 1
        assert hub.unsubscribe(conn, "a") and not hub.unsubscribe(conn, "a")
        hub.unsubscribe_all(conn)
        stats = hub.statistics()
        assert (stats.topics, stats.subscriptions) == (0, 0)
        assert hub.topics_of(conn) == frozenset()
        nursery.cancel_scope.cancel()


async def test_burst_goes_out_as_one_batch_in_order() -> None:
    async with trio.open_nursery() as nursery:
        hub = await started_hub(nursery)
        ws_conns = [await ws_subscriber(nursery) for _ in range(3)]
        tcp_conns = [await tcp_subscriber(nursery) for _ in range(2)]
        for conn, _ in [*ws_conns, *tcp_conns]:
            hub.subscribe(conn, "t")
        # No checkpoint between publishes: the fan-out task finds all 100 waiting.
        for i in range(100):
            hub.publish_nowait("t", {"i": i})
        await hub.flush()
        assert hub.statistics().batches == 1
        assert hub.statistics().deliveries == 500
        for conn, ws_peer in ws_conns:
            msgs = [orjson.loads(await ws_peer.recv_message()) for _ in range(100)]
            assert [m["offset"] for m in msgs] == list(range(1, 101))
            assert msgs[7] == {"op": "pub", "topic": "t", "offset": 8, "data": {"i": 7}}
            assert conn.statistics().messages_out == 100
        for _, line_peer in tcp_conns:
            lines = [orjson.loads(await line_peer.recv_line() or b"") for _ in range(100)]
            assert [m["offset"] for m in lines] == list(range(1, 101))
        nursery.cancel_scope.cancel()


async def test_each_publication_alone_when_idle() -> None:
    """At low load a batch is one publication: nothing waits for company."""
    async with trio.open_nursery() as nursery:
        hub = await started_hub(nursery)
        conn, peer = await ws_subscriber(nursery)
        hub.subscribe(conn, "t")
        for i in range(3):
            hub.publish_nowait("t", i)
            assert orjson.loads(await peer.recv_message())["data"] == i
        assert hub.statistics().batches == 3
        nursery.cancel_scope.cancel()


async def test_topics_in_one_batch_reach_only_their_subscribers() -> None:
    async with trio.open_nursery() as nursery:
        hub = await started_hub(nursery)
        (a, peer_a), (b, peer_b) = await ws_subscriber(nursery), await ws_subscriber(nursery)
        hub.subscribe(a, "a")
        hub.subscribe(b, "b")
        for i in range(10):
            hub.publish_nowait("a" if i % 2 else "b", i)
        await hub.flush()
        got_a = [orjson.loads(await peer_a.recv_message())["data"] for _ in range(5)]
        got_b = [orjson.loads(await peer_b.recv_message())["data"] for _ in range(5)]
        assert got_a == [1, 3, 5, 7, 9] and got_b == [0, 2, 4, 6, 8]
        nursery.cancel_scope.cancel()


async def test_overload_and_backpressure(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        hub = Hub(max_pending=3)  # fan-out not started yet: the inbox fills
        for i in range(3):
            hub.publish_nowait("t", i)
        with pytest.raises(HubOverloaded):
            hub.publish_nowait("t", 3)
        results = []

        async def waiting_publisher() -> None:
            results.append(await hub.publish("t", 3))

        nursery.start_soon(waiting_publisher)
        await trio.sleep(1)
        assert results == []
        await nursery.start(hub.run)
        await hub.flush()
        await trio.sleep(0)
        assert results and results[0].offset == 4
        nursery.cancel_scope.cancel()


async def test_closed_hub_refuses_but_delivers_what_it_took() -> None:
    async with trio.open_nursery() as nursery:
        hub = Hub()
        conn, peer = await ws_subscriber(nursery)
        hub.subscribe(conn, "t")
        hub.publish_nowait("t", "before")
        hub.close()
        with pytest.raises(HubClosed):
            hub.publish_nowait("t", "after")
        with pytest.raises(HubClosed):
            await hub.publish("t", "after")
        await nursery.start(hub.run)
        await hub.flush()
        assert orjson.loads(await peer.recv_message())["data"] == "before"
        nursery.cancel_scope.cancel()


async def test_large_batches_are_split_but_ordered() -> None:
    async with trio.open_nursery() as nursery:
        hub = await started_hub(nursery)
        conn, peer = await ws_subscriber(nursery)
        hub.subscribe(conn, "t")
        blob = "x" * 10_000
        for i in range(60):  # ~600 KB: more than one MAX_BATCH_BYTES chunk
            hub.publish_nowait("t", [i, blob])
        offsets = [orjson.loads(await peer.recv_message())["offset"] for _ in range(60)]
        assert offsets == list(range(1, 61))
        nursery.cancel_scope.cancel()


async def test_a_connection_in_several_topics_of_a_round_gets_them_in_one_send() -> None:
    async with trio.open_nursery() as nursery:
        hub = await started_hub(nursery)
        multi, multi_client = await ws_subscriber(nursery)
        single, single_client = await ws_subscriber(nursery)
        for topic in ("a", "b", "c"):
            hub.subscribe(multi, topic)
        hub.subscribe(single, "a")
        before = hub.statistics()
        for topic, n in (("a", 1), ("b", 2), ("c", 3), ("a", 4)):
            hub.publish_nowait(topic, n)
        await hub.flush()
        after = hub.statistics()
        # One round; the three topics' buffers joined into one send for `multi`.
        assert (after.batches - before.batches, after.coalesced - before.coalesced) == (1, 2)
        assert after.deliveries - before.deliveries == 6
        got = [await multi_client.recv_json() for _ in range(4)]
        assert sorted((p["topic"], p["offset"], p["data"]) for p in got) == [
            ("a", 1, 1), ("a", 2, 4), ("b", 1, 2), ("c", 1, 3)]
        assert [p["offset"] for p in got if p["topic"] == "a"] == [1, 2]
        assert [(await single_client.recv_json())["data"] for _ in range(2)] == [1, 4]
        nursery.cancel_scope.cancel()


async def test_publish_many_is_one_round_with_one_offset_each() -> None:
    async with trio.open_nursery() as nursery:
        hub = await started_hub(nursery)
        before = hub.statistics().batches
        results = await hub.publish_many([("x", 1), ("y", 2), ("x", 3)])
        assert [r.offset for r in results] == [1, 1, 2]
        await hub.flush()
        assert hub.statistics().batches == before + 1
        hub.close()
        with pytest.raises(HubClosed):
            await hub.publish_many([("x", 4)])
        nursery.cancel_scope.cancel()


async def test_after_an_expensive_round_a_wake_waits_for_the_rest_of_a_burst(
        autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst whose frames arrive spread out (TCP segments) goes out in one round
    when the round before was expensive; after a cheap one, nothing waits."""
    import trioserve.push.hub as hub_module

    rounds = iter([0.0, 0.05, 0.05])  # how long each round takes: cheap, then expensive ones

    async with trio.open_nursery() as nursery:
        hub = await started_hub(nursery)
        original = hub._fan_out_batch

        def timed_round() -> None:
            original()
            autojump_clock.jump(next(rounds, 0.05))

        monkeypatch.setattr(hub, "_fan_out_batch", timed_round)
        hub.publish_nowait("t", 0)  # the cheap round: no gathering after it
        await hub.flush()
        hub.publish_nowait("t", 1)  # the wake after a cheap round: sent alone
        await hub.flush()
        assert hub.statistics().batches == 2
        # The round just done was expensive: a wake now waits while more arrives,
        # each part less than WAKE_QUIET after the one before.
        for part in range(3):
            hub.publish_nowait("t", 10 + part)
            await trio.sleep(hub_module.WAKE_QUIET / 2)  # 500 µs
        await hub.flush()
        assert hub.statistics().batches == 3
        nursery.cancel_scope.cancel()
