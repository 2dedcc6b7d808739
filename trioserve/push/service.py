"""Publishing for the protocol handlers: one place that picks the hub's
synchronous or asynchronous path and names its errors.

A client ``publish`` and ``POST /api/publish`` both come here. With a
synchronous broker (memory) the common path has no checkpoint, so a burst read
in one chunk lands in the hub together and goes out as one fan-out batch. With
a pipelined broker (Redis) a client connection's publications go through
:func:`publish_later`: each is queued without waiting for the one before it to
be answered, so a burst read in one chunk goes to the broker together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..config import Config
from ..protocol.codes import ErrorCode
from .brokers import BrokerUnavailable
from .hub import Hub, HubClosed, HubOverloaded, PublishResult

__all__ = ["HubContext", "PublishRefused", "publish", "publish_later"]


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
    except (HubClosed, BrokerUnavailable, HubOverloaded) as exc:
        raise _refused(exc) from None


def publish_later(hub: Hub, topic: str, data: Any,
                  done: Callable[[PublishResult | PublishRefused], None]) -> bool:
    """Queue *data* for *topic* without waiting, if the hub's broker pipelines
    publications (Redis): *done* is called later with the result or the
    refusal, in the order of the calls. Returns False, having queued nothing,
    when the broker does not pipeline or its queue is full: use :func:`publish`.
    Raises :class:`PublishRefused` at once while the server drains.
    """
    broker = hub.broker
    if broker.synchronous or not broker.pipelined:
        return False
    if hub.closed:
        raise _refused(HubClosed())

    def answered(offset: int, error: BaseException | None) -> None:
        if error is None:
            done(PublishResult(offset, hub.subscriber_count(topic)))
        elif isinstance(error, HubClosed | BrokerUnavailable | HubOverloaded):
            done(_refused(error))
        else:
            done(PublishRefused(ErrorCode.UNAVAILABLE, f"broker failed: {error!r}", 1))

    return broker.publish_later(topic, data, answered)


def _refused(exc: HubClosed | BrokerUnavailable | HubOverloaded) -> PublishRefused:
    if isinstance(exc, HubClosed):
        return PublishRefused(ErrorCode.UNAVAILABLE, "server is draining")
    if isinstance(exc, BrokerUnavailable):
        return PublishRefused(ErrorCode.UNAVAILABLE, f"broker unavailable: {exc}", 1)
    return PublishRefused(ErrorCode.UNAVAILABLE, f"overloaded: {exc}", 1)
