"""A trio client for trioserve: subscriptions that survive reconnects.

::

    async with trioserve.client.connect("ws://127.0.0.1:8000/ws") as client:
        async with client.subscribe("news") as sub:
            async for pub in sub:
                print(pub.topic, pub.offset, pub.data)

See docs/client.md for reconnection, recovery and gap handling.
"""

from __future__ import annotations

from ..push.hub import PublishResult
from ._client import Client, TokenProvider, connect
from ._errors import (
    ClientClosed,
    ClientError,
    ConnectError,
    ConnectionLost,
    RecoveryGap,
    ServerError,
    Unauthorized,
)
from ._models import ClientInfo, ClientState, ClientStatistics, PresenceEvent, Publication, StreamPosition
from ._subscription import GapHandler, PresenceHandler, Subscription

__all__ = [
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientInfo",
    "ClientState",
    "ClientStatistics",
    "ConnectError",
    "ConnectionLost",
    "GapHandler",
    "PresenceEvent",
    "PresenceHandler",
    "Publication",
    "PublishResult",
    "RecoveryGap",
    "ServerError",
    "StreamPosition",
    "Subscription",
    "TokenProvider",
    "Unauthorized",
    "connect",
]
