"""A server's counters, as :meth:`trioserve.Server.statistics` returns them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import attrs

from ..push.hub import HubStatistics

__all__ = ["Observed", "ServerStatistics"]


@attrs.frozen
class ServerStatistics:
    connections: int
    websocket_connections: int
    tcp_connections: int
    max_connections: int
    #: Connections refused: over max_connections, over the fd budget, or draining.
    rejected_connections: int
    #: Connections accepted since start, by transport ("websocket", "tcp").
    connects_total: dict[str, int]
    #: Closed connections since start, by close code (4008: slow consumer, 4002: heartbeat...).
    disconnects_total: dict[int, int]
    #: Refused upgrades and closes for a missing, invalid or expired token.
    auth_failures: int
    draining: bool
    hub: HubStatistics
    #: Which worker of ``serve --workers N`` this is (None for a single process).
    worker_id: int | None = None
    #: Server-Sent Events streams (``GET /sse``).
    sse_connections: int = 0
    #: Backend proxy calls by outcome ("allowed", "refused", "unavailable"); empty without a proxy.
    proxy_calls: dict[str, int] = attrs.Factory(dict)
    #: Webhook counters ("delivered", "dropped", "failed_posts", "queued"); empty without webhooks.
    webhooks: dict[str, int] = attrs.Factory(dict)


class _Queues(Protocol):
    @property
    def queued_bytes(self) -> int: ...

    @property
    def queued_frames(self) -> int: ...


class Observed(Protocol):
    """What the metrics and the health routes read of a server (a :class:`trioserve.Server`)."""

    def statistics(self) -> ServerStatistics: ...

    @property
    def connections(self) -> Iterable[_Queues]: ...
