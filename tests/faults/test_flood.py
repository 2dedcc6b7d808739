"""A connection flood above ``--max-connections``: counted rejections, no crash, clients unharmed.

800 subscribers are connected to a server whose limit is 1,000. A load
client then attempts 3,000 WebSocket upgrades, 300 at a time, and keeps the
ones that succeed, then 1,000 TCP connections. The 200 upgrades that fit
should get 101 and every other one a 503 (TCP: a 1013 close line). ``rejected_connections`` in
/metrics must count exactly the refusals, and the 800 subscribers must keep
receiving.
"""

from __future__ import annotations

import time

import pytest
import trio

from ..peers import RawWebSocket, http_request
from .helpers import (
    PublishLog,
    free_port,
    load_clients,
    machine,
    record,
    rss_mb,
    run_server,
    scrape,
    src_ips,
    steady_publisher,
)

pytestmark = pytest.mark.faults

MAX_CONNECTIONS = 1000
SUBSCRIBERS = 800
WS_FLOOD = 3000
TCP_FLOOD = 1000
TOPIC = "news"


async def test_flood_above_max_connections() -> None:
    tcp_port = free_port()
    with trio.fail_after(120):
        async with load_clients(2) as clients, run_server(
                "--max-connections", str(MAX_CONNECTIONS), "--tcp-port", str(tcp_port)) as server:
            subs = await clients.ask([
                {"op": "subscribe", "host": "127.0.0.1", "port": server.port, "topic": TOPIC,
                 "src_ips": src_ips(SUBSCRIBERS), "reconnect": False, "phase_timeout": 60},
                {"op": "ping"}], 90)
            assert subs[0]["subscribed"] == SUBSCRIBERS, subs
            rss_before = rss_mb(server.pid)
            t0 = time.monotonic()
            ws_flood, tcp_flood = (await clients.ask([
                {"op": "ping"},
                {"op": "flood", "host": "127.0.0.1", "port": server.port, "count": WS_FLOOD, "hold": True,
                 "src_ips": src_ips(WS_FLOOD, first=10), "concurrency": 300}], 90))[1], None
            tcp_flood = (await clients.ask([
                {"op": "ping"},
                {"op": "tcp_flood", "host": "127.0.0.1", "port": tcp_port, "count": TCP_FLOOD,
                 "src_ips": src_ips(TCP_FLOOD, first=20), "concurrency": 300}], 90))[1]
            flood_s = time.monotonic() - t0
            metrics = await scrape(server.port)
            # The subscribers keep receiving while the 200 flooders are held open.
            log = PublishLog()
            await steady_publisher(server.port, TOPIC, 20, 0.5, log)
            s = await clients.ask([{"op": "caught_up", "offset": log.sent, "timeout": 30},
                                   {"op": "ping"}], 60)
            assert (await http_request(server.port, "GET", "/healthz")).status == 200
            # Once the flooders leave, there is room again.
            await clients.ask([{"op": "ping"}, {"op": "close"}], 30)
            with trio.fail_after(10):
                while (await scrape(server.port))["trioserve_connections{transport=websocket}"] > SUBSCRIBERS:
                    await trio.sleep(0.1)
            fresh = await RawWebSocket.connect(server.port)
            await fresh.aclose()
            rss_after = rss_mb(server.pid)
            alive = server.proc.returncode is None
    ws_results, tcp_results = ws_flood["results"], tcp_flood["results"]
    rejected = metrics["trioserve_rejected_connections_total"]
    record("flood_above_max_connections", machine=machine(), max_connections=MAX_CONNECTIONS,
           subscribers=SUBSCRIBERS, ws_attempts=WS_FLOOD, ws_results=ws_results, tcp_attempts=TCP_FLOOD,
           tcp_results=tcp_results, flood_s=round(flood_s, 2), rejected_connections_metric=rejected,
           connections_metric=metrics["trioserve_connections{transport=websocket}"],
           subscribers_caught_up=s[0]["ok"], subscriber_gaps=s[0]["gaps"], publications=log.sent,
           rss_before_mb=round(rss_before, 1), rss_after_mb=round(rss_after, 1), server_alive=alive)
    assert alive
    assert set(ws_results) <= {"101", "503"} and sum(ws_results.values()) == WS_FLOOD, ws_results
    assert tcp_results == {"close 1013": TCP_FLOOD}, tcp_results
    assert rejected == ws_results["503"] + TCP_FLOOD, metrics
    assert s[0]["ok"] and s[0]["gaps"] == 0 and s[0]["last_min"] == log.sent, s[0]
    assert log.by_status() == {"200": log.sent}
    if ws_results["101"] > MAX_CONNECTIONS - SUBSCRIBERS:
        # Fixed bug, kept as a check: http._upgrade checks capacity, then awaits the rest
        # of the request and sends the 101; the connection is counted only in
        # Server._run_connection, so concurrent upgrades all pass the check.
        pytest.fail(f"regression: max_connections={MAX_CONNECTIONS} but {SUBSCRIBERS + ws_results['101']} "
                     "WebSocket connections were accepted (concurrent upgrades all pass the capacity check)")
