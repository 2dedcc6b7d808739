"""``trioserve bench``'s load-client worker: one process's share of the connections.

Started by :class:`trioserve.bench.pool.Workers`; the orchestrator
(``runner.py``) sends it commands:

- ``connect``: open and (optionally) subscribe its share, at a given rate
  and concurrency, each connection bound to its source address;
- ``stats``: counters so far and the latency histogram of the interval since
  the last ``stats`` (the progress display and the time series poll it);
- ``echo``: ``ping`` round trips at a rate for a while;
- ``storm``: drop a share of the open subscribers and reconnect them with
  ``since`` recovery;
- ``drain``: wait until every open subscriber has seen the final offset of
  its topic; ``collect``: per-topic totals and the whole latency histogram;
  ``close``.

Every loop is bounded in count and time. Per subscriber it keeps the offset
it subscribed at, so losses are counted by offsets: a subscriber that
subscribed at offset S of a topic whose last publication is L should have
received L - S publications.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import os
import random
import time
from array import array
from typing import Any

from .hist import Recorder, encode
from .pool import describe, own_cpu
from .subscriber import Sub, subscribe
from .wsclient import Deliveries, PushClient, open_client


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc/self/statm), 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class BenchWorker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.deliveries = Deliveries()
        self.recorder = Recorder()
        self.subs: list[Sub] = []
        self.target: dict[str, Any] = {}
        self.connect_ok = 0
        self.connect_failed = 0
        self.connect_errors: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.echo_sent = 0
        self.echo_ok = 0
        # Kept by callbacks: the stats poll must not walk every subscriber twice a
        # second (a profile of the 100k run found it at ~25% of the client's CPU).
        self.open_now = 0

    # -- helpers ---------------------------------------------------------------

    def _track(self, client: PushClient) -> None:
        """Count *client* as open until its connection is lost."""
        self.open_now += 1
        client.closed.add_done_callback(self._untrack)

    def _untrack(self, _closed: asyncio.Future[None]) -> None:
        self.open_now -= 1

    def _flush(self) -> None:
        d = self.deliveries
        if d.lat:
            samples, d.lat = d.lat, array("d")
            self.recorder.drain(samples)

    async def _open(self, src_ip: str | None, timeout: float) -> PushClient:
        t = self.target
        return await open_client(t["scheme"], t["host"], t["port"], src_ip, self.deliveries,
                                 timeout, t["path"], t.get("deflate", False))

    async def _subscribe(self, sub: Sub, timeout: float, since: dict[str, Any] | None = None) -> None:
        await subscribe(sub, timeout, since)

    # -- commands ----------------------------------------------------------------

    def op_ping(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"pong": self.index}

    async def op_connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open ``cmd['plan']`` ([src_ip, topic, a list of topics (rooms) or None] each)
        at ``rate``/s, ``concurrency`` in flight."""
        self.target = {k: cmd[k] for k in ("scheme", "host", "port", "path")}
        self.target["deflate"] = bool(cmd.get("deflate"))
        plan: list[list[Any]] = cmd["plan"]
        rate, timeout = float(cmd["rate"]), float(cmd["timeout"])
        sem = asyncio.Semaphore(cmd["concurrency"])
        finished: list[float] = []
        tasks: set[asyncio.Task[None]] = set()

        async def one(src_ip: str | None, topic: str | list[str] | None) -> None:
            try:
                try:
                    client = await self._open(src_ip, timeout)
                except Exception as exc:
                    self.connect_failed += 1
                    self.connect_errors[describe(exc)] += 1
                    return
                # rooms: a list of topics, one Sub each on this one connection.
                topics = topic if isinstance(topic, list) else [topic]
                if len(topics) > 1:
                    client.per_topic = {}
                subs = [Sub(client, src_ip, t) for t in topics]
                try:
                    for sub in subs:
                        if sub.topic is not None:
                            await self._subscribe(sub, timeout)
                except Exception as exc:
                    self.connect_failed += 1
                    self.connect_errors[describe(exc)] += 1
                    client.close()
                    return
                self.subs.extend(subs)
                self._track(client)
                self.connect_ok += 1
                finished.append(time.monotonic())
            finally:
                sem.release()

        gc.collect()
        rss_before = rss_bytes()
        start = time.monotonic()
        deadline = start + float(cmd["phase_timeout"])
        outcomes_before = self.connect_ok + self.connect_failed
        try:
            for i, (src_ip, topic) in enumerate(plan):
                if rate > 0:
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(sem.acquire(), remaining)
                except TimeoutError:
                    break
                task = asyncio.create_task(one(src_ip, topic))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=max(0.1, deadline - time.monotonic()))
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=5)
        finally:
            # Never started, or cancelled at the phase deadline.
            missing = len(plan) - (self.connect_ok + self.connect_failed - outcomes_before)
            if missing > 0:
                self.connect_failed += missing
                self.connect_errors["connect phase timeout"] += missing
        # The connections live until the end: keep them out of the cyclic GC's
        # way, so collections triggered by the load do not walk them each time.
        gc.collect()
        gc.freeze()
        return {"ok": self.connect_ok, "failed": self.connect_failed,
                "rss_before": rss_before, "rss_after": rss_bytes(), "cpu": own_cpu(),
                "errors": dict(self.connect_errors), "start": start,
                "end": max(finished) if finished else start}

    def op_stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self._flush()
        return {
            "t": time.monotonic(),
            "open": self.open_now,
            "connect_ok": self.connect_ok,
            "connect_failed": self.connect_failed,
            "received": self.deliveries.received,
            "echo_ok": self.echo_ok,
            "errors": sum(self.errors.values()) + self.connect_failed,
            "hist": self.recorder.take_interval(),
            "cpu": own_cpu(),
        }

    async def op_echo(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``ping`` round trips at ``rate``/s over the open connections for ``duration`` s."""
        rate, duration, timeout = float(cmd["rate"]), float(cmd["duration"]), float(cmd["timeout"])
        max_inflight = int(cmd.get("max_inflight", 10000))
        clients = [s.client for s in self.subs if s.is_open]
        lat = self.deliveries
        inflight: set[asyncio.Future[dict[str, Any]]] = set()
        if not clients or rate <= 0:
            return {"sent": 0}

        def done(fut: asyncio.Future[dict[str, Any]], sent_at: float) -> None:
            inflight.discard(fut)
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                self.errors[f"echo: {describe(exc)}"] += 1
            elif fut.result().get("ok") is True:
                self.echo_ok += 1
                lat.lat.append(time.monotonic() - sent_at)
            else:
                self.errors["echo: error reply"] += 1

        start = time.monotonic()
        total = int(rate * duration)
        sent = 0
        rr = 0
        while sent < total and (now := time.monotonic()) < start + duration + 1:
            due = min(total, int((now - start) * rate) + 1) - sent
            for _ in range(due):
                sent += 1
                if len(inflight) >= max_inflight:
                    self.errors["echo: skipped, too many in flight"] += 1
                    continue
                for _ in range(len(clients)):
                    client = clients[rr % len(clients)]
                    rr += 1
                    if not client.closed.done():
                        break
                else:
                    self.errors["echo: no open connection"] += 1
                    continue
                t = time.monotonic()
                fut = client.request_nowait({"op": "ping"})
                inflight.add(fut)
                fut.add_done_callback(functools.partial(done, sent_at=t))
            self.echo_sent = sent
            await asyncio.sleep(0.005)
        if inflight:
            await asyncio.wait(set(inflight), timeout=timeout)
        for fut in list(inflight):
            fut.cancel()
            self.errors["echo: no reply (timeout)"] += 1
        self.echo_sent = sent
        return {"sent": sent, "ok": self.echo_ok}

    async def op_storm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Drop ``percent`` % of the open subscribers and reconnect each with ``since`` recovery."""
        open_subs = [s for s in self.subs if s.is_open and s.topic is not None]
        count = round(len(open_subs) * float(cmd["percent"]) / 100)
        chosen = random.sample(open_subs, min(count, len(open_subs)))
        timeout = float(cmd["timeout"])
        sem = asyncio.Semaphore(cmd["concurrency"])
        result: collections.Counter[str] = collections.Counter()
        times: list[float] = []

        async def reconnect(sub: Sub) -> None:
            sub.client.abort()
            t0 = time.monotonic()
            async with sem:
                try:
                    client = await self._open(sub.src_ip, timeout)
                except Exception as exc:
                    self.errors[f"reconnect: {describe(exc)}"] += 1
                    result["failed"] += 1
                    return
                since = {"epoch": sub.epoch, "offset": sub.client.last_offset}
                sub.replace(client)
                before = sub.unrecovered
                try:
                    await self._subscribe(sub, timeout, since)
                except Exception as exc:
                    self.errors[f"resubscribe: {describe(exc)}"] += 1
                    result["failed"] += 1
                    sub.client.close()
                    return
            self._track(sub.client)
            result["reconnected"] += 1
            result["unrecovered" if sub.unrecovered > before else "recovered"] += 1
            times.append(time.monotonic() - t0)

        tasks = [asyncio.create_task(reconnect(s)) for s in chosen]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=float(cmd["phase_timeout"]))
            for task in pending:
                task.cancel()
            result["failed"] += len(pending)
            if pending:
                self.errors["reconnect: storm phase timeout"] += len(pending)
        times.sort()
        return {"dropped": len(chosen), **result,
                "reconnect_p50_ms": times[len(times) // 2] * 1e3 if times else None,
                "reconnect_max_ms": times[-1] * 1e3 if times else None}

    async def op_drain(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait (at most ``timeout`` s) until each open subscriber has its topic's final offset."""
        final: dict[str, int] = cmd["final"]
        deadline = time.monotonic() + float(cmd["timeout"])
        # Offsets only grow: each pass re-checks just the subscribers still
        # behind, so the last broadcast is not read against a full walk every 50 ms.
        behind = self.subs
        while True:
            behind = [s for s in behind if s.topic in final and s.is_open
                      and s.last_offset < final[s.topic]]
            if not behind or time.monotonic() >= deadline:
                return {"behind": len(behind)}
            await asyncio.sleep(0.05)

    def op_collect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self._flush()
        topics: dict[str, dict[str, int]] = {}
        closed: collections.Counter[str] = collections.Counter()
        unexpected = 0
        for s in self.subs:
            c = s.client
            unexpected += c.unexpected
            if not s.is_open:
                closed[c.close_reason or "closed"] += 1
            if s.topic is None:
                continue
            t = topics.setdefault(s.topic, collections.Counter())
            t["subscribers"] += 1
            t["start_sum"] += s.start_offset
            t["received"] += s.received
            t["gaps"] += s.gaps
            t["dups"] += s.dups
            t["recovered"] += s.recovered
            t["unrecovered"] += s.unrecovered
            t["reconnects"] += s.reconnects
            t["last_max"] = max(t["last_max"], s.last_offset)
        if unexpected:
            self.errors["unexpected frames"] = unexpected
        return {
            "hist": encode(self.recorder.total),
            "topics": {k: dict(v) for k, v in topics.items()},
            "open": sum(1 for s in self.subs if s.is_open),
            "closed_by_reason": dict(closed),
            "errors": dict(self.errors),
            "connect_errors": dict(self.connect_errors),
            "echo_sent": self.echo_sent,
            "echo_ok": self.echo_ok,
            "last_recv": self.deliveries.last_recv,
            "cpu": own_cpu(),
        }

    async def op_close(self, cmd: dict[str, Any] | None = None) -> dict[str, Any]:
        for s in self.subs:
            s.client.close()
        closed = [s.client.closed for s in self.subs]
        if closed:
            await asyncio.wait(closed, timeout=10)
        count = len(self.subs)
        self.subs = []
        gc.unfreeze()
        return {"closed": count}

    async def close(self) -> None:
        await self.op_close()
