"""SIGKILL of one worker of ``serve --workers 2`` under a steady publish stream, with a
Redis broker and with the embedded one (the supervisor is the sequencer).

Clients are ``trioserve.client`` instances: they reconnect by themselves and
resume each subscription from its last offset, and they raise
``RecoveryGap`` rather than skip an offset. The supervisor must restart the
killed worker; the other worker's clients must not notice (no reconnect, no
gap); the killed worker's clients must reconnect and recover with no gap.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

import trioserve.client

from ..peers import http_request
from ..system.test_workers import connections_by_worker
from .helpers import PublishLog, machine, percentile, record, redis_server, run_server, steady_publisher

pytestmark = pytest.mark.faults

CLIENTS = 100
TOPIC = "ticks"
RATE = 20.0
#: Publications every client has before the kill (a second of the stream).
WARM = 20
_SERVING = re.compile(rb"(\d+) workers serving http://127\.0\.0\.1:(\d+):")
_READY = re.compile(rb"worker (\d+) \(pid (\d+)\) ready")


@attrs.define
class Seen:
    offsets: list[int] = attrs.Factory(list)
    latencies: list[float] = attrs.Factory(list)
    sent: list[float] = attrs.Factory(list)
    reconnects: int = 0
    error: str | None = None
    #: Set once it has received WARM publications (the stream is flowing to it).
    warm: trio.Event = attrs.Factory(trio.Event)


async def follow(url: str, seen: Seen, ready: trio.Semaphore, final: list[int]) -> None:
    """Subscribe and record every publication until the publisher's final offset."""
    try:
        async with trioserve.client.connect(url, backoff_initial=0.05, backoff_max=0.5,
                                            request_timeout=30) as client:
            async with client.subscribe(TOPIC) as sub:
                ready.release()
                async for pub in sub:
                    seen.offsets.append(pub.offset)
                    seen.latencies.append(time.time() - pub.data["t"])
                    seen.sent.append(pub.data["t"])
                    if len(seen.offsets) == WARM:
                        seen.warm.set()
                    if final and pub.offset >= final[0]:
                        break
            seen.reconnects = client.statistics().reconnects
    except Exception as exc:
        seen.error = repr(exc)


async def head(port: int) -> int:
    """The topic's last offset, as the server (any worker) reports it."""
    resp = await http_request(port, "GET", f"/api/history?topic={TOPIC}&since=0&limit=1")
    assert resp.status == 200, resp
    return int(resp.json()["offset"])


@asynccontextmanager
async def broker_args(broker: str, tmp_path: Path) -> AsyncIterator[list[str]]:
    if broker == "embedded":
        yield []
        return
    async with redis_server(tmp_path) as redis:
        yield ["--broker", redis.url]


@pytest.mark.parametrize("broker", ["redis", "embedded"])
async def test_sigkill_one_worker_under_load(tmp_path: Path, broker: str) -> None:
    seen = [Seen() for _ in range(CLIENTS)]
    final: list[int] = []
    with trio.fail_after(150):
        async with broker_args(broker, tmp_path) as args:
            async with run_server("--workers", "2", *args, "--history-size", "10000",
                                  ready=_SERVING) as sp:
                url = f"ws://127.0.0.1:{sp.port}/ws"
                pids = {int(m.group(1)): int(m.group(2)) for m in _READY.finditer(sp.log)}
                async with trio.open_nursery() as nursery:
                    ready = trio.Semaphore(0)
                    for s in seen:
                        nursery.start_soon(follow, url, s, ready, final)
                    with trio.fail_after(60):
                        for _ in seen:
                            await ready.acquire()
                    by_worker = await connections_by_worker(sp.port)
                    log = PublishLog()
                    async with trio.open_nursery() as pubs:
                        pubs.start_soon(steady_publisher, sp.port, TOPIC, RATE, 8.0, log)
                        # Killed mid-stream: once every client has received some.
                        for s in seen:
                            await s.warm.wait()
                        killed_at = time.monotonic()
                        killed_wall = time.time()
                        os.kill(pids[1], signal.SIGKILL)
                        match = await sp.wait_for_log(re.compile(rb"worker 1 \(pid (\d+)\) ready again"))
                        ready_again_s = time.monotonic() - killed_at
                    # One more publication, the last: every client stops at it.
                    final.append(await head(sp.port) + 1)
                    last = PublishLog()
                    await steady_publisher(sp.port, TOPIC, 1.0, 0.5, last)
                    assert last.by_status() == {"200": 1}, last.results
                    assert await head(sp.port) == final[0]
            assert int(match.group(1)) != pids[1]
    errors = [s.error for s in seen if s.error]
    noticed = [s for s in seen if s.reconnects]
    quiet = [s for s in seen if not s.reconnects]
    complete = [s.offsets == list(range(1, final[0] + 1)) for s in seen]

    def latencies(group: list[Seen], after_kill: bool) -> list[float]:
        return [lat for s in group for lat, t in zip(s.latencies, s.sent, strict=True)
                if (t >= killed_wall) == after_kill]

    def worst(group: list[Seen]) -> float:
        return max(latencies(group, True), default=0.0)
    record(f"sigkill_one_worker_{broker}", machine=machine(), clients=CLIENTS, rate_per_s=RATE,
           clients_per_worker_before={k: int(v) for k, v in by_worker.items()},
           publishes=log.sent, publish_status=log.by_status(), final_offset=final[0],
           worker_ready_again_s=round(ready_again_s, 2),
           clients_that_reconnected=len(noticed), clients_that_did_not=len(quiet),
           complete_and_in_order=sum(complete), errors=errors[:3],
           worst_latency_not_reconnected_s=round(worst(quiet), 3),
           p99_latency_not_reconnected_before_kill_s=round(percentile(latencies(quiet, False), 99), 3),
           p99_latency_not_reconnected_after_kill_s=round(percentile(latencies(quiet, True), 99), 3),
           worst_latency_reconnected_s=round(worst(noticed), 3),
           )
    assert not errors, errors
    assert all(complete), [s.offsets[:5] for s, ok in zip(seen, complete, strict=True) if not ok][:3]
    # Exactly worker 1's clients noticed; worker 2's did not.
    assert len(noticed) == by_worker["1"] and len(quiet) == by_worker["2"], (len(noticed), by_worker)
    assert noticed and quiet
    assert set(log.by_status()) <= {"200", "0"}, log.by_status()
