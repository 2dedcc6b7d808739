"""The Redis broker's batching with a real redis-server and two nodes: a burst
read from pub/sub is one fan-out batch, concurrent publishes share one script
call, a connection's publishes are pipelined, and a stalled Redis fails its
batches once without duplicating or losing an accepted publication."""

from __future__ import annotations

import signal
import socket
from typing import Any

import hiredis
import orjson
import pytest
import trio

from trioserve.push.brokers import BrokerUnavailable
from trioserve.push.brokers.redis import PUBLISH_SCRIPT, RedisBroker, publish_call

from ..conftest import RedisServer
from ..peers import RawWebSocket
from .helpers import next_pub, subscribe_reply

pytestmark = pytest.mark.system

LIMIT = 30


async def two_nodes(start_server: Any, redis: RedisServer, **config: Any) -> tuple[Any, Any]:
    return (await start_server(broker=redis.url, **config), await start_server(broker=redis.url, **config))


def redis_blocking(port: int, *commands: tuple[Any, ...]) -> list[Any]:
    """Send *commands* and read their replies with a blocking socket: the trio
    loop (and so every node in this process) stands still meanwhile."""
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = reader.gets()
            if reply is False:
                reader.feed(sock.recv(65536))
            else:
                replies.append(reply)
    return replies


async def redis_call(port: int, *command: Any) -> Any:
    reader = hiredis.Reader()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(hiredis.pack_command(command))
        while (reply := reader.gets()) is False:
            reader.feed(await stream.receive_some(65536))
    return reply


async def evalsha_calls(redis: RedisServer) -> int:
    info = (await redis_call(redis.port, "INFO", "commandstats")).decode()
    for line in info.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def batches(node: Any) -> int:
    return int(node.server.hub.statistics().batches)


async def test_a_burst_read_from_pubsub_is_one_fanout_batch_on_every_node(
        start_server: Any, redis: RedisServer) -> None:
    a, b = await two_nodes(start_server, redis)
    with trio.fail_after(LIMIT):
        subs = [await RawWebSocket.connect(node.port) for node in (a, b)]
        for ws in subs:
            await subscribe_reply(ws, "burst")
        before = [batches(a), batches(b)]
        # 100 publications in one script call, then a PING: once the PING is
        # answered Redis has written the whole burst to both nodes' pub/sub
        # sockets, and neither node has read any of it.
        keys, args = publish_call("burst", [b',"data":%d}' % i for i in range(100)], 1000, 300)
        first, _ = redis_blocking(redis.port, ("EVAL", PUBLISH_SCRIPT, len(keys), *keys, *args), ("PING",))[0]
        assert first == 1
        for ws in subs:
            pubs = [await next_pub(ws) for _ in range(100)]
            assert [(p["offset"], p["data"]) for p in pubs] == [(i + 1, i) for i in range(100)]
        # Each node handed the whole run to its hub with no checkpoint between
        # publications: one fan-out batch carried all 100.
        assert [batches(a) - before[0], batches(b) - before[1]] == [1, 1]
        for ws in subs:
            await ws.aclose()


async def test_concurrent_publishes_on_a_node_share_one_script_call(
        start_server: Any, redis: RedisServer) -> None:
    a, b = await two_nodes(start_server, redis)
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(b.port)
        await subscribe_reply(ws, "t")
        await a.server.hub.publish("t", "warm-up")  # the script is loaded
        calls = await evalsha_calls(redis)
        told: dict[int, int] = {}

        async def publish(i: int) -> None:
            told[i] = (await a.server.hub.publish("t", i)).offset

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(publish, i)
        assert await evalsha_calls(redis) - calls == 1
        assert sorted(told.values()) == list(range(2, 52))
        # Node b sees each publication at the offset its publisher was told.
        pubs = [await next_pub(ws) for _ in range(51)]
        assert [p["offset"] for p in pubs] == list(range(1, 52))
        assert all(told[p["data"]] == p["offset"] for p in pubs[1:])
        await ws.aclose()


async def test_one_connections_burst_of_publishes_is_pipelined(start_server: Any, redis: RedisServer) -> None:
    a, b = await two_nodes(start_server, redis, client_publish=True)
    with trio.fail_after(LIMIT):
        watcher = await RawWebSocket.connect(b.port)
        await subscribe_reply(watcher, "t")
        publisher = await RawWebSocket.connect(a.port)
        await publisher.send_json({"op": "publish", "topic": "t", "data": "warm-up", "id": "w"})
        assert (await publisher.recv_json())["offset"] == 1
        calls, before = await evalsha_calls(redis), batches(b)
        # One write of 100 publish commands: the handler queues them all without
        # waiting for an answer, so they reach Redis in one script call.
        await publisher.send_many({"op": "publish", "topic": "t", "data": i, "id": i} for i in range(100))
        replies = [await publisher.recv_json() for _ in range(100)]
        assert [(r["id"], r["offset"]) for r in replies] == [(i, i + 2) for i in range(100)]
        assert await evalsha_calls(redis) - calls == 1
        pubs = [await next_pub(watcher) for _ in range(101)]
        assert [(p["offset"], p["data"]) for p in pubs[1:]] == [(i + 2, i) for i in range(100)]
        assert batches(b) - before <= 2  # the warm-up's own batch, and the burst's
        await publisher.aclose()
        await watcher.aclose()


async def test_a_stalled_redis_fails_its_batches_once_and_loses_no_accepted_publication(
        start_server: Any, redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RedisBroker, "stream_timeout", 1.0)
    a, b = await two_nodes(start_server, redis)
    told: dict[str, int] = {}
    failed: list[str] = []

    async def publish(node: Any, data: str) -> None:
        try:
            told[data] = (await node.server.hub.publish("s", data)).offset
        except BrokerUnavailable:
            failed.append(data)

    async def wave(node: Any, name: str, count: int) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(publish, node, f"{name}-{i}")

    with trio.fail_after(LIMIT):
        subs = [await RawWebSocket.connect(node.port) for node in (a, b)]
        for ws in subs:
            await subscribe_reply(ws, "s")
        await wave(a, "before", 20)
        assert len(told) == 20 and not failed
        redis.process.send_signal(signal.SIGSTOP)
        try:
            # Each wave is one batch; it times out after a second and is not sent again.
            await wave(a, "stalled-a", 30)
            await wave(b, "stalled-b", 10)
        finally:
            redis.process.send_signal(signal.SIGCONT)
        assert len(failed) == 40 and len(told) == 20
        await wave(a, "after-a", 20)
        await wave(b, "after-b", 5)
        assert len(told) == 45 and len(failed) == 40

        final = int(await redis_call(redis.port, "GET", "ts:{s}:off"))
        history = await redis_call(redis.port, "XRANGE", "ts:{s}:hist", "-", "+")
        offsets = [int(entry_id.split(b"-")[0]) for entry_id, _ in history]
        assert offsets == list(range(1, final + 1))
        stored = [orjson.loads(dict(zip(f[::2], f[1::2], strict=True))[b"p"])["data"] for _, f in history]
        # Nothing was published twice: a failed batch was never sent again
        # (its publications may still have run once Redis resumed).
        assert len(stored) == len(set(stored))
        # Every accepted publication is stored at the offset its publisher was told.
        assert all(stored[offset - 1] == data for data, offset in told.items())
        # Both nodes deliver every stored offset once, in order.
        for ws in subs:
            pubs = [await next_pub(ws) for _ in range(final)]
            assert [(p["offset"], p["data"]) for p in pubs] == list(enumerate(stored, 1))
            await ws.aclose()
