"""What the push protocol asks of the application's backend, and nothing of HTTP.

A server configured with ``proxy_*_url`` asks the application before a
subscribe or a publish, and forwards ``{"op": "rpc"}``. The handler sees that
as a :class:`Backend`; :mod:`trioserve.server.proxy` implements it with httpx.
A backend call is one of the handler's awaits like a broker's: it holds up the
commands of the connection that made it (replies keep their order), never
other connections or the hub's fan-out.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from ..config import Config
from ..protocol.claims import Claims

__all__ = ["Backend", "BackendRefused", "BackendUnavailable", "CallerInfo", "ConnectRequest",
           "ConnectResult", "proxied_claims"]


class BackendRefused(Exception):
    """The backend answered ``{"error": {"code": ..., "message": ...}}``."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class BackendUnavailable(Exception):
    """No usable answer: unreachable, timed out, over the in-flight bound, or a bad answer."""


@attrs.frozen
class CallerInfo:
    """Who makes a call: the connection (``client``, as in presence) and its user."""

    client: str
    user: str
    transport: str


class Backend(Protocol):
    """The application's backend, as the push handler calls it."""

    @property
    def connect_proxied(self) -> bool: ...

    @property
    def subscribe_proxied(self) -> bool: ...

    @property
    def publish_proxied(self) -> bool: ...

    @property
    def rpc_proxied(self) -> bool: ...

    async def subscribe(self, caller: CallerInfo, topic: str) -> None:
        """Return if the backend allows it; raise BackendRefused or BackendUnavailable."""

    async def publish(self, caller: CallerInfo, topic: str, data: Any) -> Any:
        """The data to publish (the backend's replacement, or *data*); or raise."""

    async def rpc(self, caller: CallerInfo, method: str, data: Any) -> Any:
        """The backend's ``result``; or raise."""

    async def connect(self, request: ConnectRequest) -> ConnectResult:
        """The backend's verdict on a new connection; or raise."""


@attrs.frozen
class ConnectRequest:
    """A connection asking to be let in (``client``: the name it will have in presence)."""

    client: str
    transport: str
    remote: str | None
    headers: dict[str, str] = attrs.Factory(dict)


@attrs.frozen
class ConnectResult:
    user: str
    data: dict[str, Any] | None = None


def proxied_claims(config: Config, user: str) -> Claims:
    """The claims of a connection the connect proxy let in as *user*.

    Like an anonymous connection's, but named: it may subscribe to anything
    (a subscribe proxy decides further), publish where ``client_publish``
    allows (or a publish proxy decides), and use presence.
    """
    return Claims(sub=user, subscribe=("*",), publish=("*",) if config.client_publish else (),
                  presence=True)
