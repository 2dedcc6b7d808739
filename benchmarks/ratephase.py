"""Rate mode of ``fanout.py``: publications at a steady rate, the latency of every delivery.

A burst measures throughput, and most of a burst's latency is the queue the
burst itself builds. At a fixed rate the server is mostly idle between
publications, so the latency is what one publication costs to fan out, and
whether the server keeps up at that rate is a yes/no answer: if it does not,
its backlog keeps growing and the last delivery comes long after the last
publication.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import report
from benchmarks.loadclient import Workers
from benchmarks.phase import TOPIC, Sent, delivery_phase, gather_acks, sys_share
from benchmarks.serverproc import ServerProcess
from trioserve.bench.burst import publish_burst
from trioserve.bench.wsclient import WsClient


def planned_publications(rate: float, duration: float) -> int:
    return max(1, round(rate * duration))


async def paced_publish(publisher: WsClient, count: int, rate: float, size: int,
                        ack_timeout: float, topics: Sequence[str] = (TOPIC,)) -> Sent:
    """Send publication i at start + i/rate, each stamped with its own send time.

    The schedule is fixed up front: a late send (the harness's loop was busy)
    does not push back the ones after it, so the rate over the phase is the
    one asked for. Publication i goes to ``topics[i % len(topics)]``. How late
    the sends were is reported; the latency is measured from the stamp, so a
    late send does not count as server latency.
    """
    acks: list[asyncio.Future[dict[str, Any]]] = []
    lags: list[float] = []
    t_first = t_last = math.nan
    begin = time.monotonic()
    for i in range(count):
        due = begin + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if publisher.closed.done():
            break  # nothing more reaches the server; what was not sent shows as lost
        t, futures = publish_burst(publisher, topics[i % len(topics)], 1, size)
        acks.extend(futures)
        lags.append(max(0.0, t - due))
        if i == 0:
            t_first = t
        t_last = t
    sent = len(lags)
    extra = {
        "publications_sent": sent,
        "send_rate": (sent - 1) / (t_last - t_first) if sent > 1 and t_last > t_first else None,
        "send_lag_p50_ms": statistics.median(lags) * 1e3 if lags else None,
        "send_lag_max_ms": max(lags) * 1e3 if lags else None,
    }
    return Sent(t_first, t_last, await gather_acks(acks, ack_timeout), extra)


async def run_rate(workers: Workers, server: ServerProcess, publisher: WsClient,
                   args: argparse.Namespace) -> dict[str, Any]:
    count = args.rate_publications
    topics = args.topic_names
    # A stall must be longer than the gap between two publications, or a slow
    # rate would end the phase between them.
    stall = max(args.stall_timeout, 3 / args.rate)
    # Each subscriber has one topic: it gets count / topics of the publications.
    res = await delivery_phase(
        workers, server, count // len(topics), args.duration + args.drain_timeout, stall,
        lambda: paced_publish(publisher, count, args.rate, args.size, args.drain_timeout, topics))
    received = res.counts["received"]
    sent = res.sent
    backlog = res.last_recv - sent.t_last if received and not math.isnan(sent.t_last) else None
    complete = res.counts["worker_status"] == ["ok"] and res.counts["lost"] == 0
    return {
        "publications_planned": count,
        "rate_asked": args.rate,
        **sent.extra,
        **res.counts,
        "seconds": res.last_recv - sent.t_first if received else None,
        # Last delivery minus last publication: about one publication's
        # fan-out time if the server kept up, the accumulated backlog if not.
        "backlog_s": backlog,
        "kept_up": complete and backlog is not None and backlog <= args.kept_up_within,
        **res.accounting,
    }


def rate_line(r: dict[str, Any]) -> str:
    lat = r["latency"]
    return (f"    rate: {r['publications_sent']}/{r['publications_planned']} publications at "
            f"{report.fmt(r['send_rate'], '.1f')}/s (send lag max "
            f"{report.fmt(r['send_lag_max_ms'], '.1f')} ms), {r['received']:,}/{r['expected']:,} "
            f"delivered, p50 {report.fmt(lat['p50_ms'], '.1f')} ms, p99 "
            f"{report.fmt(lat['p99_ms'], '.1f')} ms, max {report.fmt(lat['max_ms'], '.1f')} ms, "
            f"server CPU {report.fmt(r['server_cpu_us_per_delivery'], '.2f')} us/delivery "
            f"({sys_share(r, 'server')} sys), client CPU "
            f"{report.fmt(r['client_cpu_us_per_delivery'], '.2f')} us/delivery, "
            f"gaps {r['gaps']}, dups {r['dups']}, closed {r['closed_conns']}; "
            f"kept up: {report.kept_up_text(r)}")
