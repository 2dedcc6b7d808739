"""``trioserve bench`` against real servers: the report's numbers match what was sent.

Each test runs the bench as a process (``python -m trioserve bench``) against
a server in the test's own trio loop: trioserve itself (``start_server``), or
a lossy double. Small N, no fixed ports, every wait bounded.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio

from trioserve import Connection

from .helpers import LossyServer, fast, run_bench

pytestmark = pytest.mark.system


async def test_fanout_delivers_every_publication_to_every_subscriber(start_server, tmp_path: Path) -> None:
    running = await start_server(client_publish=True)
    # 50 publications/s for 1 s to 20 subscribers on one topic: 1,000 deliveries.
    res = await run_bench(tmp_path, "fanout", "--url", running.ws_url, "-n", "20", "--rate", "50",
                          "--duration", "1", *fast())
    assert res.returncode == 0, res.stdout + res.stderr
    r = res.report
    assert r is not None
    m = r["messages"]
    assert (m["published"], m["expected"], m["received"], m["lost"]) == (50, 1000, 1000, 0)
    assert (m["gaps"], m["dups"]) == (0, 0)
    [topic] = m["per_topic"]
    assert (topic["first_offset"], topic["final_offset"], topic["subscribers"]) == (1, 50, 20)
    assert r["connect"]["ok"] == 20 and r["connect"]["failed"] == 0
    assert r["latency"]["count"] == 1000
    assert 0 < r["latency"]["p50_ms"] <= r["latency"]["p99_ms"] <= r["latency"]["max_ms"]
    # The server's own figures, scraped before and after.
    rows = {row["key"]: row for row in r["server"]["rows"]}
    assert rows["trioserve_deliveries_total"]["delta"] == 1000
    assert rows["trioserve_publications_total"]["delta"] == 50
    assert rows['trioserve_connections{transport="websocket"}']["after"] == 21  # + the publisher
    assert r["verdict"] == {"ok": True, "failures": []}
    assert "PASS" in res.stdout and "Per topic" in res.stdout


async def test_fanout_with_permessage_deflate_and_json_payloads(start_server, tmp_path: Path) -> None:
    from trioserve.net.websocket import DeflateWebSocketConnection

    from ..system.helpers import wait_until

    running = await start_server(client_publish=True)
    compressed = trio.Event()

    async def watch() -> None:
        # The subscribers hold their connections for the whole --duration.
        await wait_until(lambda: sum(isinstance(c, DeflateWebSocketConnection)
                                     for c in running.server.connections) >= 10,
                         what="10 compressed subscribers")
        compressed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        res = await run_bench(tmp_path, "fanout", "--url", running.ws_url, "-n", "10", "--rate", "40",
                              "--duration", "1", "--deflate", "--payload", "json", "--size", "1000",
                              *fast())
    assert compressed.is_set()
    assert res.returncode == 0, res.stdout + res.stderr
    r = res.report
    assert r is not None
    m = r["messages"]
    assert (m["published"], m["expected"], m["received"], m["lost"]) == (40, 400, 400, 0)
    assert (m["gaps"], m["dups"]) == (0, 0)


async def test_fanout_over_topics_and_processes_with_source_addresses(start_server, tmp_path: Path) -> None:
    peers: list[str] = []

    async def on_connect(conn: Connection) -> None:
        peers.append((conn.remote or "").rsplit(":", 1)[0])

    running = await start_server({"on_connect": on_connect}, client_publish=True)
    res = await run_bench(tmp_path, "fanout", "--url", running.ws_url, "-n", "30", "--topics", "3",
                          "--rate", "30", "--duration", "1", "--procs", "2",
                          "--source-ips", "127.0.0.2-127.0.0.3,127.0.0.7", *fast())
    assert res.returncode == 0, res.stdout + res.stderr
    r = res.report
    assert r is not None
    # 30 publications round-robin over 3 topics, 10 subscribers each.
    assert [(t["published"], t["subscribers"], t["expected"], t["received"], t["lost"])
            for t in r["messages"]["per_topic"]] == [(10, 10, 100, 100, 0)] * 3
    assert r["options"]["source_ips"] == ["127.0.0.2", "127.0.0.3", "127.0.0.7"]
    # Subscribers bound to the source addresses in turn; the publisher did not bind.
    assert sorted(Counter(peers).items()) == [("127.0.0.1", 1), ("127.0.0.2", 10), ("127.0.0.3", 10),
                                              ("127.0.0.7", 10)]


async def test_rooms_several_topics_per_connection_loss_and_cpu(start_server, tmp_path: Path) -> None:
    running = await start_server(client_publish=True)
    # 12 connections, 3 topics each of 6: every topic has 12 * 3 / 6 = 6 subscribers.
    # 60 publications over 2 publishers, round-robin: 10 per topic.
    res = await run_bench(tmp_path, "rooms", "--url", running.ws_url, "-n", "12", "--topics", "6",
                          "--subscriptions", "3", "--publishers", "2", "--rate", "60",
                          "--duration", "1", *fast())
    assert res.returncode == 0, res.stdout + res.stderr
    r = res.report
    assert r is not None
    assert [(t["published"], t["subscribers"], t["expected"], t["received"], t["lost"], t["gaps"])
            for t in r["messages"]["per_topic"]] == [(10, 6, 60, 60, 0, 0)] * 6
    assert r["latency"]["count"] == 360
    rows = {row["key"]: row for row in r["server"]["rows"]}
    assert rows["trioserve_deliveries_total"]["delta"] == 360
    assert rows["trioserve_subscriptions"]["after"] == 36
    assert r["server"]["server_cpu_us_per_delivery"] > 0
    assert r["verdict"] == {"ok": True, "failures": []}


async def test_loss_is_detected_by_offsets_and_fails_the_run(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        lossy = await nursery.start(LossyServer(skip_every=10).serve)
        res = await run_bench(tmp_path, "fanout", "--url", lossy.url, "-n", "20", "--rate", "50",
                              "--duration", "1", *fast("--drain-timeout", "1"))
        tolerated = await run_bench(tmp_path, "fanout", "--url", lossy.url, "-n", "20", "--rate", "50",
                                    "--duration", "1", "--max-loss", "0.2",
                                    *fast("--drain-timeout", "1"))
        nursery.cancel_scope.cancel()
    assert res.returncode == 1, res.stdout + res.stderr
    r = res.report
    assert r is not None
    m = r["messages"]
    # Offsets 10, 20, 30, 40 and 50 never arrive: 5 of 50 for each of 20 subscribers.
    assert (m["published"], m["expected"], m["received"], m["lost"]) == (50, 1000, 900, 100)
    assert m["gaps"] == 80  # the skipped 50 is the last one: lost, but no later offset shows the gap
    assert r["verdict"]["ok"] is False
    assert "100 of 1,000 deliveries lost" in r["verdict"]["failures"][0]
    assert "FAIL" in res.stdout
    # The double has no /metrics: the report says so and carries on.
    assert r["server"]["error"] and not r["server"].get("rows")
    # A loss within --max-loss passes.
    assert tolerated.returncode == 0, tolerated.stdout + tolerated.stderr
    assert tolerated.report is not None and tolerated.report["messages"]["loss_fraction"] == 0.1


async def test_max_p99_fails_a_run_that_is_too_slow(start_server, tmp_path: Path) -> None:
    running = await start_server(client_publish=True)
    res = await run_bench(tmp_path, "fanout", "--url", running.ws_url, "-n", "5", "--rate", "20",
                          "--duration", "0.5", "--max-p99", "0.0001", *fast())
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.report is not None
    assert res.report["messages"]["lost"] == 0
    [failure] = res.report["verdict"]["failures"]
    assert "over --max-p99 0.0001 ms" in failure


async def test_storm_reconnects_with_recovery_and_loses_nothing(start_server, tmp_path: Path) -> None:
    running = await start_server(client_publish=True)
    res = await run_bench(tmp_path, "storm", "--url", running.ws_url, "-n", "20", "--rate", "40",
                          "--duration", "2", "--storm-percent", "50", "--storm-interval", "0.5", *fast())
    assert res.returncode == 0, res.stdout + res.stderr
    r = res.report
    assert r is not None
    s, m = r["storm"], r["messages"]
    assert s["waves"], res.stdout
    assert s["dropped"] == s["reconnected"] == s["recovered"] == 10 * len(s["waves"]), res.stdout
    assert s["failed"] == s["unrecovered"] == 0, res.stdout
    assert (m["published"], m["expected"], m["received"], m["lost"], m["dups"]) == (80, 1600, 1600, 0, 0), \
        res.stdout
    assert r["connections"]["open_at_end"] == 20
    # The live count (callbacks, not a walk) agrees after the reconnects.
    assert r["timeline"][-1]["connections"] == 20, r["timeline"][-3:]


async def test_echo_and_idle_over_tcp(start_server, tmp_path: Path) -> None:
    running = await start_server()
    metrics = f"http://127.0.0.1:{running.port}/metrics"
    echo = await run_bench(tmp_path, "echo", "--url", f"tcp://127.0.0.1:{running.tcp_port}", "-n", "10",
                           "--rate", "100", "--duration", "1", "--metrics-url", metrics, *fast())
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert echo.report is not None
    assert echo.report["echo"] == {"sent": 100, "replies": 100, "lost": 0, "loss_fraction": 0.0,
                                   "round_trips_per_s": 100.0}
    assert echo.report["latency"]["kind"] == "round trip" and echo.report["latency"]["count"] == 100
    idle = await run_bench(tmp_path, "idle", "--url", f"tcp://127.0.0.1:{running.tcp_port}", "-n", "10",
                           "--duration", "0.5", *fast())
    assert idle.returncode == 0, idle.stdout + idle.stderr
    assert idle.report is not None
    assert idle.report["connect"]["ok"] == 10
    assert "a tcp:// URL needs --metrics-url" in idle.report["server"]["error"]


async def test_fanout_without_client_publish_is_a_run_error(start_server, tmp_path: Path) -> None:
    running = await start_server()
    res = await run_bench(tmp_path, "fanout", "--url", running.ws_url, "-n", "2", "--rate", "10",
                          "--duration", "0.3", *fast())
    assert res.returncode == 3, res.stdout + res.stderr
    assert "--client-publish" in res.stderr
    assert res.report is None


async def test_unreachable_server_is_a_run_error(tmp_path: Path) -> None:
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = await run_bench(tmp_path, "idle", "--url", f"ws://127.0.0.1:{port}/ws", "-n", "3",
                          "--duration", "0.1", *fast("--connect-timeout", "2"))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "no connection succeeded" in res.stderr and "ECONNREFUSED" in res.stderr
