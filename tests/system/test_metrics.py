"""GET /metrics: scraped over HTTP from a real server and parsed with prometheus_client's parsers."""

from __future__ import annotations

import json
from typing import Any

import prometheus_client
import pytest
import trio
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import WebSocketConnection, open_websocket_url

from trioserve import Connection
from trioserve.server.metrics import server_registry

from ..peers import HttpResponse, NdjsonClient, RawWebSocket, dumps, http_publish, http_request
from .helpers import wait_until

pytestmark = pytest.mark.system

TOPIC = "metrics"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(families: Any) -> Samples:
    out: Samples = {}
    for family in families:
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


async def _scrape(port: int, accept: str | None = None) -> HttpResponse:
    headers = [] if accept is None else [("Accept", accept)]
    resp = await http_request(port, "GET", "/metrics", headers=headers)
    assert resp.status == 200, resp
    return resp


async def _metrics(port: int) -> Samples:
    """Scrape in the Prometheus text format and parse it."""
    resp = await _scrape(port)
    assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return _samples(text_string_to_metric_families(resp.body.decode("utf-8")))


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def _ws_subscribe(ws: WebSocketConnection, topic: str = TOPIC) -> None:
    await ws.send_message(dumps({"op": "subscribe", "topic": topic, "id": "s"}))
    assert json.loads(await ws.get_message())["ok"] is True


async def _ws_ping(ws: WebSocketConnection) -> None:
    # The reply proves the server has registered the connection (the 101 alone does not).
    await ws.send_message(dumps({"op": "ping", "id": "p"}))
    assert json.loads(await ws.get_message()) == {"id": "p", "ok": True, "op": "pong"}


async def test_connections_gauge_counts_websocket_and_tcp_clients(start_server: Any) -> None:
    rs = await start_server(max_connections=100)
    with trio.fail_after(20):
        m = await _metrics(rs.port)
        assert _value(m, "trioserve_connections", transport="websocket") == 0
        assert _value(m, "trioserve_connections", transport="tcp") == 0
        assert _value(m, "trioserve_max_connections") == 100
        # The process, platform and GC collectors share the server's registry.
        names = {name for name, _ in m}
        assert {"process_open_fds", "python_info", "python_gc_objects_collected_total"} <= names

        async with (
            open_websocket_url(rs.ws_url) as ws1,
            open_websocket_url(rs.ws_url) as ws2,
            open_websocket_url(rs.ws_url) as ws3,
        ):
            tcp = [await NdjsonClient.connect(rs.tcp_port) for _ in range(2)]
            for ws in (ws1, ws2, ws3):
                await _ws_ping(ws)
            for client in tcp:
                await client.send({"op": "ping", "id": "p"})
                assert await client.recv() == {"id": "p", "ok": True, "op": "pong"}

            m = await _metrics(rs.port)
            assert _value(m, "trioserve_connections", transport="websocket") == 3
            assert _value(m, "trioserve_connections", transport="tcp") == 2
            assert _value(m, "trioserve_connects_total", transport="websocket") == 3
            assert _value(m, "trioserve_connects_total", transport="tcp") == 2

            await tcp[0].aclose()
            await wait_until(lambda: rs.server.statistics().tcp_connections == 1,
                             what="the closed TCP client to leave")
            m = await _metrics(rs.port)
            assert _value(m, "trioserve_connections", transport="tcp") == 1
            assert _value(m, "trioserve_connects_total", transport="tcp") == 2
            disconnects = {dict(labels)["code"]: v for (name, labels), v in m.items()
                           if name == "trioserve_disconnects_total"}
            assert sum(disconnects.values()) == 1, disconnects
            await tcp[1].aclose()


async def test_publications_deliveries_and_fanout_latency(start_server: Any) -> None:
    ws_subscribers, tcp_subscribers, publications = 3, 2, 25
    subscribers = ws_subscribers + tcp_subscribers
    rs = await start_server()
    received: dict[str, list[int]] = {}
    ready = trio.Event()

    async def ws_subscriber(i: int) -> None:
        async with open_websocket_url(rs.ws_url) as ws:
            await _ws_subscribe(ws)
            mark_ready()
            got = received.setdefault(f"ws{i}", [])
            while len(got) < publications:
                got.append(json.loads(await ws.get_message())["offset"])

    async def tcp_subscriber(i: int) -> None:
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            await client.send({"op": "subscribe", "topic": TOPIC, "id": "s"})
            assert (await client.recv())["ok"] is True
            mark_ready()
            got = received.setdefault(f"tcp{i}", [])
            while len(got) < publications:
                got.append((await client.recv())["offset"])

    waiting = subscribers

    def mark_ready() -> None:
        nonlocal waiting
        waiting -= 1
        if waiting == 0:
            ready.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(ws_subscribers):
                nursery.start_soon(ws_subscriber, i)
            for i in range(tcp_subscribers):
                nursery.start_soon(tcp_subscriber, i)
            await ready.wait()
            m = await _metrics(rs.port)
            assert _value(m, "trioserve_subscriptions") == subscribers
            assert _value(m, "trioserve_topics") == 1
            # Half over HTTP, half straight into the hub (a burst that batches).
            for n in range(publications // 2):
                assert (await http_publish(rs.port, TOPIC, {"n": n})).status == 200
            for n in range(publications // 2, publications):
                rs.server.hub.publish_nowait(TOPIC, {"n": n})
        assert all(got == list(range(1, publications + 1)) for got in received.values()), received
        assert len(received) == subscribers

        m = await _metrics(rs.port)
    assert _value(m, "trioserve_publications_total") == publications
    assert _value(m, "trioserve_deliveries_total") == subscribers * publications
    assert 1 <= _value(m, "trioserve_fanout_batches_total") <= publications
    assert _value(m, "trioserve_hub_pending") == 0
    assert _value(m, "trioserve_queued_bytes") == 0
    assert _value(m, "trioserve_queued_frames") == 0

    buckets = sorted(
        ((float(dict(labels)["le"]), v) for (name, labels), v in m.items()
         if name == "trioserve_fanout_latency_seconds_bucket"),
    )
    assert buckets[-1] == (float("inf"), publications)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"buckets not cumulative: {buckets}"
    assert len(buckets) > 2
    assert _value(m, "trioserve_fanout_latency_seconds_count") == publications
    total = _value(m, "trioserve_fanout_latency_seconds_sum")
    assert 0 <= total < publications * 10


def _server_side(rs: Any, ws: RawWebSocket) -> Connection:
    conns: list[Connection] = [c for c in rs.server.connections if c.remote == f"127.0.0.1:{ws.local_port}"]
    assert len(conns) == 1, rs.server.connections
    return conns[0]


async def test_slow_consumer_disconnect_counts_4008(start_server: Any) -> None:
    queue_max_bytes = 16 * 1024
    payload = "z" * 4000
    # close_timeout is long so the closed connection, with its backlog, is still
    # there to be seen in the queued_* gauges until the client goes away.
    rs = await start_server(queue_max_bytes=queue_max_bytes, close_timeout=20)
    with trio.fail_after(30):
        # A tiny receive buffer and never a read: the server's queue for it fills.
        slow = await RawWebSocket.connect(rs.port, rcvbuf=4096)
        async with slow.stream:
            await slow.send_json({"op": "subscribe", "topic": TOPIC, "id": "slow"})
            assert (await slow.recv_json())["ok"] is True
            conn = _server_side(rs, slow)
            published = 0
            while not conn.statistics().slow_consumer:
                # Loopback kernel buffers can take a few MB before the server queues.
                assert published < 8000, "the slow client's queue never hit its limit"
                for _ in range(4):
                    rs.server.hub.publish_nowait(TOPIC, {"pad": payload})
                published += 4
                await rs.server.hub.flush()

            m = await _metrics(rs.port)
            assert _value(m, "trioserve_slow_consumer_disconnects_total") == 0
            assert _value(m, "trioserve_queued_bytes") > 0
            assert _value(m, "trioserve_queued_frames") > 0
        # The client hangs up without reading; the server counts the close it started.
        await wait_until(lambda: conn not in rs.server.connections, what="the slow client to go")

        m = await _metrics(rs.port)
    assert _value(m, "trioserve_slow_consumer_disconnects_total") == 1
    assert _value(m, "trioserve_disconnects_total", code="4008") == 1
    assert _value(m, "trioserve_heartbeat_timeouts_total") == 0
    assert _value(m, "trioserve_queued_bytes") == 0
    assert _value(m, "trioserve_connections", transport="websocket") == 0


async def test_draining_gauge_is_1_during_a_drain(start_server: Any) -> None:
    # A raw client that never answers the server's close frame holds the drain open.
    rs = await start_server(close_timeout=30, drain_timeout=30)
    with trio.fail_after(30):
        client = await RawWebSocket.connect(rs.port)
        await client.send_json({"op": "ping", "id": 1})
        assert await client.recv_json() == {"id": 1, "ok": True, "op": "pong"}
        assert _value(await _metrics(rs.port), "trioserve_draining") == 0

        async with trio.open_nursery() as nursery:
            nursery.start_soon(rs.server.drain)
            await wait_until(lambda: rs.server.draining, what="the drain to start")
            assert (await http_request(rs.port, "GET", "/readyz")).status == 503
            m = await _metrics(rs.port)
            assert _value(m, "trioserve_draining") == 1
            assert _value(m, "trioserve_connections", transport="websocket") == 1
            await client.aclose()  # lets the drain finish
    assert rs.server.statistics().draining is True


async def test_two_servers_in_one_process_report_independently(start_server: Any) -> None:
    a = await start_server()
    b = await start_server()
    with trio.fail_after(20):
        async with open_websocket_url(a.ws_url) as ws:
            await _ws_subscribe(ws)
            for n in range(3):
                assert (await http_publish(a.port, TOPIC, n)).status == 200
            for _ in range(3):
                assert json.loads(await ws.get_message())["op"] == "pub"
            ma = await _metrics(a.port)
            mb = await _metrics(b.port)
    assert _value(ma, "trioserve_connections", transport="websocket") == 1
    assert _value(ma, "trioserve_publications_total") == 3
    assert _value(ma, "trioserve_deliveries_total") == 3
    assert _value(mb, "trioserve_connections", transport="websocket") == 0
    assert _value(mb, "trioserve_publications_total") == 0
    assert _value(mb, "trioserve_fanout_latency_seconds_count") == 0
    # Each has its own registry, with its own process collectors; the global one is untouched.
    ra, rb = server_registry(a.server), server_registry(b.server)
    assert ra is not rb and prometheus_client.REGISTRY not in (ra, rb)
    assert ("process_open_fds", frozenset()) in ma and ("process_open_fds", frozenset()) in mb
    assert not any(f.name.startswith("trioserve_") for f in prometheus_client.REGISTRY.collect())


async def test_openmetrics_negotiation_and_open_without_api_key(start_server: Any) -> None:
    rs = await start_server(api_key="secret")
    with trio.fail_after(20):
        # The API key guards publishing; the scraper needs none.
        resp = await _scrape(rs.port, accept="application/openmetrics-text; version=1.0.0")
        assert resp.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        text = resp.body.decode("utf-8")
        assert text.endswith("# EOF\n")
        assert "# UNIT trioserve_fanout_latency_seconds seconds\n" in text
        families = {f.name: f for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]
        assert families["trioserve_publications"].type == "counter"
        assert families["trioserve_fanout_latency_seconds"].type == "histogram"
        assert families["trioserve_draining"].type == "gauge"
        om = _samples(families.values())
        assert _value(om, "trioserve_publications_total") == 0

        plain = await _scrape(rs.port, accept="text/plain")
        assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert not plain.body.endswith(b"# EOF\n")
        assert (await http_request(rs.port, "POST", "/metrics")).status == 405
