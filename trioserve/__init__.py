"""trioserve: a Trio connection server for WebSocket and TCP push.

The public API is what this module exports; everything else is internal.
"""

from __future__ import annotations

from .auth import Authenticator, AuthError, Claims
from .config import Config, ConfigError, HistoryRule, SlowConsumerPolicy, load_config
from .connection import (
    Connection,
    ConnectionClosed,
    ConnectionState,
    ConnectionStatistics,
)
from .http import Request, Response
from .hub import Hub, HubClosed, HubOverloaded, HubStatistics, PublishResult, Recovery
from .protocol.codes import CloseCode, ErrorCode
from .protocol.messages import Command, ProtocolError
from .server import Handler, OpHandler, Reject, Server, ServerStatistics
from .tcp_connection import TcpConnection
from .ws_connection import WebSocketConnection

__version__ = "0.1.0"

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
