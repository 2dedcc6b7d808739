"""Redis faults under a steady publish stream: a pause (SIGSTOP), restarts with and without its data.

A ``trioserve serve --broker redis://`` process, N raw subscribers (load-client
processes) that reconnect and resubscribe with ``since`` when closed, and an
HTTP publisher at a steady rate whose every request runs in its own task.

Nothing may be dropped silently: in the end every subscriber has seen every
offset exactly once (after a 1013 close and a recovering resubscribe where the
server asked for one), or was told of the gap (``recovered: false``) when
Redis lost the history itself. Every publish either succeeded or failed with
an answer (503); which publishes failed, which completed after the pause and
how long they took are recorded.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from .helpers import (
    PublishLog,
    env_int,
    history,
    load_clients,
    machine,
    percentile,
    record,
    redis_server,
    run_server,
    steady_publisher,
)

pytestmark = pytest.mark.faults

SUBSCRIBERS = env_int("TRIOSERVE_FAULTS_REDIS_SUBSCRIBERS", 500)
TOPIC = "stream"
RATE = 20.0
#: The brief asks for 10 s; TRIOSERVE_FAULTS_REDIS_PAUSE changes it.
PAUSE = float(env_int("TRIOSERVE_FAULTS_REDIS_PAUSE", 10))


def server_args(url: str) -> list[str]:
    return ["--broker", url, "--history-size", "10000"]


def publish_figures(log: PublishLog, fault_start: float, fault_end: float) -> dict[str, Any]:
    during = log.latencies(200, fault_start, fault_end)
    return {
        "publishes": log.sent,
        "status_before": log.by_status(0, fault_start),
        "status_during": log.by_status(fault_start, fault_end),
        "status_after": log.by_status(fault_end),
        "ok_during_latency_max_s": round(max(during), 2) if during else None,
        "failed_latency_max_s": round(max(log.latencies(503) or [0]), 2),
        "ok_latency_p99_s": round(percentile(log.latencies(200), 99), 3),
    }


async def check_history(port: int, log: PublishLog, final: int) -> dict[str, Any]:
    """Compare what the publisher was told with what is in history."""
    pubs = await history(port, TOPIC, final)
    assert [p["offset"] for p in pubs] == list(range(1, final + 1)), "history has holes"
    in_history: dict[int, int] = {}
    for p in pubs:
        in_history[p["data"]["i"]] = in_history.get(p["data"]["i"], 0) + 1
    ok = {i for i, r in log.results.items() if r[1] == 200}
    failed = {i for i, r in log.results.items() if r[1] != 200}
    offsets_told = sorted(r[3] for r in log.results.values() if r[3] is not None)
    return {
        "ok_missing_from_history": sorted(i for i in ok if i not in in_history),
        # Publishes the publisher made once that exist twice (two offsets).
        "stored_twice": sum(1 for n in in_history.values() if n > 1),
        "most_copies": max(in_history.values(), default=0),
        # A 503 whose publication exists all the same: the client cannot tell.
        "failed_but_published": len([i for i in failed if i in in_history]),
        "offsets_told_unique": len(offsets_told) == len(set(offsets_told)),
        "offsets_told_match_history": all(
            pubs[r[3] - 1]["data"]["i"] == i for i, r in log.results.items() if r[3] is not None),
    }


async def test_redis_paused_mid_stream(tmp_path: Path) -> None:
    with trio.fail_after(120 + PAUSE):
        async with redis_server(tmp_path) as redis, load_clients(1) as clients:
            async with run_server(*server_args(redis.url)) as server:
                subs = await clients.subscribe(server.port, TOPIC, SUBSCRIBERS, backoff=0.2, backoff_max=1.0)
                assert sum(r["subscribed"] for r in subs) == SUBSCRIBERS, subs
                log = PublishLog()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(steady_publisher, server.port, TOPIC, RATE, PAUSE + 8, log)
                    await trio.sleep(3)
                    paused = time.monotonic()
                    redis.stop_signal(signal.SIGSTOP)
                    await trio.sleep(PAUSE)
                    redis.stop_signal(signal.SIGCONT)
                    resumed = time.monotonic()
                final = await redis.get_int(f"ts:{{{TOPIC}}}:off")
                s = await clients.caught_up(final, timeout=60)
                h = await check_history(server.port, log, final)
                warnings = [line for line in server.text.splitlines() if "WARNING" in line or "ERROR" in line]
    figures = publish_figures(log, paused, resumed)
    record("redis_sigstop", machine=machine(), subscribers=SUBSCRIBERS, pause_s=PAUSE, rate_per_s=RATE,
           **figures, final_offset=final, **h, caught_up=s["ok"], all_caught_up_after_resume_s=round(
               s["at"] - resumed, 2), gaps=s["gaps"], dups=s["dups"], close_codes=s["close_codes"],
           recovered_true=s["recovered_true"], recovered_false=s["recovered_false"],
           server_warnings=len(warnings), first_warnings=[w[24:200] for w in warnings[:3]])
    assert s["ok"], s
    assert s["gaps"] == 0 and s["dups"] == 0 and s["recovered_false"] == 0 and s["early"] == 0, s
    assert set(s["close_codes"]) <= {"1013"}, s["close_codes"]
    # Every publish got an answer: 200 or 503, none timed out or was cut off.
    assert set(figures["status_during"]) | set(figures["status_after"]) <= {"200", "503"}, figures
    assert h["ok_missing_from_history"] == [], h
    assert h["offsets_told_unique"] and h["offsets_told_match_history"], h
    if h["stored_twice"]:
        # Fixed bug, kept as a check: the broker's command client keeps coredis' default
        # retry policy, so an EVALSHA that hits stream_timeout (5 s) is sent again,
        # and a paused Redis runs both once it resumes.
        pytest.fail(f"regression: {h['stored_twice']} publications made once during a "
                    f"{PAUSE:.0f}s Redis pause "
                     "were stored twice (coredis retried the publish script after its 5 s timeout)")


async def restart_redis(tmp_path: Path, persistent: bool) -> dict[str, Any]:
    downtime = 3.0
    with trio.fail_after(150):
        async with redis_server(tmp_path, persistent=persistent) as redis, \
                load_clients(1) as clients:
            async with run_server(*server_args(redis.url)) as server:
                subs = await clients.subscribe(server.port, TOPIC, SUBSCRIBERS, backoff=0.2, backoff_max=1.0)
                assert sum(r["subscribed"] for r in subs) == SUBSCRIBERS, subs
                log = PublishLog()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(steady_publisher, server.port, TOPIC, RATE, downtime + 10, log)
                    await trio.sleep(3)
                    down = time.monotonic()
                    await redis.kill()
                    await trio.sleep(downtime)
                    await redis.start()
                    up = time.monotonic()
                final = await redis.get_int(f"ts:{{{TOPIC}}}:off")
                s = await clients.caught_up(final, timeout=60)
                h = await check_history(server.port, log, final) if persistent else {}
                reconnected = server.text.count("connected to <RedisBroker")
    return {"machine": machine(), "subscribers": SUBSCRIBERS, "redis_down_s": downtime,
            "rate_per_s": RATE, **publish_figures(log, down, up), "final_offset": final, **h,
            "caught_up": s["ok"], "all_caught_up_after_restart_s": round(s["at"] - up, 2),
            "gaps": s["gaps"], "dups": s["dups"], "close_codes": s["close_codes"],
            "recovered_true": s["recovered_true"], "recovered_false": s["recovered_false"],
            "subscribers_told_of_gap": s["subs_recovered_false"], "epochs_at_end": len(s["epochs"]),
            "broker_connects": reconnected, "_stats": s}


async def test_redis_restart_keeping_its_data(tmp_path: Path) -> None:
    f = await restart_redis(tmp_path, persistent=True)
    s = f.pop("_stats")
    record("redis_restart_aof", **f)
    assert s["ok"], s
    assert s["gaps"] == 0 and s["dups"] == 0 and s["recovered_false"] == 0 and s["early"] == 0, s
    assert set(s["close_codes"]) <= {"1013"}, s["close_codes"]
    statuses = {**f["status_before"], **f["status_during"], **f["status_after"]}
    assert set(statuses) <= {"200", "503"} and f["status_during"].get("503"), f
    assert f["final_offset"] == sum(v.get("200", 0) for v in (f["status_before"], f["status_during"],
                                                                f["status_after"])), f
    assert f["ok_missing_from_history"] == [] and f["offsets_told_unique"], f
    assert f["stored_twice"] == 0, f


async def test_redis_restart_losing_its_data(tmp_path: Path) -> None:
    f = await restart_redis(tmp_path, persistent=False)
    s = f.pop("_stats")
    record("redis_restart_data_lost", **f)
    assert s["ok"], s
    # The history is gone: every subscriber is closed with 1013 and told of the
    # gap when it resubscribes; nothing is lost without it being told.
    assert s["close_codes"] == {"1013": SUBSCRIBERS}, s["close_codes"]
    assert s["subs_recovered_false"] == SUBSCRIBERS, s
    assert s["gaps"] == 0 and s["dups"] == 0 and s["early"] == 0, s
    assert len(s["epochs"]) == 1, s["epochs"]
    statuses = {**f["status_before"], **f["status_during"], **f["status_after"]}
    assert set(statuses) <= {"200", "503"} and f["status_during"].get("503"), f
