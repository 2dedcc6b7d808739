"""The Python client (trioserve.client) against a real in-process server.

Connections are cut from the server's side with ``shutdown()`` on its socket:
the client sees its TCP connection end without a close frame (1006), the way a
network failure looks, and the client code has no test hooks.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import trio

from trioserve import ConnectionState
from trioserve.client import (
    ClientClosed,
    ClientInfo,
    ClientState,
    ConnectError,
    PresenceEvent,
    Publication,
    PublishResult,
    RecoveryGap,
    ServerError,
    StreamPosition,
    Subscription,
    Unauthorized,
    connect,
)

from ..peers import http_publish
from .helpers import wait_until

pytestmark = pytest.mark.system

LIMIT = 20
SECRET = "client-test-secret-0123456789-0123456789"


def make_token(sub: str = "alice", ttl: float = 3600, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256")


def cut_connections(rs: Any) -> int:
    """End every client's TCP connection from the server's side, with no close frame."""
    conns = list(rs.server.connections)
    for conn in conns:
        conn.transport.sock.shutdown(socket.SHUT_RDWR)
    return len(conns)


async def next_pub(sub: Subscription) -> Publication:
    return await sub.__anext__()


# --- basics -------------------------------------------------------------------------------


async def test_subscribe_publish_presence_ping(start_server: Any) -> None:
    rs = await start_server(client_publish=True)
    epoch = rs.server.hub.epoch_of("news")
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url) as alice, connect(rs.ws_url) as bob:
            async with alice.subscribe("news") as sub:
                assert sub.topic == "news"
                assert sub.position == StreamPosition(epoch, 0)
                assert await bob.publish("news", {"x": 1}) == PublishResult(offset=1, subscribers=1)
                assert (await http_publish(rs.port, "news", [2])).status == 200
                assert await next_pub(sub) == Publication("news", 1, {"x": 1})
                assert await next_pub(sub) == Publication("news", 2, [2])
                assert sub.position == StreamPosition(epoch, 2)

                clients = await bob.presence("news")
                assert len(clients) == 1
                assert clients[0].client == "anonymous" and clients[0].transport == "websocket"
                await alice.ping()
                stats = alice.statistics()
                assert stats.state is ClientState.OPEN
                assert (stats.reconnects, stats.publications_received, stats.subscriptions) == (0, 2, 1)
                assert (stats.duplicates_skipped, stats.gaps, stats.pending_requests) == (0, 0, 0)
            # Leaving the block unsubscribed; alice's ping is answered after that.
            await alice.ping()
            assert await bob.presence("news") == []
            assert alice.statistics().subscriptions == 0


async def test_server_errors_and_misuse(start_server: Any) -> None:
    rs = await start_server()  # no client publish
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url) as c:
            with pytest.raises(ServerError) as info:
                await c.publish("news", 1)
            assert info.value.code == "forbidden"
            with pytest.raises(ServerError) as info:
                async with c.subscribe("not a topic!"):
                    pass
            assert info.value.code == "bad_request"
            async with c.subscribe("a"):
                with pytest.raises(RuntimeError, match="already subscribed"):
                    async with c.subscribe("a"):
                        pass
            with pytest.raises(TypeError):
                await c.publish("a", object())
            await c.ping()  # the connection survived all of that
            assert c.statistics().state is ClientState.OPEN
        with pytest.raises(ClientClosed):
            await c.ping()


async def test_first_connection_failure_raises(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(LIMIT):
        with pytest.raises(ConnectError) as info:
            async with connect(f"ws://127.0.0.1:{rs.port}/nope"):
                pytest.fail("connected")
        assert info.value.status == 404
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free_port = s.getsockname()[1]
        with pytest.raises(ConnectError):
            async with connect(f"ws://127.0.0.1:{free_port}/ws"):
                pytest.fail("connected")
    with pytest.raises(ValueError, match="ws://"):
        async with connect(f"http://127.0.0.1:{rs.port}/ws"):
            pass


async def test_request_timeout(start_server: Any, autojump_clock: Any) -> None:
    async def never_answers(conn: Any) -> None:
        async for _ in conn:
            pass

    rs = await start_server(server_kwargs={"ws_handler": never_answers})
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url, request_timeout=3) as c:
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await c.ping()
            assert trio.current_time() - start == pytest.approx(3)
            with pytest.raises(trio.TooSlowError):
                async with c.subscribe("news"):
                    pass
            assert c.statistics().subscriptions == 0


async def test_aclose_ends_iteration_and_requests(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url) as c, c.subscribe("news") as sub:
            rs.server.hub.publish_nowait("news", 1)
            rs.server.hub.publish_nowait("news", 2)
            assert (await next_pub(sub)).offset == 1
            await wait_until(lambda: c.statistics().publications_received == 2)
            await c.aclose()
            # What was received is still yielded, then iteration ends.
            assert [p.offset async for p in sub] == [2]
            with pytest.raises(ClientClosed):
                await c.publish("news", 3)
            assert c.statistics().state is ClientState.CLOSED
            await wait_until(lambda: not rs.server.connections, what="the server saw the close")


async def test_resume_from_a_saved_position(start_server: Any) -> None:
    rs = await start_server()
    hub = rs.server.hub
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url) as c, c.subscribe("news") as sub:
            hub.publish_nowait("news", "a")
            assert (await next_pub(sub)).data == "a"
            saved = sub.position
        assert saved == StreamPosition(hub.epoch_of("news"), 1)
        for data in "bcd":
            hub.publish_nowait("news", data)
        async with connect(rs.ws_url) as c, c.subscribe("news", since=saved) as sub:
            assert sub.position == saved
            hub.publish_nowait("news", "e")
            got = [await next_pub(sub) for _ in range(4)]
            assert [(p.offset, p.data) for p in got] == [(2, "b"), (3, "c"), (4, "d"), (5, "e")]


async def test_presence_events(start_server: Any) -> None:
    rs = await start_server(presence_events=["room.*"])
    events: list[PresenceEvent] = []
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url) as a, a.subscribe("room.1", on_presence=events.append):
            async with connect(rs.ws_url) as b, b.subscribe("room.1"):
                await wait_until(lambda: len(events) == 1, what="a join event")
            await wait_until(lambda: len(events) == 2, what="a leave event")
    assert [(e.kind, e.topic) for e in events] == [("join", "room.1"), ("leave", "room.1")]
    assert events[0].client == events[1].client
    assert isinstance(events[0].client, ClientInfo) and events[0].client.client == "anonymous"


async def test_exceptions_from_the_block_are_not_wrapped(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(LIMIT):
        with pytest.raises(KeyError):
            async with connect(rs.ws_url) as c, c.subscribe("news"):
                raise KeyError("mine")
    assert c.statistics().state is ClientState.CLOSED


# --- reconnecting and recovery ---------------------------------------------------------------


async def test_cut_connection_mid_stream_recovers_every_offset_once(start_server: Any) -> None:
    n = 600
    rs = await start_server(history_size=n)
    hub = rs.server.hub
    received: list[Publication] = []
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url) as c, c.subscribe("ticks") as sub:

            async def publisher() -> None:
                for i in range(n):
                    await hub.publish("ticks", i)
                    await trio.sleep(0.0005)

            async def cutter() -> None:
                for at in (100, 250, 400):
                    await wait_until(lambda at=at: len(received) >= at)  # type: ignore[misc]
                    assert cut_connections(rs) == 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher)
                nursery.start_soon(cutter)
                async for pub in sub:
                    received.append(pub)
                    if pub.offset == n:
                        break
            stats = c.statistics()
    assert [p.offset for p in received] == list(range(1, n + 1))
    assert [p.data for p in received] == list(range(n))
    assert stats.reconnects == 3
    assert stats.gaps == 0


async def publish_bulk_until(rs: Any, done: Callable[[], bool], extra: int = 0) -> int:
    """Publish ``{"i": i, "pad": ...}`` (2 KB each) to "bulk" until *done()*, then
    *extra* more; how many in all.

    Stopping as soon as the server acts keeps what the client must recover
    small: a recovering reply carries at most about 1 MiB.
    """
    hub = rs.server.hub
    n = 0
    while not done():
        await hub.publish("bulk", {"i": n, "pad": "x" * 2000})
        await hub.flush()
        n += 1
    for _ in range(extra):
        await hub.publish("bulk", {"i": n, "pad": "x" * 2000})
        n += 1
    return n


async def read_bulk(rs: Any, sub: Subscription, n: int) -> list[int]:
    """The offsets *sub* yields up to n + 1, checking each one's data. Offset
    n + 1 is published on seeing n, so any offset repeated would come before it."""
    offsets: list[int] = []
    async for pub in sub:
        assert pub.data["i"] == pub.offset - 1
        offsets.append(pub.offset)
        if pub.offset == n:
            rs.server.hub.publish_nowait("bulk", {"i": n})
        if pub.offset == n + 1:
            break
    return offsets


async def test_slow_consumer_backpressure_then_4008_then_recovery(start_server: Any) -> None:
    """A consumer that does not read holds the reader back (nothing is dropped);
    the server eventually closes the client as a slow consumer, and the client
    reconnects and recovers the rest from history."""
    rs = await start_server(history_size=100_000, queue_max_frames=50, queue_max_bytes=64 * 1024)
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url, buffer_size=4) as c, c.subscribe("bulk") as sub:
            (conn,) = rs.server.connections
            # Published while the client is away, too: recovered, never sent live.
            n = await publish_bulk_until(rs, lambda: conn.state is not ConnectionState.OPEN, extra=20)
            offsets = await read_bulk(rs, sub, n)
            stats = c.statistics()
    assert offsets == list(range(1, n + 2))
    assert stats.reconnects >= 1 and stats.gaps == 0


async def test_dropped_publications_are_recovered_without_reconnecting(start_server: Any) -> None:
    """With the drop-oldest policy the server keeps a slow connection and drops
    queued publications; the client sees the offsets jump and fetches the
    missing ones from history on the same connection."""
    rs = await start_server(history_size=100_000, queue_max_frames=50, queue_max_bytes=64 * 1024,
                            slow_consumer_policy="drop-oldest")
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url, buffer_size=4) as c, c.subscribe("bulk") as sub:
            (conn,) = rs.server.connections
            n = await publish_bulk_until(rs, lambda: conn.statistics().dropped_frames > 0)
            offsets = await read_bulk(rs, sub, n)
            stats = c.statistics()
    assert offsets == list(range(1, n + 2))
    # Publications that arrived live after the jump were also among the
    # recovered ones: skipped, not yielded twice.
    assert stats.reconnects == 0 and stats.gaps == 0 and stats.duplicates_skipped > 0


async def _restart(rs: Any, start_server: Any) -> Any:
    """Drain *rs* and start a new server (new memory history, new epoch) on its port."""
    port = rs.port
    await rs.server.drain()
    return await start_server(port=port)


async def test_server_restart_raises_recovery_gap(start_server: Any, autojump_clock: Any) -> None:
    rs1 = await start_server()
    epoch1 = rs1.server.hub.epoch_of("news")
    with trio.fail_after(LIMIT):
        async with connect(rs1.ws_url) as c, c.subscribe("news") as sub:
            for i in range(3):
                rs1.server.hub.publish_nowait("news", i)
            assert [(await next_pub(sub)).offset for _ in range(3)] == [1, 2, 3]
            rs2 = await _restart(rs1, start_server)
            epoch2 = rs2.server.hub.epoch_of("news")
            assert epoch2 != epoch1
            await wait_until(lambda: rs2.server.hub.subscriber_count("news") == 1, what="resubscribed")
            rs2.server.hub.publish_nowait("news", "after")

            with pytest.raises(RecoveryGap) as info:
                await next_pub(sub)
            gap = info.value
            assert (gap.topic, gap.last_epoch, gap.last_offset, gap.new_epoch, gap.new_offset) == (
                "news", epoch1, 3, epoch2, 0,
            )
            assert "epoch changed" in str(gap)
            assert sub.position == StreamPosition(epoch2, 0)
            # Iterating again continues from the new position.
            assert await next_pub(sub) == Publication("news", 1, "after")
            stats = c.statistics()
            assert (stats.reconnects, stats.gaps, stats.state) == (1, 1, ClientState.OPEN)


async def test_server_restart_with_on_gap_continues(start_server: Any, autojump_clock: Any) -> None:
    rs1 = await start_server()
    gaps: list[RecoveryGap] = []

    def on_gap(gap: RecoveryGap) -> bool:
        gaps.append(gap)
        return True

    with trio.fail_after(LIMIT):
        async with connect(rs1.ws_url, on_gap=on_gap) as c, c.subscribe("news") as sub:
            rs1.server.hub.publish_nowait("news", "before")
            assert (await next_pub(sub)).data == "before"
            rs2 = await _restart(rs1, start_server)
            await wait_until(lambda: rs2.server.hub.subscriber_count("news") == 1, what="resubscribed")
            rs2.server.hub.publish_nowait("news", "after")
            assert await next_pub(sub) == Publication("news", 1, "after")
            assert c.statistics().gaps == 1
    new_epoch = rs2.server.hub.epoch_of("news")
    assert [(g.last_offset, g.new_epoch, g.new_offset) for g in gaps] == [(1, new_epoch, 0)]


async def test_reconnect_backs_off_while_the_server_is_away(start_server: Any, autojump_clock: Any) -> None:
    rs1 = await start_server()
    port = rs1.port
    backoff_max = 4.0
    with trio.fail_after(200):
        async with connect(rs1.ws_url, backoff_initial=0.1, backoff_max=backoff_max,
                           on_gap=lambda gap: True) as c, c.subscribe("news") as sub:
            await rs1.server.drain()
            # While the server is away, something accepts on its port and closes
            # each connection at once: every attempt fails, and is timed here.
            attempts: list[float] = []
            listener = trio.socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await listener.bind(("127.0.0.1", port))
            listener.listen()

            async def refuse() -> None:
                while True:
                    conn, _ = await listener.accept()
                    attempts.append(trio.current_time())
                    conn.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(refuse)
                await trio.sleep(60)
                nursery.cancel_scope.cancel()
            listener.close()
            assert c.statistics().state is ClientState.RECONNECTING

            intervals = [b - a for a, b in itertools.pairwise(attempts)]
            # Without backoff there would be thousands; with it, about 60 / (4 / 2).
            assert 15 <= len(attempts) <= 50, len(attempts)
            assert 1.0 < max(intervals) <= backoff_max + 0.01  # grew past the first delays, capped
            assert len({round(i, 3) for i in intervals}) > len(intervals) // 2  # jittered
            assert c.statistics().failed_attempts >= len(attempts)

            rs2 = await start_server(port=port)
            back = trio.current_time()
            await wait_until(lambda: c.statistics().state is ClientState.OPEN, timeout=30)
            assert trio.current_time() - back <= backoff_max + 0.5
            await wait_until(lambda: rs2.server.hub.subscriber_count("news") == 1, what="resubscribed")
            rs2.server.hub.publish_nowait("news", "back")
            assert (await next_pub(sub)).data == "back"
            assert c.statistics().reconnects == 1


async def test_silent_server_is_detected_by_the_heartbeat(autojump_clock: Any) -> None:
    """A server that completes the upgrade and then never answers anything (not
    even pings) is given up on after ping_interval + ping_timeout."""
    accepted: list[float] = []
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def mute_server(nursery: trio.Nursery) -> None:
        while True:
            sock, _ = await listener.accept()
            accepted.append(trio.current_time())
            nursery.start_soon(upgrade_then_ignore, trio.SocketStream(sock))

    async def upgrade_then_ignore(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(4096)
            key = re.search(rb"(?i)sec-websocket-key: *(\S+)", request).group(1)  # type: ignore[union-attr]
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            await trio.sleep_forever()

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mute_server, nursery)
            async with connect(f"ws://127.0.0.1:{port}/ws", ping_interval=5, ping_timeout=2,
                               backoff_initial=0.01, backoff_max=0.01) as c:
                await wait_until(lambda: len(accepted) == 2, timeout=60, what="a reconnect")
                assert accepted[1] - accepted[0] == pytest.approx(7, abs=0.05)
                assert c.statistics().reconnects == 1
            nursery.cancel_scope.cancel()
    listener.close()


# --- tokens --------------------------------------------------------------------------------------


async def test_token_provider_is_called_again_on_reconnect(start_server: Any) -> None:
    rs = await start_server(token_secret=SECRET)
    hub = rs.server.hub
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        await trio.sleep(0)
        return make_token(f"alice-{calls}", subscribe=["news"], presence=True)

    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url, token=provider) as c, c.subscribe("news") as sub:
            assert calls == 1
            assert [i.client for i in await c.presence("news")] == ["alice-1"]
            hub.publish_nowait("news", 1)
            assert (await next_pub(sub)).offset == 1
            assert cut_connections(rs) == 1
            hub.publish_nowait("news", 2)
            assert (await next_pub(sub)).offset == 2
            assert calls == 2
            assert [i.client for i in await c.presence("news")] == ["alice-2"]


async def test_refused_token_raises_unauthorized_and_does_not_reconnect(start_server: Any) -> None:
    rs = await start_server(token_secret=SECRET)
    with trio.fail_after(LIMIT):
        async with connect(rs.ws_url, token="not-a-jwt") as c:
            with pytest.raises(Unauthorized):
                async with c.subscribe("news"):
                    pass
            with pytest.raises(Unauthorized):
                await c.ping()
            stats = c.statistics()
            assert (stats.state, stats.reconnects, stats.failed_attempts) == (ClientState.CLOSED, 0, 0)


async def test_expiring_token_is_refreshed(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(token_secret=SECRET, refresh_grace=5)
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        return make_token(ttl=60 if calls == 1 else 3600, subscribe=["news"])

    with trio.fail_after(200):
        async with connect(rs.ws_url, token=provider) as c, c.subscribe("news") as sub:
            await trio.sleep(120)  # past the first token's expiry and the grace period
            assert calls == 2
            assert (c.statistics().state, c.statistics().reconnects) == (ClientState.OPEN, 0)
            rs.server.hub.publish_nowait("news", 1)
            assert (await next_pub(sub)).offset == 1


async def test_fixed_token_that_expires_ends_in_unauthorized(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(token_secret=SECRET, refresh_grace=5)
    with trio.fail_after(200):
        async with connect(rs.ws_url, token=make_token(ttl=60, subscribe=["news"])) as c:
            async with c.subscribe("news") as sub:
                with pytest.raises(Unauthorized):
                    await next_pub(sub)
            assert c.statistics().state is ClientState.CLOSED
