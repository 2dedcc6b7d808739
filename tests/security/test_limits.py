"""Abuse limits: connections per address, message rate, subscriptions per connection,
queued bytes per process. Each test feeds the bad input, checks the named error or
close code, and checks that another client keeps working."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio

from trioserve import Config, Connection
from trioserve.config import DEFAULT_MAX_CONNECTIONS_PER_IP, ConfigError
from trioserve.net.admission import peer_key
from trioserve.net.connection import RATE_CLOSE_FACTOR
from trioserve.protocol.codes import CloseCode

from ..peers import Closed, NdjsonClient, RawWebSocket, Refused

# --- connections per address ---------------------------------------------------------------------


def test_per_ip_default_exempts_loopback_only() -> None:
    config = Config()
    assert config.per_ip_limit(loopback=True) == 0
    assert config.per_ip_limit(loopback=False) == DEFAULT_MAX_CONNECTIONS_PER_IP == 1000
    # A value that is set applies everywhere; 0 turns the limit off everywhere.
    assert Config(max_connections_per_ip=5).per_ip_limit(loopback=True) == 5
    assert Config(max_connections_per_ip=0).per_ip_limit(loopback=False) == 0


def test_peer_keys_group_ipv6_by_64() -> None:
    assert peer_key("203.0.113.7:5000") == ("203.0.113.7", False)
    assert peer_key("127.0.0.2:5000") == ("127.0.0.2", True)
    a, _ = peer_key("[2001:db8:1:2::1]:443")
    b, _ = peer_key("[2001:db8:1:2:ffff::9]:443")
    c, _ = peer_key("[2001:db8:1:3::1]:443")
    assert a == b != c
    assert peer_key("[::1]:80")[1] is True
    assert peer_key("[::ffff:198.51.100.1]:80") == ("198.51.100.1", False)


async def test_over_max_connections_per_ip_gets_503_and_1013(start_server: Any) -> None:
    rs = await start_server(max_connections_per_ip=2)
    with trio.fail_after(15):
        first = await RawWebSocket.connect(rs.port)
        second = await RawWebSocket.connect(rs.port)

        with pytest.raises(Refused) as refused:
            await RawWebSocket.connect(rs.port)
        assert refused.value.status == 503
        error = json.loads(refused.value.body)["error"]
        assert error["code"] == "unavailable" and "max_connections_per_ip" in error["message"]

        tcp = await NdjsonClient.connect(rs.tcp_port)
        close = json.loads(await tcp.recv_line() or b"null")
        assert close["op"] == "close" and close["code"] == CloseCode.TRY_AGAIN_LATER
        assert "max_connections_per_ip" in close["reason"]
        assert await tcp.recv_line() is None
        await tcp.aclose()

        # Another address is counted on its own, and the first one's clients are untouched.
        other = await RawWebSocket.connect(rs.port, source="127.0.0.2")
        assert (await other.request({"op": "ping", "id": 1}))["ok"] is True
        assert (await first.request({"op": "ping", "id": 2}))["ok"] is True
        assert rs.server.statistics().rejected_connections == 2

        # A slot frees up when a client leaves.
        await second.aclose()
        while rs.server._admission._per_ip.get("127.0.0.1", 0) > 1:
            await trio.sleep(0.01)
        third = await RawWebSocket.connect(rs.port)
        assert (await third.request({"op": "ping", "id": 3}))["ok"] is True
        for client in (first, third, other):
            await client.aclose()
    with trio.fail_after(5):
        while rs.server._admission._per_ip:
            await trio.sleep(0.01)


async def test_loopback_is_exempt_by_default(start_server: Any) -> None:
    rs = await start_server()
    assert rs.server.config.max_connections_per_ip is None
    with trio.fail_after(10):
        clients = [await RawWebSocket.connect(rs.port) for _ in range(5)]
        assert rs.server._admission._per_ip == {}  # loopback peers are not even counted
        for client in clients:
            await client.aclose()


# --- message rate --------------------------------------------------------------------------------


async def test_rate_limited_replies_then_recovery(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(rate_limit=10, rate_burst=5)
    client = await RawWebSocket.connect(rs.port)
    await client.send_many([{"op": "ping", "id": i} for i in range(8)])
    replies = [await client.recv_json() for _ in range(8)]
    assert [r["ok"] for r in replies] == [True] * 5 + [False] * 3
    for i, reply in enumerate(replies[5:], start=5):
        assert reply["id"] == i and reply["error"]["code"] == "rate_limited"
    # Refused messages count too: 3 in debt, so one more message needs 0.4 s of refill.
    await trio.sleep(0.35)
    assert (await client.request({"op": "ping", "id": "early"}))["error"]["code"] == "rate_limited"
    await trio.sleep(1.0)
    assert await client.request({"op": "ping", "id": "later"}) == {"id": "later", "ok": True, "op": "pong"}
    await client.aclose()


async def test_rate_limit_flood_is_closed_4029(start_server: Any, autojump_clock: Any) -> None:
    burst = 5
    rs = await start_server(rate_limit=10, rate_burst=burst, client_publish=True)
    bystander = await RawWebSocket.connect(rs.port)
    assert (await bystander.request({"op": "subscribe", "topic": "t"}))["ok"] is True
    flooder = await RawWebSocket.connect(rs.port)
    # Enough to run RATE_CLOSE_FACTOR * burst messages into debt, in one write:
    # the server handles them without the clock moving.
    count = burst + RATE_CLOSE_FACTOR * burst + 10
    await flooder.send_many([{"op": "publish", "topic": "t", "data": i, "id": i} for i in range(count)])
    replies = []
    with pytest.raises(Closed) as closed:
        while True:
            replies.append(await flooder.recv_json())
    assert (closed.value.code, closed.value.reason) == (CloseCode.RATE_LIMITED, "rate limited")
    assert [r["ok"] for r in replies[:burst]] == [True] * burst
    assert {r["error"]["code"] for r in replies[burst:]} == {"rate_limited"}
    # The next message after these put it over the edge; it got the close frame instead.
    assert len(replies) == burst + RATE_CLOSE_FACTOR * burst
    await flooder.aclose()
    # The bystander got the publications that went through, and carries on.
    got = [(await bystander.recv_json())["data"] for _ in range(burst)]
    assert got == list(range(burst))
    assert (await bystander.request({"op": "ping", "id": "ok"}))["ok"] is True
    while CloseCode.RATE_LIMITED not in rs.server.statistics().disconnects_total:
        await trio.sleep(0.01)
    await bystander.aclose()


async def test_tcp_pings_count_against_the_rate(start_server: Any, autojump_clock: Any) -> None:
    rs = await start_server(rate_limit=1, rate_burst=2)
    client = await NdjsonClient.connect(rs.tcp_port)
    # Transport-level pings are answered by the connection, not the handler,
    # but share its bucket: over it, no pong.
    await client.send_raw(b'{"op":"ping","id":1}\n{"op":"ping","id":2}\n{"op":"ping","id":3}\n')
    assert await client.recv() == {"id": 1, "ok": True, "op": "pong"}
    assert await client.recv() == {"id": 2, "ok": True, "op": "pong"}
    await client.send_raw(b'{"op":"subscribe","topic":"x","id":4}\n')
    reply = await client.recv()
    assert reply["id"] == 4 and reply["error"]["code"] == "rate_limited"
    await trio.sleep(3)
    assert (await client.request({"op": "subscribe", "topic": "x", "id": 5}))["ok"] is True
    await client.aclose()


async def test_rate_limit_zero_is_off(start_server: Any) -> None:
    rs = await start_server(rate_limit=0, rate_burst=1)
    with trio.fail_after(10):
        client = await RawWebSocket.connect(rs.port)
        await client.send_many([{"op": "ping", "id": i} for i in range(50)])
        assert all([(await client.recv_json())["ok"] for _ in range(50)])
        await client.aclose()


# --- subscriptions per connection ------------------------------------------------------------------


async def test_too_many_subscriptions(start_server: Any) -> None:
    rs = await start_server(max_subscriptions=3)
    with trio.fail_after(10):
        client = await RawWebSocket.connect(rs.port)
        for topic in ("a", "b", "c"):
            assert (await client.request({"op": "subscribe", "topic": topic}))["ok"] is True
        reply = await client.request({"op": "subscribe", "topic": "d", "id": 9})
        assert reply["id"] == 9 and reply["ok"] is False
        assert reply["error"]["code"] == "too_many_subscriptions"
        assert "max_subscriptions" in reply["error"]["message"]
        # Still usable: subscribing again to a held topic is fine, and freeing one makes room.
        assert (await client.request({"op": "subscribe", "topic": "a"}))["ok"] is True
        assert (await client.request({"op": "unsubscribe", "topic": "b"}))["ok"] is True
        assert (await client.request({"op": "subscribe", "topic": "d"}))["ok"] is True
        rs.server.hub.publish_nowait("d", "hello")
        assert (await client.recv_json())["data"] == "hello"
        # The limit is per connection.
        other = await NdjsonClient.connect(rs.tcp_port)
        for topic in ("a", "b", "c"):
            assert (await other.request({"op": "subscribe", "topic": topic}))["ok"] is True
        assert (await other.request({"op": "subscribe", "topic": "e"}))["error"]["code"] == \
            "too_many_subscriptions"
        await client.aclose()
        await other.aclose()


# --- queued bytes per process ----------------------------------------------------------------------

PAYLOAD = "q" * 4000


async def test_max_queued_bytes_sheds_the_largest_queue(start_server: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trioserve")
    limit = 256 * 1024
    # Per-connection limits far above the process limit, so only the latter acts.
    rs = await start_server(max_queued_bytes=limit, queue_max_bytes=64 * 1024 * 1024,
                            queue_max_frames=1_000_000, close_timeout=30)
    server = rs.server
    with trio.fail_after(60):
        fast = await RawWebSocket.connect(rs.port)
        big = await RawWebSocket.connect(rs.port)     # two topics: its queue grows twice as fast
        small = await RawWebSocket.connect(rs.port)
        for client, topics in ((fast, "ab"), (big, "ab"), (small, "a")):
            for topic in topics:
                assert (await client.request({"op": "subscribe", "topic": topic}))["ok"] is True

        def conn_of(n: int) -> Connection:
            return sorted(server.connections, key=lambda c: c.id)[n]

        big_conn, small_conn = conn_of(1), conn_of(2)
        # big and small never read; fast reads everything, which paces the publisher.
        sent = 0
        while big_conn.close_code is None:
            assert sent < 20_000, "the queued total never passed max_queued_bytes"
            for topic in "ab":
                server.hub.publish_nowait(topic, {"n": sent, "pad": PAYLOAD})
            for _ in range(2):
                assert (await fast.recv_json())["data"]["n"] == sent
            sent += 1
        assert big_conn.close_code == CloseCode.SLOW_CONSUMER
        assert "over max_queued_bytes" in caplog.text and "queue over its limit" not in caplog.text
        assert big_conn.statistics().slow_consumer is True
        # Shedding the largest queue brought the total back under the limit, so the
        # smaller one was left alone; the reader never noticed.
        assert small_conn.close_code is None
        assert server._queue_total.bytes <= limit + 64 * 1024
        for n in range(sent, sent + 5):
            for topic in "ab":
                server.hub.publish_nowait(topic, {"n": n})
            for _ in range(2):
                assert (await fast.recv_json())["data"]["n"] == n
        assert (await fast.request({"op": "ping", "id": 1}))["ok"] is True
        for client in (fast, big, small):
            await client.aclose()
        while server.connections:
            await trio.sleep(0.01)
    # Every byte added to the process total was taken off again.
    assert server._queue_total.bytes == 0


async def test_queued_total_tracks_each_queue(start_server: Any) -> None:
    rs = await start_server(queue_max_bytes=64 * 1024 * 1024, queue_max_frames=1_000_000)
    server = rs.server
    with trio.fail_after(30):
        stalled = [await RawWebSocket.connect(rs.port) for _ in range(3)]
        for client in stalled:
            assert (await client.request({"op": "subscribe", "topic": "t"}))["ok"] is True
        while all(c.queued_bytes == 0 for c in server.connections):
            server.hub.publish_nowait("t", PAYLOAD)
            await trio.sleep(0)
        await server.hub.flush()
        assert server._queue_total.bytes == sum(c.queued_bytes for c in server.connections) > 0
        for client in stalled:
            await client.aclose()
        while server.connections:
            await trio.sleep(0.01)
    assert server._queue_total.bytes == 0


# --- configuration ------------------------------------------------------------------------------


def test_limits_and_tls_from_file_environment_and_flags(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from trioserve.config import load_config
    from trioserve.ops.cli import main

    path = tmp_path / "trioserve.toml"
    path.write_text('max_connections_per_ip = 50\nrate_limit = 20.0\nrate_burst = 40\n'
                    'max_subscriptions = 10\nmax_queued_bytes = 1000000\ncertfile = "tls/cert.pem"\n'
                    'keyfile = "tls/key.pem"\n', encoding="utf-8")
    config = load_config(path, env={"TRIOSERVE_RATE_LIMIT": "30", "TRIOSERVE_MAX_CONNECTIONS_PER_IP": ""},
                         overrides={"max_subscriptions": 5})
    assert (config.max_connections_per_ip, config.rate_limit, config.rate_burst,
            config.max_subscriptions, config.max_queued_bytes) == (None, 30.0, 40, 5, 1_000_000)
    # Relative to the config file, like token_public_key_file.
    assert config.certfile == str(tmp_path / "tls" / "cert.pem")
    assert config.keyfile == str(tmp_path / "tls" / "key.pem")

    with pytest.raises(ConfigError, match="rate_burst must be a positive integer"):
        Config(rate_burst=0)
    with pytest.raises(ConfigError, match="max_connections_per_ip must be an integer >= 0"):
        Config(max_connections_per_ip=-1)

    runner = CliRunner()
    result = runner.invoke(main, ["serve", "--help"])
    for flag in ("--max-connections-per-ip", "--rate-limit", "--rate-burst", "--max-subscriptions",
                 "--max-queued-bytes", "--certfile", "--keyfile"):
        assert flag in result.output
    # A certificate that cannot be loaded stops the server before it binds, with status 2.
    result = runner.invoke(main, ["serve", "--port", "0", "--certfile", str(tmp_path / "nope.pem")], env={})
    assert result.exit_code == 2 and "not found" in result.output
