"""A reconnect storm: N subscribers all come back at once to a restarted server.

The server (Redis broker, so history survives) is killed with SIGKILL; its
subscribers see their connections drop and retry every few hundred
milliseconds (random, at most 1 s apart) until a new server is listening on
the same port; then they all reconnect and resubscribe with ``since`` within
about a second. Recorded: the time from the new server listening to every
subscriber recovered, and the new server's peak RSS.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from .helpers import (
    PublishLog,
    env_int,
    free_port,
    load_clients,
    machine,
    peak_rss_mb,
    record,
    redis_server,
    rss_mb,
    run_server,
    steady_publisher,
)

pytestmark = pytest.mark.faults

SUBSCRIBERS = env_int("TRIOSERVE_FAULTS_SUBSCRIBERS", 5000)
TOPIC = "storm"


async def test_reconnect_storm_after_a_restart(tmp_path: Path) -> None:
    port = free_port()
    with trio.fail_after(180):
        async with redis_server(tmp_path) as redis, load_clients(2) as clients:
            args = ["--broker", redis.url]
            async with run_server(*args, port=port) as first:
                subs = await clients.subscribe(port, TOPIC, SUBSCRIBERS, backoff=0.3, backoff_max=1.0)
                assert sum(r["subscribed"] for r in subs) == SUBSCRIBERS, subs
                log = PublishLog()
                await steady_publisher(port, TOPIC, 20, 0.5, log)
                before = await clients.caught_up(log.sent, 30)
                assert before["ok"], before
                first_rss = rss_mb(first.pid)
                first.proc.kill()
                await first.proc.wait()
            killed_at = time.monotonic()
            await trio.sleep(2)  # every subscriber is retrying by now
            async with run_server(*args, port=port) as second:
                listening_at = time.monotonic()
                rss_at_listen = rss_mb(second.pid)
                s = await clients.caught_up(log.sent, 90)
                storm_s = s["at"] - listening_at
                await trio.sleep(1)
                rss_after = rss_mb(second.pid)
                peak = peak_rss_mb(second.pid)
                more = PublishLog()
                await steady_publisher(port, TOPIC, 20, 0.25, more)
                final = await redis.get_int(f"ts:{{{TOPIC}}}:off")
                after = await clients.caught_up(final, 30)
    record("reconnect_storm", machine=machine(), subscribers=SUBSCRIBERS,
           down_s=round(listening_at - killed_at, 1), all_recovered_after_listening_s=round(storm_s, 2),
           refused_attempts=s["refused"], close_codes=s["close_codes"], recovered_true=s["recovered_true"],
           recovered_false=s["recovered_false"], first_server_rss_mb=round(first_rss, 1),
           second_server_rss_at_listen_mb=round(rss_at_listen, 1),
           second_server_peak_rss_mb=round(peak, 1), second_server_rss_after_mb=round(rss_after, 1),
           gaps=after["gaps"], dups=after["dups"], final_offset=final, errors=s["errors"])
    assert s["ok"], s
    assert s["close_codes"] == {"1006": SUBSCRIBERS}, s["close_codes"]
    assert s["recovered_true"] == SUBSCRIBERS and s["recovered_false"] == 0, s
    assert after["ok"] and after["gaps"] == 0 and after["dups"] == 0 and after["last_min"] == final, after
