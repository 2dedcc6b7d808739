"""The Server's side of the application's backend: the connect proxy and connection events.

A mixin of :class:`~trioserve.server.Server`, kept apart so the server module
stays about listeners and connections. The proxy itself is
:mod:`trioserve.server.proxy`, the webhooks :mod:`trioserve.server.webhooks`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..net.connection import Connection
from ..net.httpd import Admitted, Request, Response
from ..push.hub import Hub
from .admin import ADMIN_WS_PATH
from .auth import Authenticator
from .proxy import HttpBackend, admit
from .webhooks import Webhooks, connection_event

__all__ = ["ApplicationLink"]

log = logging.getLogger("trioserve.server")


class ApplicationLink:
    """Connect-proxy verdicts for HTTP requests, and connect / unsubscribe / disconnect events
    for the ``on_unsubscribe`` hook and the webhooks."""

    hub: Hub
    authenticator: Authenticator | None
    backend: HttpBackend | None
    webhooks: Webhooks | None
    on_unsubscribe: Callable[[Connection, str], None] | None

    async def connect_proxy(self, request: Request, token: str | None,
                            transport: str = "websocket") -> Response | Admitted | None:
        """The connect proxy's verdict on a request that opens a connection: a WebSocket
        upgrade, or (``transport="sse"``) an SSE stream. None: no connect proxy, or a valid
        token lets it in (take the token as usual). A Response refuses it: send it.
        Admitted: give the connection its ``claims`` and, as its id, its ``conn_id``."""
        if self.backend is None or not self.backend.connect_proxied or request.path == ADMIN_WS_PATH:
            return None  # the status page's stream authenticates with the API key itself
        return await admit(self.backend, self.authenticator, request, token, transport,
                           self.hub.broker.node)

    def unsubscribed(self, conn: Connection, topic: str) -> None:
        """The push handler's: *conn* unsubscribed from *topic*."""
        self.connection_event("unsubscribe", conn, topic=topic)
        if self.on_unsubscribe is not None:
            try:
                self.on_unsubscribe(conn, topic)
            except Exception:
                log.exception("on_unsubscribe failed for %s", conn.remote)

    def connected(self, conn: Connection) -> None:
        """*conn* is in, with its claims (at once, or after a TCP ``connect``)."""
        self.connection_event("connect", conn)

    def connection_event(self, event: str, conn: Connection, **fields: Any) -> None:
        """Queue a webhook event about *conn*; never waits."""
        if self.webhooks is not None:
            self.webhooks.emit(connection_event(event, conn, self.hub.broker.node, **fields))
