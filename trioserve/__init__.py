"""trioserve: a Trio connection server for WebSocket and TCP push.

The public API is what this module exports; everything else is internal.
docs/architecture.md draws the layers behind it.
"""

from __future__ import annotations

from ._version import __version__
from .config import Config, ConfigError, HistoryRule, SlowConsumerPolicy, load_config
from .net.connection import (
    Connection,
    ConnectionClosed,
    ConnectionState,
    ConnectionStatistics,
)
from .net.httpd import Request, Response
from .net.tcp import TcpConnection
from .net.websocket import WebSocketConnection
from .protocol.claims import AuthError, Claims
from .protocol.codes import CloseCode, ErrorCode
from .protocol.messages import Command, ProtocolError
from .push.hub import Hub, HubClosed, HubOverloaded, HubStatistics, PublishResult, Recovery
from .server import Handler, OpHandler, Reject, Server, ServerStatistics
from .server.auth import Authenticator

__all__ = [
    "AuthError",
    "Authenticator",
    "Claims",
    "CloseCode",
    "Config",
    "ConfigError",
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "Command",
    "ConnectionStatistics",
    "ErrorCode",
    "Handler",
    "Hub",
    "HubClosed",
    "HubOverloaded",
    "HistoryRule",
    "HubStatistics",
    "OpHandler",
    "ProtocolError",
    "PublishResult",
    "Recovery",
    "Reject",
    "Request",
    "Response",
    "Server",
    "ServerStatistics",
    "SlowConsumerPolicy",
    "TcpConnection",
    "WebSocketConnection",
    "__version__",
    "load_config",
]
