"""10,000 slowloris sockets while a real client keeps subscribing and receiving.

Two load-client processes open the sockets from several loopback source
addresses; each sends ``GET /ws HTTP/1.1`` and a ``Host`` line, then one more
header line every second, and never ends the head. The server runs with
``--handshake-timeout 2``: each socket must be closed about 2 s after it was
accepted, however slowly it trickles. Meanwhile a WebSocket subscriber gets a
publication every 50 ms from a WebSocket publisher, both connected before the
attack; their latency is the figure. A probe also opens a new connection
every 250 ms (``GET /healthz``), so the time a *new* client waits in the
flooded accept queue is recorded too.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from ..peers import RawWebSocket, http_request
from .helpers import (
    cpu_seconds,
    env_int,
    load_clients,
    machine,
    percentile,
    publisher,
    record,
    run_server,
    src_ips,
)

pytestmark = pytest.mark.faults

SOCKETS = env_int("TRIOSERVE_FAULTS_SLOWLORIS", 10000)
HANDSHAKE_TIMEOUT = 2.0
TOPIC = "live"
RATE = 20.0
#: Each socket sends one more header line this often.
INTERVAL = 1.0


async def test_slowloris_sockets_are_cut_off_and_real_clients_carry_on() -> None:
    received: list[tuple[int, float, float]] = []  # offset, publish sent (unix), received (unix)
    probes: list[tuple[float, float]] = []  # started (unix), seconds to a /healthz answer

    async def subscriber(ws: RawWebSocket) -> None:
        while True:
            msg = await ws.recv_json()
            if msg.get("op") == "pub":
                received.append((msg["offset"], msg["data"]["t"], time.time()))

    async def probe(port: int) -> None:
        while True:
            t = time.time()
            with trio.move_on_after(30):
                resp = await http_request(port, "GET", "/healthz")
                assert resp.status == 200
            probes.append((t, time.time() - t))
            await trio.sleep(0.25)

    with trio.fail_after(150):
        async with load_clients(2) as attackers, \
                run_server("--handshake-timeout", str(HANDSHAKE_TIMEOUT), "--client-publish") as server:
            ws = await RawWebSocket.connect(server.port)
            await ws.send_json({"op": "subscribe", "topic": TOPIC, "id": "s"})
            assert (await ws.recv_json())["ok"] is True
            async with trio.open_nursery() as nursery, publisher(server.port) as pub:
                nursery.start_soon(subscriber, ws)
                nursery.start_soon(probe, server.port)

                async def publish_steadily() -> None:
                    start = trio.current_time()
                    for i in range(1, 10**6):
                        await pub.publish(TOPIC, i, {"t": time.time()})
                        await trio.sleep_until(start + i / RATE)

                nursery.start_soon(publish_steadily)
                await trio.sleep(3)  # the baseline
                attack_start = time.time()
                cpu_start = cpu_seconds(server.pid)
                others_start = [cpu_seconds(pid) for pid in attackers.pids] + [cpu_seconds(os.getpid())]
                ips = src_ips(SOCKETS)
                opened = await attackers.ask(
                    [{"op": "slowloris", "host": "127.0.0.1", "port": server.port,
                      "src_ips": ips[i::2], "count": SOCKETS // 2, "interval": INTERVAL, "limit": 60,
                      "concurrency": 300, "phase_timeout": 60} for i in range(2)], 90)
                with trio.fail_after(60):
                    while True:
                        stats = await attackers.ask_all({"op": "slowloris_stats"}, 30)
                        if sum(s["closed"] for s in stats) >= sum(s["opened"] for s in stats):
                            break
                        await trio.sleep(0.25)
                attack_end = time.time()
                server_cpu = (cpu_seconds(server.pid) - cpu_start) / (attack_end - attack_start)
                others = [(cpu_seconds(p) - c) / (attack_end - attack_start) for p, c in zip(
                    [*attackers.pids, os.getpid()], others_start, strict=True)]
                await trio.sleep(2)  # publications in flight arrive
                nursery.cancel_scope.cancel()
            await ws.aclose()
            # The server is still healthy and takes new clients.
            assert (await http_request(server.port, "GET", "/healthz")).status == 200
            fresh = await RawWebSocket.connect(server.port)
            await fresh.aclose()
            accepted = sorted(r["offset"] for r in pub.replies.values() if r.get("ok") is True)
    n_opened = sum(s["opened"] for s in stats)
    n_failed = sum(sum(s["failed"].values()) for s in opened)
    lifetimes_max = max(s["lifetime_max"] for s in stats)
    lifetimes_min = min(s["lifetime_min"] for s in stats)
    first_open = min(s["first_open"] for s in stats)
    last_open = max(s["last_open"] for s in stats)
    last_close = max(s["last_close"] for s in stats)
    before = [r - t for _, t, r in received if t < attack_start]
    during = [r - t for _, t, r in received if attack_start <= t < attack_end]
    offsets = [o for o, _, _ in received]
    probes_before = [d for t, d in probes if t < attack_start]
    probes_during = [d for t, d in probes if attack_start <= t < attack_end]
    record("slowloris", machine=machine(), sockets=SOCKETS, opened=n_opened, failed_to_open=n_failed,
           handshake_timeout_s=HANDSHAKE_TIMEOUT, open_phase_s=round(last_open - first_open, 2),
           all_closed_after_first_open_s=round(last_close - first_open, 2),
           all_closed_after_last_open_s=round(last_close - last_open, 2),
           socket_lifetime_min_s=round(lifetimes_min, 2), socket_lifetime_max_s=round(lifetimes_max, 2),
           attack_s=round(attack_end - attack_start, 2), header_line_every_s=INTERVAL,
           server_cpu_during_attack=f"{server_cpu:.0%} of a core",
           attackers_and_test_cpu=[f"{c:.0%}" for c in others],
           machine_load_during=round(os.getloadavg()[0], 1), publications_accepted=len(accepted),
           real_client_received=len(received),
           latency_before_p50_ms=round(percentile(before, 50) * 1000, 1),
           latency_before_p99_ms=round(percentile(before, 99) * 1000, 1),
           latency_during_p50_ms=round(percentile(during, 50) * 1000, 1),
           latency_during_p99_ms=round(percentile(during, 99) * 1000, 1),
           latency_during_max_ms=round(max(during, default=0) * 1000, 1),
           new_connection_probes_during=len(probes_during),
           new_connection_before_p50_ms=round(percentile(probes_before, 50) * 1000, 1),
           new_connection_during_p50_ms=round(percentile(probes_during, 50) * 1000, 1),
           new_connection_during_p99_ms=round(percentile(probes_during, 99) * 1000, 1),
           new_connection_during_max_ms=round(max(probes_during, default=0) * 1000, 1))
    assert n_opened == SOCKETS and n_failed == 0, (n_opened, opened)
    # Every socket was cut off: none outlived the handshake timeout by more than
    # the time it can wait in the accept queue, none was cut much before it
    # (lifetimes are measured by the attacker, from its first line to EOF).
    assert HANDSHAKE_TIMEOUT / 2 <= lifetimes_min and lifetimes_max < HANDSHAKE_TIMEOUT + 10, stats
    # The real client got every publication, in order, and its latency stayed
    # bounded. Loosely: the 2 cores are shared with the attackers and, on CI,
    # other jobs (p99 0.4 s quiet, up to 2.9 s loaded); the figures say more.
    assert offsets == accepted == list(range(1, len(accepted) + 1))
    assert len(during) > 0 and percentile(during, 99) < 5.0, during
