"""The Redis broker's pub/sub connection over an in-memory stream pair: the
test plays Redis with RESP bytes (packed and parsed by hiredis), so what is
checked is the connection's own contract: everything one read brings is
handed over at once, SUBSCRIBE waits for its confirmation, silence brings a
PING and then a timeout, and a lost connection fails whoever waits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
import trio
import trio.testing

from trioserve.push.brokers.redis_pubsub import PubSubConnection, PubSubLost


def resp(*items: Any) -> bytes:
    """A RESP2 array of bulk strings and integers (what Redis sends on pub/sub)."""
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        if isinstance(item, int):
            out.append(b":%d\r\n" % item)
        else:
            data = item.encode() if isinstance(item, str) else item
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class FakeRedis:
    """The server end: reads the commands the connection sends."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = hiredis.Reader()

    async def command(self) -> list[bytes]:
        while (cmd := self.reader.gets()) is False:
            self.reader.feed(await self.stream.receive_some(65536))
        return cmd  # type: ignore[no-any-return]

    async def send(self, *chunks: bytes) -> None:
        await self.stream.send_all(b"".join(chunks))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PubSubConnection, FakeRedis, trio.Nursery]]:
    client, server = trio.testing.memory_stream_pair()
    conn = PubSubConnection(client, timeout=5.0, keepalive=15.0)
    async with trio.open_nursery() as nursery:
        yield conn, FakeRedis(server), nursery
        nursery.cancel_scope.cancel()


async def test_everything_one_read_brings_is_handed_over_at_once(
        pair: tuple[PubSubConnection, FakeRedis, trio.Nursery]) -> None:
    conn, redis, nursery = pair
    nursery.start_soon(conn.run)
    await redis.send(resp("message", "ts:pub:t", "e 1 {}"), resp("message", "ts:pub:t", "e 2 {}"),
                     resp("message", "ts:pub:u", "e 1 {}"),
                     b"*3\r\n$7\r\nmessage\r\n")  # and the start of a fourth
    with trio.fail_after(5):
        assert await conn.receive() == [(b"ts:pub:t", b"e 1 {}"), (b"ts:pub:t", b"e 2 {}"),
                                        (b"ts:pub:u", b"e 1 {}")]
        await redis.send(b"$8\r\nts:pub:t\r\n$6\r\ne 3 {}\r\n")  # the rest of it
        assert await conn.receive() == [(b"ts:pub:t", b"e 3 {}")]


async def test_subscribe_returns_once_redis_confirmed_every_channel(
        pair: tuple[PubSubConnection, FakeRedis, trio.Nursery]) -> None:
    conn, redis, nursery = pair
    nursery.start_soon(conn.run)
    done = trio.Event()

    async def subscribe() -> None:
        await conn.subscribe("ts:pub:a", "ts:pub:b")
        done.set()

    with trio.fail_after(5):
        nursery.start_soon(subscribe)
        assert await redis.command() == [b"SUBSCRIBE", b"ts:pub:a", b"ts:pub:b"]
        await redis.send(resp("subscribe", "ts:pub:a", 1))
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        await redis.send(resp("subscribe", "ts:pub:b", 2))
        await done.wait()
        await conn.unsubscribe("ts:pub:a")  # sent, not waited for
        assert await redis.command() == [b"UNSUBSCRIBE", b"ts:pub:a"]


async def test_a_lost_connection_fails_a_subscribe_at_once(
        pair: tuple[PubSubConnection, FakeRedis, trio.Nursery]) -> None:
    conn, redis, nursery = pair
    failed: list[BaseException] = []

    async def run() -> None:
        with pytest.raises(PubSubLost):
            await conn.run()

    async def subscribe() -> None:
        try:
            await conn.subscribe("ts:pub:a")
        except PubSubLost as exc:
            failed.append(exc)

    with trio.fail_after(5):
        nursery.start_soon(run)
        nursery.start_soon(subscribe)
        await redis.command()
        await redis.stream.aclose()  # Redis goes away before confirming
        await trio.testing.wait_all_tasks_blocked()
    assert len(failed) == 1
    with pytest.raises(PubSubLost):
        await conn.unsubscribe("ts:pub:a")


async def test_an_error_reply_ends_the_connection(
        pair: tuple[PubSubConnection, FakeRedis, trio.Nursery]) -> None:
    conn, redis, _ = pair
    await redis.send(b"-ERR unknown command\r\n")
    with trio.fail_after(5), pytest.raises(PubSubLost, match="unknown command"):
        await conn.run()


async def test_silence_brings_a_ping_and_no_answer_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = PubSubConnection(client, timeout=5.0, keepalive=15.0)
    redis = FakeRedis(server)
    failure: list[BaseException] = []

    async def run() -> None:
        try:
            await conn.run()
        except TimeoutError as exc:
            failure.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        assert await redis.command() == [b"PING"]
        assert trio.current_time() == pytest.approx(15.0)
        await redis.send(resp("pong", ""))  # answered: the connection is fine
        assert await redis.command() == [b"PING"]  # the next one, 15 s of silence later
        assert trio.current_time() == pytest.approx(30.0)
        await trio.sleep(5.5)  # this one is not answered
    assert failure and "PING" in str(failure[0])
