"""Memory-leak check: connect/disconnect cycles in batches, the server's RSS after each.

Each cycle: TCP connect (from one of 100 loopback source addresses), WebSocket
upgrade, subscribe to one of 50 topics (the reply awaited), then leave one of
three ways in turn: a close handshake (2 in 4), a reset (SO_LINGER 0), or a
TCP close without a close frame. After each batch the test waits until the
server holds no connection and samples its RSS.

The first two batches are the warm-up (allocator arenas, interned strings,
caches reach their working size). The check: RSS after the last batch is
less than 10 MB above RSS after the warm-up, and no batch after the warm-up
is more than 10 MB above it.

``TRIOSERVE_LEAK_CYCLES`` sets the number of cycles (default 50,000 in the
suite; ``TRIOSERVE_LEAK_CYCLES=1000000`` runs the full million by hand).
"""

from __future__ import annotations

import time

import pytest
import trio

from .helpers import env_int, free_port, load_clients, machine, record, rss_mb, run_server, scrape, src_ips

pytestmark = pytest.mark.faults

CYCLES = env_int("TRIOSERVE_LEAK_CYCLES", 50_000)
BATCHES = 10
WARMUP = 2
BOUND_MB = 10.0
PROCS = 2


async def test_connect_disconnect_cycles_do_not_leak() -> None:
    batch = CYCLES // BATCHES
    series: list[float] = []
    rates: list[float] = []
    failed = 0
    ips = sorted(set(src_ips(100 * PROCS, per_ip=1)))
    with trio.fail_after(60 + CYCLES / 500):
        async with load_clients(PROCS) as clients, \
                run_server(port=free_port(), level="warning") as server:
            series.append(rss_mb(server.pid))
            for _ in range(BATCHES):
                t0 = time.monotonic()
                replies = await clients.ask(
                    [{"op": "cycles", "host": "127.0.0.1", "port": server.port, "count": batch // PROCS,
                      "concurrency": 50, "src_ips": ips[i::PROCS], "topics": 50} for i in range(PROCS)],
                    timeout=30 + batch / 200)
                rates.append(sum(r["ok"] for r in replies) / (time.monotonic() - t0))
                failed += sum(r["failed"] for r in replies)
                with trio.fail_after(30):
                    while (m := await scrape(server.port)).get("trioserve_connections{transport=websocket}"):
                        await trio.sleep(0.1)
                await trio.sleep(0.5)
                series.append(rss_mb(server.pid))
            connects = m["trioserve_connects_total{transport=websocket}"]
            subscriptions = m["trioserve_subscriptions"]
    base = series[WARMUP]
    growth = series[-1] - base
    worst = max(series[WARMUP:]) - base
    record("leak_connect_disconnect", machine=machine(), cycles=CYCLES, batches=BATCHES,
           cycles_per_batch=batch, connects_counted=int(connects), failed_cycles=failed,
           cycles_per_s=round(sum(rates) / len(rates)), rss_mb_series=[round(x, 1) for x in series],
           rss_after_warmup_mb=round(base, 1), growth_after_warmup_mb=round(growth, 1),
           worst_after_warmup_mb=round(worst, 1), bound_mb=BOUND_MB)
    assert failed == 0 and connects == batch * BATCHES, (failed, connects)
    assert subscriptions == 0
    assert growth < BOUND_MB and worst < BOUND_MB, series
