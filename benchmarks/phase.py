"""One measured delivery phase, shared by burst mode (``fanout.py``) and rate mode (``ratephase.py``).

Both modes arm the load client for a known number of publications, let the
publisher send them, wait (bounded) until every subscriber has them all, and
then account for the same things: deliveries, losses by offsets, latency
samples, server and client CPU. Only how the publications are sent differs,
so that part is passed in.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks import report
from benchmarks.loadclient import Workers
from benchmarks.serverproc import ServerProcess

TOPIC = "bench"


@dataclass
class Sent:
    """What the publisher did: first and last send time, the replies, mode-specific extras."""

    t_first: float
    t_last: float
    ack: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


# Called once the subscribers are waiting and the CPU is sampled: sends what
# it sends at once, and returns the coroutine that sends the rest (if any) and
# collects the publish replies.
StartPublishing = Callable[[], Coroutine[Any, Any, Sent]]


@dataclass
class PhaseResult:
    counts: dict[str, Any]  # expected, received, lost, worker status: the headline
    accounting: dict[str, Any]  # CPU, latency, replies, offsets
    sent: Sent
    last_recv: float  # CLOCK_MONOTONIC of the last delivery, all workers


async def gather_acks(acks: list[asyncio.Future[dict[str, Any]]], timeout: float) -> dict[str, Any]:
    done, pending = await asyncio.wait(acks, timeout=timeout) if acks else (set(), set())
    for fut in pending:
        fut.cancel()
    replies = [f.result() for f in done if not f.cancelled() and f.exception() is None]
    good = [r for r in replies if r.get("ok") is True]
    return {
        "ok": len(good),
        "failed": len(acks) - len(good),
        "last_ack": time.monotonic(),
        "offsets": sorted(r.get("offset") for r in good if isinstance(r.get("offset"), int)),
        "subscribers": sorted({r.get("subscribers") for r in good}, key=str),
    }


async def delivery_phase(workers: Workers, server: ServerProcess, publications: int,
                         timeout: float, stall: float, start: StartPublishing) -> PhaseResult:
    armed = await workers.ask([{"op": "arm", "publications": publications}] * len(workers), 30)
    expected = publications * sum(r["armed"] for r in armed)
    client_cpu0 = cpu_sum(r["cpu"] for r in armed)
    # The wait replies come back as soon as each worker has its share, so the
    # closing CPU sample is taken right after the last delivery.
    workers.send([{"op": "wait", "timeout": timeout, "stall": stall}] * len(workers))
    cpu0 = server.cpu()
    broker0 = server.broker_cpu()
    pub_task = asyncio.create_task(start())
    try:
        waits = await workers.replies(timeout + 30)
        sent = await pub_task
    except BaseException:
        pub_task.cancel()
        raise
    cpu1 = server.cpu()
    broker1 = server.broker_cpu()
    client_cpu1 = cpu_sum(w["cpu"] for w in waits)
    details = await workers.ask([{"op": "collect"}] * len(workers), 60)

    samples = array("d")
    for d in details:
        samples.frombytes(d["latencies"])
    received = sum(w["received"] for w in waits)
    ack = sent.ack
    counts = {
        "expected": expected,
        "received": received,
        "lost": expected - received,
        "worker_status": sorted({w["status"] for w in waits}),
    }
    accounting = {
        **cpu_fields("server", cpu0, cpu1, received),
        **broker_fields(cpu1[0] - cpu0[0], broker0, broker1, received),
        **cpu_fields("client", client_cpu0, client_cpu1, received),
        "latency": latency_stats(samples),
        "acks_ok": ack["ok"],
        "acks_failed": ack["failed"],
        "ack_seconds": ack["last_ack"] - sent.t_first,
        "ack_subscribers": ack["subscribers"],
        "final_offset": ack["offsets"][-1] if ack["offsets"] else None,
        "offsets_contiguous": ack["offsets"] == list(range(ack["offsets"][0], ack["offsets"][0]
                                                            + len(ack["offsets"])))
        if ack["offsets"] else False,
        "gaps": sum(d["gaps"] for d in details),
        "dups": sum(d["dups"] for d in details),
        "unexpected_frames": sum(d["unexpected"] for d in details),
        "short_conns": sum(d["short_conns"] for d in details),
        "lossy_topics": len(set().union(*(d["lossy_topics"] for d in details))),
        "closed_conns": sum(d["closed"] for d in details),
        "close_reasons": [d["close_reasons"] for d in details if d["close_reasons"]],
        "subscriber_last_offset": [min(d["last_offset_min"] for d in details),
                                   max(d["last_offset_max"] for d in details)],
        # Bytes the subscribers read per delivery, and against what the same
        # messages take uncompressed (1.0 without permessage-deflate).
        "wire_bytes_per_delivery": sum(d["wire_bytes"] for d in details) / received if received else None,
        "wire_ratio": (sum(d["wire_bytes"] for d in details) / plain
                       if (plain := sum(d["plain_bytes"] for d in details)) else None),
    }
    return PhaseResult(counts, accounting, sent, max(w["last_recv"] for w in waits))


def latency_stats(samples: array[float]) -> dict[str, float]:
    """The shared percentiles plus p99.9, which a steady rate has the samples for."""
    ordered = sorted(samples)
    stats = report.latency_stats(array("d", ordered))  # its own sort of sorted data is linear
    stats["p99_9_ms"] = report.percentile(ordered, 99.9) * 1e3
    return stats


def cpu_sum(samples: Iterable[Sequence[float]]) -> tuple[float, ...]:
    """Add up (total, user, system) samples of several processes."""
    return tuple(sum(column) for column in zip(*samples, strict=True))


def cpu_fields(who: str, before: Sequence[float], after: Sequence[float],
               deliveries: int) -> dict[str, float | None]:
    total, user, system = (a - b for a, b in zip(after, before, strict=True))
    return {
        f"{who}_cpu_s": total,
        f"{who}_cpu_user_s": user,
        f"{who}_cpu_sys_s": system,
        f"{who}_cpu_us_per_delivery": total / deliveries * 1e6 if deliveries else None,
    }


def broker_fields(server_s: float, before: float | None, after: float | None,
                  deliveries: int) -> dict[str, float | None]:
    """trioserve-redis: its redis-server's CPU, and the server's and the broker's together."""
    broker_s = None if before is None or after is None else after - before
    total_s = server_s + (broker_s or 0.0)
    return {
        "broker_cpu_s": broker_s,
        "broker_cpu_us_per_delivery": broker_s / deliveries * 1e6
        if broker_s is not None and deliveries else None,
        "server_broker_cpu_us_per_delivery": total_s / deliveries * 1e6 if deliveries else None,
    }


def sys_share(b: dict[str, Any], who: str) -> str:
    ticks = b[f"{who}_cpu_user_s"] + b[f"{who}_cpu_sys_s"]
    return f"{b[f'{who}_cpu_sys_s'] / ticks:.0%}" if ticks > 0 else "n/a"
