"""Webhooks: connect, disconnect and unsubscribe events POSTed to the application.

:meth:`Webhooks.emit` only appends to a bounded queue: the connection that
causes an event never waits on the receiver. One task sends the queue in
batches, ``{"events": [...]}``, of up to ``webhooks_batch_size`` events, at
most 100 ms after the first event of a batch arrived. Each body is signed:
``X-Trioserve-Signature: sha256=<hex HMAC-SHA256 of the body under
webhooks_secret>``. A failed POST (unreachable, too slow, not 2xx) is retried
with exponential backoff; the events stay at the head of the queue meanwhile,
in order. When the queue is full, the oldest events are dropped, logged and
counted (``trioserve_webhook_events_dropped_total``): a receiver that is down
for long must not grow the server's memory. A drain flushes the queue
(:meth:`Webhooks.flush`) within what is left of ``drain_timeout``.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
from typing import Any

import httpx
import orjson
import trio

from ..config import Config
from ..config.checks import redact_url
from ..net.connection import Connection

__all__ = ["BATCH_WINDOW", "SIGNATURE_HEADER", "Webhooks", "connection_event", "sign"]

log = logging.getLogger("trioserve.webhooks")

#: Seconds a batch waits for more events after its first one.
BATCH_WINDOW = 0.1
SIGNATURE_HEADER = "X-Trioserve-Signature"
# Backoff between retries of a failed POST: doubles from the first to the last.
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 5.0


def connection_event(event: str, conn: Connection, node: str = "", **fields: Any) -> dict[str, Any]:
    """``{"event", "user", "client", "transport", ...fields}`` for *conn*; ``user`` is ""
    for an anonymous connection, ``client`` its name in presence (``c12``, ``c12@w2``)."""
    claims = conn.claims
    user = "" if claims is None or claims.anonymous else claims.sub
    client = f"c{conn.id}@{node}" if node else f"c{conn.id}"
    return {"event": event, "user": user, "client": client, "transport": conn.transport_name, **fields}


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for *body*: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Webhooks:
    """The queue of events for ``webhooks_url`` and the task that sends it."""

    def __init__(self, config: Config):
        assert config.webhooks_url is not None
        self.url = config.webhooks_url
        self._shown = redact_url(self.url)  # for logs: no password from the URL
        self.config = config
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        #: Events taken from the queue by the POST in flight (back at its head if it fails).
        self._sending = 0
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._flushing = False
        self.delivered = 0
        self.dropped = 0
        self.failed_posts = 0

    @property
    def queued(self) -> int:
        return len(self._queue) + self._sending

    def counters(self) -> dict[str, int]:
        return {"delivered": self.delivered, "dropped": self.dropped, "failed_posts": self.failed_posts,
                "queued": self.queued}

    def emit(self, event: dict[str, Any]) -> None:
        """Queue *event*; never blocks. Over ``webhooks_queue_size`` the oldest goes."""
        self._queue.append(event)
        self._trim()
        if self._idle.is_set():
            self._idle = trio.Event()
        if len(self._queue) >= self.config.webhooks_batch_size or len(self._queue) == 1:
            self._wakeup.set()

    def _trim(self) -> None:
        # The batch in flight is not counted: it may yet be delivered, and if it
        # fails it comes back to the head of the queue and is trimmed then, oldest first.
        over = len(self._queue) - self.config.webhooks_queue_size
        if over <= 0:
            return
        for _ in range(over):
            self._queue.popleft()
        if self.dropped == 0 or (self.dropped + over) // 1000 > self.dropped // 1000:
            # The first drop, then one line per thousand: a dead receiver must not flood the log.
            log.warning("webhook queue full (webhooks_queue_size %d): dropped the oldest events, "
                        "%d so far; is %s down?", self.config.webhooks_queue_size,
                        self.dropped + over, self._shown)
        self.dropped += over

    async def flush(self, deadline: float) -> None:
        """Send everything queued, without the batch window, by *deadline* (a drain's)."""
        self._flushing = True
        self._wakeup.set()
        with trio.move_on_at(deadline):
            await self._idle.wait()
        if self.queued:
            log.warning("drain: %d webhook events not delivered to %s", self.queued, self._shown)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(timeout=self.config.proxy_timeout,
                                     headers={"content-type": "application/json",
                                              "user-agent": "trioserve"}) as client:
            task_status.started()
            backoff = _FIRST_BACKOFF
            while True:
                if not self._queue:
                    self._idle.set()
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                if len(self._queue) < self.config.webhooks_batch_size and not self._flushing:
                    # The batch window: more events may join this POST.
                    with trio.move_on_after(BATCH_WINDOW):
                        while len(self._queue) < self.config.webhooks_batch_size:
                            await self._wakeup.wait()
                            self._wakeup = trio.Event()
                batch = [self._queue.popleft()
                         for _ in range(min(len(self._queue), self.config.webhooks_batch_size))]
                self._sending = len(batch)
                try:
                    ok = await self._post(client, batch)
                finally:
                    self._sending = 0
                if ok:
                    self.delivered += len(batch)
                    backoff = _FIRST_BACKOFF
                    continue
                # Back at the head, in order; what no longer fits is the oldest, and goes.
                self._queue.extendleft(reversed(batch))
                self._trim()
                self.failed_posts += 1
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _post(self, client: httpx.AsyncClient, batch: list[dict[str, Any]]) -> bool:
        body = orjson.dumps({"events": batch})
        headers = {}
        if self.config.webhooks_secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.config.webhooks_secret, body)
        try:
            with trio.fail_after(self.config.proxy_timeout):
                resp = await client.post(self.url, content=body, headers=headers)
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            problem = f"{exc!r}"
        else:
            if 200 <= resp.status_code < 300:
                return True
            problem = f"HTTP status {resp.status_code}"
        log.warning("webhook POST of %d events to %s failed (%s); retrying", len(batch), self._shown,
                    problem)
        return False
