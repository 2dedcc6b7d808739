"""SIGTERM to a ``trioserve serve`` process in the middle of a publish burst.

N raw subscribers (load-client processes) and a WebSocket publisher that
writes publish frames without waiting for replies.

- In-memory broker: measured against what the server accepted before the
  drain. Every subscriber must get every accepted offset, then 1001, and the
  process must exit 0 within the drain timeout.
- Redis broker: the history outlives the process. The subscribers reconnect
  to a second server started on the same port and resubscribe with
  ``since``; the publisher sends again what the first server did not accept.
  Every subscriber must end with every offset, exactly once.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from .helpers import (
    Publisher,
    ServerProcess,
    env_int,
    free_port,
    load_clients,
    machine,
    publisher,
    record,
    redis_server,
    run_server,
)

pytestmark = pytest.mark.faults

SUBSCRIBERS = env_int("TRIOSERVE_FAULTS_SUBSCRIBERS", 5000)
TOPIC = "burst"
DRAIN_TIMEOUT = 20.0
# Frames written per pause: 25 every 50 ms, at most 500 publications a second.
CHUNK, PAUSE = 25, 0.05


async def burst_with_sigterm(server: ServerProcess, pub: Publisher, count: int, sigterm_after: int
                             ) -> dict[str, Any]:
    """Write *count* publish frames; SIGTERM the server after *sigterm_after* of them;
    wait for the publisher's close and the server's exit."""
    sent = 0
    sigterm_at = 0.0
    for i in range(1, count + 1):
        if pub.closed.is_set():
            break
        try:
            await pub.publish(TOPIC, i, {"i": i})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            break
        sent = i
        if i % CHUNK == 0:
            await trio.sleep(PAUSE)
        if i == sigterm_after:
            sigterm_at = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
    assert sigterm_at, "the burst ended before the SIGTERM"
    with trio.fail_after(DRAIN_TIMEOUT + 10):
        await pub.closed.wait()
        returncode = await server.proc.wait()
    exit_s = time.monotonic() - sigterm_at
    with trio.fail_after(5):
        await server.wait_for_log(b"drained ")
    drained = re.search(r"drained (\d+), forced (\d+)", server.text)
    assert drained is not None
    accepted = sorted(r["offset"] for r in pub.replies.values() if r.get("ok") is True)
    return {
        "sent": sent,
        "accepted": len(accepted),
        "accepted_offsets_contiguous": accepted == list(range(1, len(accepted) + 1)),
        "max_accepted_offset": accepted[-1] if accepted else 0,
        "refused_while_draining": len(pub.refused()),
        "unanswered": sent - len(pub.replies),
        "publisher_close": pub.close_code,
        "returncode": returncode,
        "exit_s": round(exit_s, 2),
        "drained": int(drained.group(1)),
        "forced": int(drained.group(2)),
    }


def check_drain(d: dict[str, Any]) -> None:
    assert d["returncode"] == 0, d
    assert d["exit_s"] < DRAIN_TIMEOUT, d
    assert d["publisher_close"] == 1001, d
    assert d["forced"] == 0 and d["drained"] == SUBSCRIBERS + 1, d
    assert d["accepted_offsets_contiguous"], d


async def test_sigterm_mid_burst_memory_broker_delivers_everything_accepted() -> None:
    burst = 2000
    with trio.fail_after(180):
        async with load_clients(2) as clients:
            async with run_server("--client-publish", "--drain-timeout", str(DRAIN_TIMEOUT)) as server:
                subs = await clients.subscribe(server.port, TOPIC, SUBSCRIBERS, reconnect=False)
                assert sum(r["subscribed"] for r in subs) == SUBSCRIBERS, subs
                async with publisher(server.port) as pub:
                    d = await burst_with_sigterm(server, pub, burst, burst * 2 // 5)
            with trio.fail_after(30):
                while (s := await clients.stats())["first_close"].get("None"):
                    await trio.sleep(0.1)
    # Every subscriber saw the same last offset: everything accepted, and maybe
    # a few publications accepted whose reply was cut off by the close.
    record("sigterm_drain_memory", machine=machine(), subscribers=SUBSCRIBERS, burst=burst,
           connect_s=round(max(r["elapsed"] for r in subs), 1), **d,
           last_offset_min=s["last_min"], last_offset_max=s["last_max"], deliveries=s["received"],
           lost=SUBSCRIBERS * d["max_accepted_offset"] - s["received"], gaps=s["gaps"], dups=s["dups"],
           first_close_codes=s["first_close"])
    check_drain(d)
    assert d["refused_while_draining"] + d["unanswered"] > 0, "the SIGTERM came after the burst"
    assert s["first_close"] == {"1001": SUBSCRIBERS}, s["first_close"]
    assert s["gaps"] == 0 and s["dups"] == 0 and s["start_max"] == 0, s
    assert s["last_min"] == s["last_max"] >= d["max_accepted_offset"] > 0, s
    assert s["received"] == SUBSCRIBERS * s["last_min"], s


# The Redis broker fans out each publication on its own (see the module
# docstring of test_redis_faults.py), so this burst is smaller.
REDIS_BURST = env_int("TRIOSERVE_FAULTS_REDIS_BURST", 200)


async def test_sigterm_mid_burst_redis_broker_restart_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    with trio.fail_after(240):
        async with redis_server(tmp_path) as redis, load_clients(2) as clients:
            args = ["--broker", redis.url, "--client-publish", "--drain-timeout", str(DRAIN_TIMEOUT),
                    "--history-size", "5000"]
            async with run_server(*args, port=port) as first:
                subs = await clients.subscribe(port, TOPIC, SUBSCRIBERS, backoff=0.5, backoff_max=1.0)
                assert sum(r["subscribed"] for r in subs) == SUBSCRIBERS, subs
                async with publisher(port) as pub:
                    d = await burst_with_sigterm(first, pub, REDIS_BURST, REDIS_BURST * 2 // 5)
                    accepted_ids = {i for i, r in pub.replies.items() if r.get("ok") is True}
            check_drain(d)
            # A second server on the same port; the publisher sends again what the
            # first did not accept (some of the unanswered may exist twice: that
            # is a publisher's at-least-once, not a loss).
            restart_at = time.monotonic()
            async with run_server(*args, port=port):
                listening_s = time.monotonic() - restart_at
                missing = [i for i in range(1, REDIS_BURST + 1) if i not in accepted_ids]
                async with publisher(port) as pub2:
                    for n, i in enumerate(missing, 1):
                        await pub2.publish(TOPIC, i, {"i": i})
                        if n % CHUNK == 0:
                            await trio.sleep(PAUSE)
                    with trio.fail_after(120):
                        while len(pub2.replies) < len(missing):
                            await trio.sleep(0.05)
                    assert not pub2.refused(), [pub2.replies[i] for i in pub2.refused()[:3]]
                final = await redis.get_int(f"ts:{{{TOPIC}}}:off")
                s = await clients.caught_up(final, timeout=90)
                recovered_s = s["at"] - restart_at
    lost = SUBSCRIBERS * final - s["received"]
    record("sigterm_drain_redis_restart", machine=machine(), subscribers=SUBSCRIBERS, burst=REDIS_BURST,
           connect_s=round(max(r["elapsed"] for r in subs), 1), **d,
           seen_before_1001_min=s["before_close_min"], seen_before_1001_max=s["before_close_max"],
           republished_on_second_server=len(missing), final_offset=final,
           second_server_listening_s=round(listening_s, 2), all_caught_up_s=round(recovered_s, 2),
           recovered_true=s["recovered_true"], recovered_false=s["recovered_false"],
           deliveries=s["received"], lost=lost, gaps=s["gaps"], dups=s["dups"],
           first_close_codes=s["first_close"], reconnect_attempts_refused=s["refused"])
    assert s["ok"], s
    assert s["first_close"] == {"1001": SUBSCRIBERS}, s["first_close"]
    assert s["recovered_false"] == 0 and s["gaps"] == 0 and s["dups"] == 0 and s["early"] == 0, s
    assert s["start_max"] == 0 and s["last_min"] == final, s
    assert lost == 0, s
    if s["before_close_min"] < d["max_accepted_offset"]:
        # Fixed bug, kept as a check: Server.drain() flushes only the hub's inbox. With the
        # Redis broker a publication whose script has returned (the publisher has
        # its offset) reaches the hub later, through pub/sub, so the 1001 goes out
        # first. Recovering clients get it from history; others never do.
        pytest.fail(f"regression: offset {d['max_accepted_offset']} was accepted before the drain but "
                     f"subscribers got 1001 after offset {s['before_close_min']} (Redis broker)")
