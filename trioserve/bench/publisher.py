"""The publishers of ``fanout`` and ``storm``: client connections that publish at a fixed rate.

They run in the orchestrator's own event loop. Each publication carries its
send time (``{"t": <CLOCK_MONOTONIC>, "pad": "xx…"}``, padded to ``--size``
bytes of JSON); CLOCK_MONOTONIC is system-wide on Linux, so the subscribers,
in other processes, take their delivery latency against it. The publish
replies give each topic's offsets, the basis of the loss count.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from typing import Any

from .payloads import publication_data
from .pool import describe
from .wsclient import PushClient, open_client

TICK = 0.005
MAX_IN_FLIGHT = 100_000


class Publishers:
    def __init__(self, clients: list[PushClient], topics: list[str], size: int) -> None:
        self.clients = clients
        self.topics = topics
        self.size = size
        self.payload = "pad"
        self.sent = 0
        self.in_flight: set[asyncio.Future[dict[str, Any]]] = set()
        self.acked: collections.Counter[str] = collections.Counter()
        self.last_offset: dict[str, int] = {}
        self.first_offset: dict[str, int] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.first_send: float | None = None
        self.last_send: float | None = None

    @classmethod
    async def open(cls, count: int, target: dict[str, Any], topics: list[str], size: int,
                   timeout: float) -> Publishers:
        clients: list[PushClient] = []
        try:
            for _ in range(count):
                clients.append(await open_client(target["scheme"], target["host"], target["port"],
                                                 None, None, timeout, target["path"]))
        except BaseException:
            for client in clients:
                client.close()
            raise
        pubs = cls(clients, topics, size)
        pubs.payload = target.get("payload", "pad")
        return pubs

    def _done(self, fut: asyncio.Future[dict[str, Any]], topic: str) -> None:
        self.in_flight.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.errors[f"publish: {describe(exc)}"] += 1
            return
        reply = fut.result()
        if reply.get("ok") is True and isinstance(reply.get("offset"), int):
            offset = reply["offset"]
            self.acked[topic] += 1
            self.last_offset[topic] = max(self.last_offset.get(topic, 0), offset)
            self.first_offset[topic] = min(self.first_offset.get(topic, offset), offset)
        else:
            error = reply.get("error") or {}
            self.errors[f"publish: {error.get('code', 'error reply')}"] += 1

    def publish_one(self) -> None:
        n = self.sent
        self.sent += 1
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            self.errors["publish: skipped, too many in flight"] += 1
            return
        client = self.clients[n % len(self.clients)]
        topic = self.topics[n % len(self.topics)]
        data = publication_data(self.size, self.payload)
        if self.first_send is None:
            self.first_send = data["t"]
        self.last_send = data["t"]
        fut = client.request_nowait({"op": "publish", "topic": topic, "data": data})
        self.in_flight.add(fut)
        fut.add_done_callback(functools.partial(self._done, topic=topic))

    async def run(self, rate: float, duration: float) -> None:
        """Publish ``rate`` per second, spread over topics and connections, for ``duration`` s."""
        start = time.monotonic()
        total = int(rate * duration)
        while self.sent < total:
            now = time.monotonic()
            if now - start > duration + 1:
                break  # the loop fell behind; stop on time rather than catch up
            due = min(total, int((now - start) * rate) + 1) - self.sent
            for _ in range(due):
                self.publish_one()
            await asyncio.sleep(TICK)

    async def wait_acks(self, timeout: float) -> None:
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=timeout)
        for fut in list(self.in_flight):
            fut.cancel()
            self.errors["publish: no reply (timeout)"] += 1
        self.in_flight.clear()

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def summary(self) -> dict[str, Any]:
        return {
            "attempted": self.sent,
            "acked": sum(self.acked.values()),
            "errors": dict(self.errors),
            "per_topic": {t: {"acked": self.acked.get(t, 0), "first_offset": self.first_offset.get(t),
                              "last_offset": self.last_offset.get(t)} for t in self.topics},
        }
