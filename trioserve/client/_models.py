"""The client's value types."""

from __future__ import annotations

import enum
from typing import Any

import attrs


@attrs.frozen
class Publication:
    """One publication received on a subscription.

    ``offset`` is the topic's offset: it grows by one per publication, and a
    subscription yields each offset once, in order.
    """

    topic: str
    offset: int
    data: Any


@attrs.frozen
class StreamPosition:
    """A place in a topic's stream: the epoch and the last offset seen.

    Save a subscription's :attr:`~Subscription.position` and pass it as
    ``since=`` to :meth:`Client.subscribe` later to continue from there (the
    server replays what was missed if its history still holds it). ``epoch`` is
    ``None`` when the server does not report epochs.
    """

    epoch: str | None
    offset: int


@attrs.frozen
class ClientInfo:
    """One connection present on a topic, as :meth:`Client.presence` reports it.

    ``client`` is the identity from the connection's token (``None`` for an
    anonymous connection), ``conn`` the server's id of the connection and
    ``transport`` ``"websocket"`` or ``"tcp"``.
    """

    client: str | None
    conn: str | None
    transport: str | None

    @classmethod
    def from_json(cls, obj: Any) -> ClientInfo:
        if not isinstance(obj, dict):
            return cls(None if obj is None else str(obj), None, None)
        return cls(_str_or_none(obj.get("client")), _str_or_none(obj.get("conn")),
                   _str_or_none(obj.get("transport")))


@attrs.frozen
class PresenceEvent:
    """Someone subscribed to (``kind == "join"``) or left (``"leave"``) a topic.

    Only topics the server lists in its ``presence_events`` setting have these;
    see the ``on_presence`` argument of :meth:`Client.subscribe`.
    """

    kind: str
    topic: str
    client: ClientInfo


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def int_or_zero(value: Any) -> int:
    """An integer field of a reply, 0 when the server left it out."""
    return value if isinstance(value, int) else 0


class ClientState(enum.Enum):
    """Where a :class:`Client` is in its life."""

    #: Connected; requests go out at once.
    OPEN = "open"
    #: The connection dropped; the client is waiting out its backoff or connecting again.
    RECONNECTING = "reconnecting"
    #: Closed for good: after :meth:`Client.aclose`, :class:`Unauthorized`, or a
    #: close code the client does not reconnect after.
    CLOSED = "closed"


@attrs.frozen
class ClientStatistics:
    """What :meth:`Client.statistics` reports."""

    state: ClientState
    #: Successful reconnections since :func:`connect`.
    reconnects: int
    #: Connection attempts that failed while reconnecting.
    failed_attempts: int
    #: Publications handed to subscriptions (recovered ones included, duplicates not).
    publications_received: int
    #: Publications skipped because their offset had been seen already.
    duplicates_skipped: int
    #: Gaps detected (each one was raised as :class:`RecoveryGap` or passed to ``on_gap``).
    gaps: int
    #: Active subscriptions.
    subscriptions: int
    #: Requests waiting for a reply.
    pending_requests: int
