"""Load-client worker for ``fanout.py``: holds a share of the subscriber connections.

The orchestrator (``fanout.py``) starts a few of these with
:class:`trioserve.bench.pool.Workers` (spawned processes, one asyncio loop
each, driven over a pipe with small command dicts, one reply per command)
and sends them ``ping``, ``connect``, ``arm``, ``wait``, ``collect`` and
``close``. Every phase is bounded in time; nothing here waits without a
deadline. The process pool and the WebSocket client live in
``trioserve/bench/`` and are shared with ``trioserve bench``.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import time
from typing import Any

from trioserve.bench.burst import subscribe
from trioserve.bench.pool import Workers, describe, own_cpu
from trioserve.bench.wsclient import Deliveries, WsClient, open_ws
from trioserve.net.listeners import raise_fd_limit

__all__ = ["FanoutWorker", "Workers", "raise_fd_limit", "start_workers"]


class FanoutWorker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.deliveries = Deliveries()
        self.clients: list[WsClient] = []
        self.topics: list[str] = []  # each client's topic, in step with ``clients``

    def op_ping(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"pong": self.index}

    async def op_connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open and subscribe one connection per source IP in ``cmd['src_ips']``.

        Each subscribes to ``cmd['topic']``, or (the rooms scenario) to its own
        entry of ``cmd['topics']``, a list in step with ``src_ips``. At most
        ``concurrency`` connections are in flight, so the measured rate is at a
        fixed, stated concurrency.
        """
        sem = asyncio.Semaphore(cmd["concurrency"])
        errors: collections.Counter[str] = collections.Counter()
        finished: list[float] = []

        topics = cmd.get("topics") or [cmd["topic"]] * len(cmd["src_ips"])

        async def one(src_ip: str, topic: str) -> None:
            async with sem:
                try:
                    client = await open_ws(cmd["host"], cmd["port"], src_ip, self.deliveries,
                                           cmd["timeout"], deflate=cmd.get("deflate", False))
                except Exception as exc:
                    errors[describe(exc)] += 1
                    return
                try:
                    await subscribe(client, topic, cmd["timeout"])
                except Exception as exc:
                    errors[describe(exc)] += 1
                    client.close()
                    return
                if cmd.get("deflate") and not client.deflate:
                    errors["permessage-deflate not negotiated"] += 1
                    client.close()
                    return
                self.clients.append(client)
                self.topics.append(topic)
                finished.append(time.monotonic())

        start = time.monotonic()
        tasks = [asyncio.create_task(one(ip, t)) for ip, t in zip(cmd["src_ips"], topics, strict=True)]
        _, pending = await asyncio.wait(tasks, timeout=cmd["phase_timeout"])
        for task in pending:
            task.cancel()
        if pending:
            errors["phase timeout"] += len(pending)
            await asyncio.wait(pending, timeout=5)
        # The connections live until the end: move them out of the cyclic GC's
        # reach so the full collections that a burst's allocations trigger
        # don't walk thousands of protocol objects each time.
        gc.collect()
        gc.freeze()
        return {
            "ok": len(self.clients),
            "failed": sum(errors.values()),
            "errors": dict(errors.most_common(5)),
            "start": start,
            "end": max(finished) if finished else start,
        }

    def open_clients(self) -> list[WsClient]:
        return [c for c in self.clients if not c.closed.done()]

    def op_arm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        clients = self.open_clients()
        for client in clients:
            client.burst_count = 0
        self.deliveries.arm(cmd["publications"], len(clients))
        return {"armed": len(clients), "cpu": own_cpu()}

    async def op_wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait until every open subscriber got the burst, or give up.

        Gives up after ``timeout`` overall, or after ``stall`` seconds without
        a single delivery, so a server that silently drops messages costs
        seconds rather than the whole phase timeout.
        """
        d = self.deliveries
        start = time.monotonic()
        status = "ok"
        while not d.done.is_set():
            try:
                await asyncio.wait_for(d.done.wait(), 0.25)
            except TimeoutError:
                now = time.monotonic()
                if now - start > cmd["timeout"]:
                    status = "timeout"
                elif now - max(start, d.last_recv) > cmd["stall"]:
                    status = "stalled"
                else:
                    continue
                break
        d.armed = False
        if status == "ok" and d.received < d.expected:
            status = "conns closed"  # done only because closed subscribers were written off
        return {"status": status, "received": d.received, "last_recv": d.last_recv,
                "remaining": max(d.remaining, 0), "cpu": own_cpu()}

    def op_collect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Per-burst detail, sent after the timing-critical ``wait`` reply."""
        clients = self.clients
        per = self.deliveries.per_conn
        open_clients = self.open_clients()
        offsets = [c.last_offset for c in open_clients] or [0]
        reasons = collections.Counter(c.close_reason for c in clients if c.closed.done())
        # Per-topic loss: the topics where some subscriber (open or not) came up short.
        lossy = sorted({t for c, t in zip(clients, self.topics, strict=True) if c.burst_count < per})
        return {
            "latencies": self.deliveries.lat.tobytes(),
            "short_conns": sum(1 for c in open_clients if c.burst_count < per),
            "lossy_topics": lossy,
            "gaps": sum(c.gaps for c in clients),
            "dups": sum(c.dups for c in clients),
            "unexpected": sum(c.unexpected for c in clients),
            "closed": len(clients) - len(open_clients),
            "close_reasons": dict(reasons.most_common(3)),
            "last_offset_min": min(offsets),
            "last_offset_max": max(offsets),
            "wire_bytes": self.deliveries.wire,
            "plain_bytes": self.deliveries.plain,
        }

    async def op_close(self, cmd: dict[str, Any] | None = None) -> dict[str, Any]:
        for client in self.clients:
            client.close()
        closed = [c.closed for c in self.clients]
        if closed:
            await asyncio.wait(closed, timeout=10)
        count = len(self.clients)
        self.clients = []
        self.topics = []
        gc.unfreeze()
        return {"closed": count}

    async def close(self) -> None:
        await self.op_close()


def start_workers(count: int) -> Workers:
    return Workers(count, FanoutWorker, name="fanout-client")
