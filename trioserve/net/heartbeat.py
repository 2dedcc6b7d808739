"""One task per server sends the heartbeat pings of every idle connection.

Every ``tick`` this task walks the connections and pings those silent for
``ping_interval``, with a synchronous send and no task switch; the reader
wakes only when the pong arrives. The reader's cancel scope does the rest:
it times out close handshakes and token grace periods, and while no ping is
out its deadline is ``ping_interval + tick + ping_timeout`` after the last
byte in. A ping goes out within a tick of the interval, so that deadline is
the pong's timeout, at most one tick late, and this task never touches the
scope. Should this task stall, the deadline finds no ping out and the reader
sends the ping itself. Why not a cancellation per ping: docs/decisions.md,
"Heartbeat pings from one task".

The walk costs ~0.1 µs per connection per tick; ``tick`` is an eighth of the
interval, at most one second.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

import trio

__all__ = ["Heartbeats", "Pingable"]


class Pingable(Protocol):
    """What the sweep needs of a connection."""

    def ping_if_idle(self, cutoff: float, now: float) -> bool: ...

MAX_TICK = 1.0
# Connections per step of the walk: a server with 100k connections still lets
# fan-out and readers run every few milliseconds while it pings.
_CHUNK = 2048


class Heartbeats:
    """The ping sender of one server's connections (see the module docstring)."""

    __slots__ = ("_connections", "interval", "slack", "tick")

    def __init__(self, interval: float, timeout: float,
                 connections: Callable[[], Collection[Pingable]]):
        self.interval = interval
        self.tick = min(MAX_TICK, interval / 8)
        #: The reader's deadline past the interval while no ping is out: the
        #: pong's timeout when this task pinged, else the reader pings itself.
        self.slack = self.tick + timeout
        self._connections = connections

    def sweep(self) -> int:
        """Ping every connection silent for the interval; returns how many were pinged."""
        return self._sweep_part(list(self._connections()))

    def _sweep_part(self, conns: list[Pingable]) -> int:
        now = trio.current_time()
        cutoff = now - self.interval
        sent = 0
        for conn in conns:
            sent += conn.ping_if_idle(cutoff, now)
        return sent

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.tick)
            conns = list(self._connections())
            for start in range(0, len(conns), _CHUNK):
                if start:
                    await trio.lowlevel.checkpoint()
                self._sweep_part(conns[start : start + _CHUNK])
