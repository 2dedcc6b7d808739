"""Subscribers that keep their place in a topic across connections.

A :class:`Sub` is one subscriber, whatever connection it is on now: the
offset it first subscribed at, the last offset it saw and the topic's epoch.
A new connection resubscribes with ``since`` = that epoch and offset
(docs/protocol.md), and every publication, live or recovered, must carry
exactly the next offset (:class:`~.wsclient.PushClient` counts gaps and
duplicates), so a loss shows up as a count, not as a missing latency sample.

``trioserve bench storm`` drops connections itself and calls
:meth:`Sub.replace` and :func:`subscribe`; :class:`Followers` reconnects
when the *server* ends a connection (a drain, a restart, a 1013), which is
what the fault-injection tests (tests/faults) do to it.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .pool import describe
from .wsclient import ProtocolError, PushClient

#: Opens a client connection from a source address within a timeout.
Opener = Callable[[str | None, float], Awaitable[PushClient]]

#: RFC 6455's code for a connection that ended without a close frame.
NO_CLOSE_FRAME = 1006


class Sub:
    """One subscriber across its reconnects."""

    __slots__ = (
        "base_dups",
        "base_gaps",
        "base_received",
        "client",
        "early",
        "epoch",
        "gaps_told",
        "live",
        "reconnects",
        "recovered",
        "recoveries",
        "src_ip",
        "start_offset",
        "topic",
        "unrecovered",
    )

    def __init__(self, client: PushClient, src_ip: str | None, topic: str | None) -> None:
        self.client = client
        self.src_ip = src_ip
        self.topic = topic
        self.start_offset = 0
        self.epoch: Any = None
        self.base_received = self.base_gaps = self.base_dups = 0
        # recovered / unrecovered count publications; recoveries / gaps_told count
        # resubscribe replies with recovered: true / false.
        self.recovered = self.unrecovered = self.reconnects = 0
        self.recoveries = self.gaps_told = 0
        self.early = 0  # publications on a connection before its subscribe reply
        self.live: PushClient | None = None  # the connection whose subscribe was accepted

    def _entry(self) -> list[int] | None:
        """This subscriber's counts on a connection with several topics, else None."""
        per = self.client.per_topic
        return None if per is None or self.topic is None else per.get(self.topic)

    @property
    def received(self) -> int:
        entry = self._entry()
        return self.base_received + (self.client.burst_count if entry is None else entry[1])

    @property
    def gaps(self) -> int:
        entry = self._entry()
        return self.base_gaps + (self.client.gaps if entry is None else entry[2])

    @property
    def dups(self) -> int:
        entry = self._entry()
        return self.base_dups + (self.client.dups if entry is None else entry[3])

    @property
    def last_offset(self) -> int:
        entry = self._entry()
        return self.client.last_offset if entry is None else entry[0]

    @property
    def is_open(self) -> bool:
        return not self.client.closed.done()

    @property
    def subscribed(self) -> bool:
        return self.live is self.client and self.is_open

    def since(self) -> dict[str, Any] | None:
        """Where a new connection resumes; None until a subscribe was accepted."""
        if self.epoch is None:
            return None
        return {"epoch": self.epoch, "offset": self.client.last_offset}

    def replace(self, client: PushClient) -> None:
        """Carry on on *client*: keep the old connection's counts and last offset."""
        old = self.client
        self.base_received += old.burst_count
        self.base_gaps += old.gaps
        self.base_dups += old.dups
        old.burst_count = old.gaps = old.dups = 0
        client.last_offset = old.last_offset
        self.client = client
        self.reconnects += 1


async def subscribe(sub: Sub, timeout: float, since: dict[str, Any] | None = None) -> None:
    """Subscribe ``sub.client`` to ``sub.topic``, recovering from ``since`` when given.

    Raises :class:`ProtocolError` when the server refuses.
    """
    assert sub.topic is not None
    cmd: dict[str, Any] = {"op": "subscribe", "topic": sub.topic}
    if since is not None:
        cmd["since"] = since
    client = sub.client

    def apply(reply: dict[str, Any]) -> None:
        # Runs as the reply is parsed: live publications may follow it in the same read.
        if reply.get("ok") is not True:
            return
        offset = int(reply["offset"])
        if client.per_topic is not None:  # one of several topics (rooms): no recovery here
            assert since is None and sub.topic is not None
            client.per_topic[sub.topic] = [offset, 0, 0, 0]
            sub.start_offset = offset
            sub.epoch = reply.get("epoch")
            sub.live = client
            return
        sub.early += client.burst_count + client.dups
        if since is None:
            sub.start_offset = offset
            client.last_offset = offset
        elif reply.get("recovered") is True:
            now = time.monotonic()
            pubs = reply.get("publications") or []
            for pub in pubs:
                client.account(pub, now)
            sub.recovered += len(pubs)
            sub.recoveries += 1
        else:
            sub.unrecovered += max(0, offset - client.last_offset)
            sub.gaps_told += 1
            # Told of the gap: carry on from the server's offset, which is lower
            # than ours when the history was lost and a new epoch began.
            client.last_offset = offset
        client.last_offset = max(client.last_offset, offset)
        sub.epoch = reply.get("epoch")
        sub.live = client

    reply = await client.request(cmd, timeout, apply)
    if reply.get("ok") is not True:
        error = reply.get("error") or {}
        raise ProtocolError(f"subscribe refused: {error.get('code', reply)}")


class Followers:
    """Subscribers that come back by themselves when the server ends their connection.

    Each :meth:`follow` task opens a connection, subscribes (with ``since``
    after the first time) and waits for the connection to end; then, when
    ``reconnect`` is on, it waits a random time up to ``backoff`` and starts
    again. A failed attempt (refused, reset, a 503, a refused subscribe)
    doubles the wait, up to ``backoff_max``.
    """

    def __init__(self, opener: Opener, timeout: float, reconnect: bool = True,
                 backoff: float = 0.2, backoff_max: float = 1.0) -> None:
        self.opener = opener
        self.timeout = timeout
        self.reconnect = reconnect
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.subs: list[Sub] = []  # every subscriber whose first connection opened
        self.errors: collections.Counter[str] = collections.Counter()
        self.refused = 0  # failed attempts
        self.close_codes: collections.Counter[int] = collections.Counter()
        self.first_close: collections.Counter[int] = collections.Counter()
        # Each subscriber's last offset when its first connection ended.
        self.seen_at_first_close: list[int] = []
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, src_ip: str | None, topic: str) -> asyncio.Future[None]:
        """Start following; the future resolves once the first subscribe is accepted
        (or fails, without ``reconnect``, with the first attempt's error)."""
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self.follow(src_ip, topic, started))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return started

    async def follow(self, src_ip: str | None, topic: str, started: asyncio.Future[None]) -> None:
        sub: Sub | None = None
        backoff = self.backoff
        closes = 0
        while not self.stopping:
            error: Exception | None = None
            try:
                client = await self.opener(src_ip, self.timeout)
            except Exception as exc:
                error = exc
            else:
                if sub is None:
                    sub = Sub(client, src_ip, topic)
                    self.subs.append(sub)
                else:
                    sub.replace(client)
                try:
                    await subscribe(sub, self.timeout, sub.since())
                except Exception as exc:
                    # Closed by the server before the reply: a close like any other.
                    if client.close_code is None:
                        client.abort()
                        error = exc
            if error is not None:
                self.refused += 1
                self.errors[describe(error)] += 1
                if not self.reconnect:
                    if not started.done():
                        started.set_exception(error)
                    return
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, self.backoff_max)
                continue
            assert sub is not None
            if sub.live is sub.client and not started.done():
                started.set_result(None)
            await sub.client.closed
            code = sub.client.close_code or NO_CLOSE_FRAME
            self.close_codes[code] += 1
            closes += 1
            if closes == 1:
                self.first_close[code] += 1
                self.seen_at_first_close.append(sub.client.last_offset)
            if not started.done():
                started.set_exception(ConnectionError(f"closed {code} before subscribing"))
            if not self.reconnect or self.stopping:
                return
            backoff = self.backoff
            await asyncio.sleep(random.uniform(0, backoff))

    async def close(self) -> None:
        """Stop reconnecting and drop every connection."""
        self.stopping = True
        for sub in self.subs:
            sub.client.abort()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
