"""The status page: ``GET /admin``, and its live data over ``/admin/ws``.

The page (``trioserve/static/admin.html``, no build step, no CDN) asks for the
API key, keeps it in session storage, opens a WebSocket to ``/admin/ws`` and
sends ``{"op": "auth", "key": "..."}`` first: a browser cannot set an
``Authorization`` header on a WebSocket, and a key in the URL would end up in
logs. A wrong key closes the stream with 4001.

Then the server sends one ``{"op": "stats", ...}`` frame every
:data:`INTERVAL` seconds. Each frame covers every node or worker: the stream
asks them through :meth:`Cluster.ask` (the broker's control seam, as the
server API does), so whichever worker of ``--workers N`` the kernel gave the
page, it shows all of them. :class:`AdminView` turns the nodes' counters into
rates and percentiles; it is pure, and keeps only the last round and a minute
of latency histograms per stream.
"""

from __future__ import annotations

import bisect
import hmac
import logging
from collections import deque
from typing import Any

import orjson
import trio

from ..net.connection import Connection, ConnectionClosed
from ..protocol.codes import CloseCode
from ..push.brokers import BrokerUnavailable
from ..push.hub import LATENCY_BUCKETS
from .cluster import Cluster, ClusterNode, merge_topics

__all__ = ["ADMIN_PATH", "ADMIN_WS_PATH", "AUTH_TIMEOUT", "INTERVAL", "AdminView", "admin_stream",
           "check_key", "percentile"]

log = logging.getLogger("trioserve.server")

ADMIN_PATH = "/admin"
ADMIN_WS_PATH = "/admin/ws"
#: Seconds between two frames of the stream.
INTERVAL = 1.0
#: Seconds the page has to send its key.
AUTH_TIMEOUT = 10.0
#: Seconds of fan-out latency the percentiles cover.
LATENCY_WINDOW = 60.0
#: Topics listed in each top list, and recent disconnects shown.
TOP = 10
RECENT = 20


def check_key(given: Any, key: str | None) -> bool:
    """Whether *given* is the API key (anything is, when none is configured)."""
    if key is None:
        return True
    return isinstance(given, str) and hmac.compare_digest(given.encode(), key.encode())


def percentile(buckets: list[int], q: float) -> float | None:
    """The upper bound (seconds) of the bucket holding quantile *q* of cumulative
    *buckets* (per bound of LATENCY_BUCKETS, then +Inf); None without samples,
    ``inf`` past the last bound."""
    total = buckets[-1] if buckets else 0
    if total <= 0:
        return None
    i = bisect.bisect_left(buckets, q * total)
    return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else float("inf")


class AdminView:
    """One stream's view: each round of the nodes' answers in, one frame out."""

    def __init__(self) -> None:
        # node/pid -> (time, publications, deliveries): a restarted worker is a new key.
        self._counters: dict[str, tuple[float, int, int]] = {}
        self._offsets: dict[str, int] = {}
        self._offsets_at = 0.0
        self._latency: deque[tuple[float, list[int]]] = deque()

    def frame(self, answers: list[dict[str, Any]], missing: int, now: float) -> dict[str, Any]:
        connections = {"websocket": 0, "tcp": 0}
        delivery_rate = 0.0
        latency = [0] * (len(LATENCY_BUCKETS) + 1)
        counters: dict[str, tuple[float, int, int]] = {}
        nodes = []
        disconnects = []
        totals: dict[str, int] = {}
        for a in answers:
            for transport, n in a["connections"].items():
                connections[transport] = connections.get(transport, 0) + n
            key = f"{a['node']}/{a['pid']}"
            counters[key] = (now, a["publications"], a["deliveries"])
            prev = self._counters.get(key)
            if prev is not None and now > prev[0]:
                delivery_rate += max(0, a["deliveries"] - prev[2]) / (now - prev[0])
            latency = [x + y for x, y in zip(latency, a["latency_buckets"], strict=True)]
            nodes.append({"node": a["node"], "worker": a["worker"], "pid": a["pid"], "state": a["state"],
                          "connections": sum(a["connections"].values()), "uptime": a["uptime"],
                          "version": a["version"], "topics": len(a["topics"])})
            disconnects += [{"time": t, "code": code, "reason": reason, "transport": transport,
                             "node": a["node"]} for t, code, reason, transport in a["recent_disconnects"]]
            for code, n in a["disconnects_total"].items():
                totals[code] = totals.get(code, 0) + n
        self._counters = counters
        topics = self._topic_rows(merge_topics(answers), now)
        # From the topics' offsets, which every node shares: a publication fanned out
        # by two workers counts once (summing the nodes' counters would count it twice).
        # Topics nobody subscribes to are not counted: no node receives them.
        pub_rate = sum(r["rate"] for r in topics)
        nodes.sort(key=lambda n: (n["worker"] or 0, str(n["node"])))
        disconnects.sort(key=lambda d: -d["time"])
        return {
            "op": "stats", "time": now,
            "connections": {**connections, "total": sum(connections.values())},
            "publications_per_s": round(pub_rate, 2), "deliveries_per_s": round(delivery_rate, 2),
            "latency": self._latency_frame(latency, now),
            "top_subscribers": sorted(topics, key=lambda r: (-r["subscribers"], r["topic"]))[:TOP],
            "top_rate": sorted((r for r in topics if r["rate"] > 0),
                               key=lambda r: (-r["rate"], r["topic"]))[:TOP],
            "nodes": nodes, "missing": missing,
            "disconnects": disconnects[:RECENT], "disconnects_total": totals,
        }

    def _topic_rows(self, table: dict[str, list[int]], now: float) -> list[dict[str, Any]]:
        elapsed = now - self._offsets_at
        rows = []
        for topic, (subs, offset) in table.items():
            prev = self._offsets.get(topic)
            rate = (offset - prev) / elapsed if prev is not None and offset >= prev and elapsed > 0 else 0.0
            rows.append({"topic": topic, "subscribers": subs, "offset": offset, "rate": round(rate, 2)})
        self._offsets = {topic: offset for topic, (_, offset) in table.items()}
        self._offsets_at = now
        return rows

    def _latency_frame(self, buckets: list[int], now: float) -> dict[str, Any]:
        history = self._latency
        history.append((now, buckets))
        while len(history) > 2 and history[1][0] <= now - LATENCY_WINDOW:
            history.popleft()
        oldest = history[0][1] if len(history) > 1 else [0] * len(buckets)
        window = [max(0, b - o) for b, o in zip(buckets, oldest, strict=True)]
        out: dict[str, Any] = {"samples": window[-1], "window": LATENCY_WINDOW}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            value = percentile(window, q)
            # JSON has no infinity: past the last bound is shown as "> 2.5 s" by the page.
            out[name] = None if value is None else -1 if value == float("inf") else value
        return out


async def admin_stream(conn: Connection, server: ClusterNode, cluster: Cluster) -> None:
    """Serve one status page: its key first, then a frame every INTERVAL seconds."""
    first: str | bytes | None = None
    with trio.move_on_after(AUTH_TIMEOUT):
        first = await conn.receive()
    if not _authorized(first, server):
        server.count_auth_failure()
        conn.start_close(CloseCode.UNAUTHORIZED, "unauthorized: wrong or missing API key")
        return
    conn.send_encoded(b'{"op":"auth","ok":true}')
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_frames, conn, cluster)
        try:
            while True:  # the page sends nothing more; this notices it leave
                await conn.receive()
        except ConnectionClosed:
            pass
        finally:
            nursery.cancel_scope.cancel()


def _authorized(message: str | bytes | None, server: ClusterNode) -> bool:
    if message is None:
        return False
    try:
        msg = orjson.loads(message)
    except orjson.JSONDecodeError:
        return False
    return isinstance(msg, dict) and msg.get("op") == "auth" and check_key(msg.get("key"),
                                                                          server.config.api_key)


async def _send_frames(conn: Connection, cluster: Cluster) -> None:
    view = AdminView()
    while True:
        try:
            answers, missing = await cluster.ask("stats")
        except BrokerUnavailable as exc:
            conn.send_encoded(orjson.dumps({"op": "error", "message": f"broker unavailable: {exc}"}))
        else:
            conn.send_encoded(orjson.dumps(view.frame(answers, missing, trio.current_time())))
        await trio.sleep(INTERVAL)
