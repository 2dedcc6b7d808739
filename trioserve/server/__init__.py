"""4. The assembly: a :class:`Server` puts the network layer and the push domain
together, and owns lifecycle, drain, signals, token checks and metrics."""

from __future__ import annotations

from .server import Handler, OpHandler, Reject, Server
from .stats import ServerStatistics

__all__ = ["Handler", "OpHandler", "Reject", "Server", "ServerStatistics"]
