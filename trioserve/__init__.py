"""trioserve: a Trio connection server for WebSocket and TCP push.

The public API is what this module exports; everything else is internal.
"""

from __future__ import annotations

from .config import Config, ConfigError, SlowConsumerPolicy
from .connection import (
    Connection,
    ConnectionClosed,
    ConnectionState,
    ConnectionStatistics,
)
from .http import Request, Response
from .hub import Hub, HubClosed, HubOverloaded, HubStatistics, PublishResult
from .protocol.codes import CloseCode, ErrorCode
from .server import Handler, Server, ServerStatistics
from .tcp_connection import TcpConnection
from .ws_connection import WebSocketConnection

__version__ = "0.1.0"

__all__ = [
    "CloseCode",
    "Config",
    "ConfigError",
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "ConnectionStatistics",
    "ErrorCode",
    "Handler",
    "Hub",
    "HubClosed",
    "HubOverloaded",
    "HubStatistics",
    "PublishResult",
    "Request",
    "Response",
    "Server",
    "ServerStatistics",
    "SlowConsumerPolicy",
    "TcpConnection",
    "WebSocketConnection",
    "__version__",
]
