"""Publishing for the protocol handlers: one place that picks the hub's
synchronous or asynchronous path and names its errors.

A client ``publish`` and ``POST /api/publish`` both come here. With a
synchronous broker (memory) the common path has no checkpoint, so a burst read
in one chunk lands in the hub together and goes out as one fan-out batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..config import Config
from ..protocol.codes import ErrorCode
from .brokers import BrokerUnavailable
from .hub import Hub, HubClosed, HubOverloaded, PublishResult

__all__ = ["HubContext", "PublishRefused", "publish", "publish_many", "result_fields"]


class HubContext(Protocol):
    """What every protocol handler needs of the server (a :class:`trioserve.Server`)."""

    @property
    def config(self) -> Config: ...

    @property
    def hub(self) -> Hub: ...

    def count_auth_failure(self) -> None:
        """Count a refused token or API key (the auth-failures metric)."""


class PublishRefused(Exception):
    """The hub did not take the publication; ``code`` and ``message`` say why."""

    def __init__(self, code: ErrorCode, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        #: Seconds after which a retry may succeed (for HTTP's ``Retry-After``).
        self.retry_after = retry_after


async def publish(hub: Hub, topic: str, data: Any, *, wait: bool) -> PublishResult:
    """Publish *data* to *topic*.

    *wait*: when the hub's inbox is full, wait for space (backpressure on a
    client connection) rather than refuse (the HTTP API answers 503 at once).
    Raises :class:`PublishRefused`.
    """
    try:
        if hub.broker.synchronous:
            try:
                return hub.publish_nowait(topic, data)
            except HubOverloaded:
                if not wait:
                    raise
        return await hub.publish(topic, data)
    except HubClosed:
        raise PublishRefused(ErrorCode.UNAVAILABLE, "server is draining") from None
    except BrokerUnavailable as exc:
        raise PublishRefused(ErrorCode.UNAVAILABLE, f"broker unavailable: {exc}", 1) from None
    except HubOverloaded as exc:
        raise PublishRefused(ErrorCode.UNAVAILABLE, f"overloaded: {exc}", 1) from None


async def publish_many(hub: Hub, items: Sequence[tuple[str, Any]], *,
                       wait: bool = True) -> list[PublishResult | PublishRefused]:
    """Publish a run of ``(topic, data)``. Per item its result, or why it was refused.

    A synchronous broker (memory) publishes each at once, with no checkpoint
    unless the inbox is full (then it waits, as a client's ``publish`` does),
    so the run lands in one fan-out batch (*wait* False: refuse with
    ``unavailable`` instead, as the HTTP API does). A pipelined broker has all
    of them in flight at once, so the sequencer relays them together (Redis:
    one script call per topic, all in one round trip)."""
    if hub.closed:
        return [PublishRefused(ErrorCode.UNAVAILABLE, "server is draining")] * len(items)
    if hub.broker.synchronous:
        done: list[PublishResult | PublishRefused] = []
        for topic, data in items:
            try:
                done.append(await publish(hub, topic, data, wait=wait))
            except PublishRefused as exc:
                done.append(exc)
        return done
    results = await hub.broker.publish_many(items)
    out: list[PublishResult | PublishRefused] = []
    for (topic, _), result in zip(items, results, strict=True):
        if isinstance(result, BrokerUnavailable):
            out.append(PublishRefused(ErrorCode.UNAVAILABLE, f"broker unavailable: {result}", 1))
        else:
            out.append(PublishResult(result, hub.subscriber_count(topic)))
    return out


def result_fields(result: PublishResult | PublishRefused) -> dict[str, Any]:
    """One entry of a batch's results: ``{"ok": true, "offset", "subscribers"}``
    or ``{"ok": false, "error": {"code", "message"}}``."""
    if isinstance(result, PublishRefused):
        return {"ok": False, "error": {"code": result.code.value, "message": result.message}}
    return {"ok": True, "offset": result.offset, "subscribers": result.subscribers}
