"""Server configuration: every default in one place, validated on construction."""

from __future__ import annotations

import enum
from typing import Any

import attrs

__all__ = ["Config", "ConfigError", "SlowConsumerPolicy"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and the fix."""


class SlowConsumerPolicy(enum.StrEnum):
    DISCONNECT = "disconnect"
    DROP_OLDEST = "drop-oldest"


def _positive(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"{attr.name} must be a positive number, got {value!r}")


def _port(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{attr.name} must be a port number 0-65535, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    """Everything a :class:`~trioserve.Server` needs; all fields have working defaults.

    The zero-config server listens on 127.0.0.1:8000 only, so nothing is exposed
    to the network until an operator chooses a host.
    """

    host: str = "127.0.0.1"
    #: HTTP + WebSocket port; 0 picks a free port (see ``Server.addresses``).
    port: int = attrs.field(default=8000, validator=_port)
    #: Raw TCP (NDJSON) port; None leaves the TCP listener off.
    tcp_port: int | None = attrs.field(default=None, validator=_port)
    #: Path of the WebSocket endpoint.
    ws_path: str = "/ws"
    #: Let clients publish with ``{"op": "publish"}`` (the HTTP API always can).
    client_publish: bool = False
    #: When set, ``POST /api/publish`` requires ``Authorization: Bearer <key>``.
    api_key: str | None = None
    #: Client connections (WebSocket + TCP) at once; None means what the fd limit allows.
    max_connections: int | None = attrs.field(default=None, validator=_positive)
    #: Largest client message (WebSocket message, NDJSON line, HTTP body) in bytes.
    max_message_size: int = attrs.field(default=64 * 1024, validator=_positive)
    #: Read silence (seconds) after which the server pings.
    ping_interval: float = attrs.field(default=25.0, validator=_positive)
    #: Further silence after a ping before closing with 4002.
    ping_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Time allowed for a full HTTP request / upgrade (slowloris guard).
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Time allowed for the close handshake before a forced close.
    close_timeout: float = attrs.field(default=5.0, validator=_positive)
    #: Time a drain waits for connections to close before forcing the rest.
    drain_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: Outbound queue limit per connection, bytes.
    queue_max_bytes: int = attrs.field(default=1024 * 1024, validator=_positive)
    #: Outbound queue limit per connection, frames.
    queue_max_frames: int = attrs.field(default=1000, validator=_positive)
    slow_consumer_policy: SlowConsumerPolicy = attrs.field(
        default=SlowConsumerPolicy.DISCONNECT, converter=SlowConsumerPolicy
    )
    #: Publications waiting for fan-out before publishers are pushed back.
    hub_max_pending: int = attrs.field(default=100_000, validator=_positive)
    #: listen() backlog; the kernel caps it at net.core.somaxconn.
    backlog: int = attrs.field(default=4096, validator=_positive)
    #: Set SO_REUSEPORT on listening sockets (for several processes on one port).
    reuse_port: bool = False

    def __attrs_post_init__(self) -> None:
        if self.tcp_port is not None and self.tcp_port == self.port and self.port != 0:
            raise ConfigError(f"tcp_port and port are both {self.port}; pick two ports")
        if not self.ws_path.startswith("/"):
            raise ConfigError(f"ws_path must start with '/', got {self.ws_path!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key is empty; leave it unset to disable the check")
