"""One task per server sends the heartbeat pings of every idle connection.

A connection's reader used to send its own ping when its cancel scope's
deadline (``ping_interval`` after the last byte in) expired. That costs a trio
cancellation per ping: the deadline heap, ``CancelStatus.recalculate``, the
abort of the pending ``wait_readable`` and ``Cancelled`` raised through the
reader. A profile put ~60% of the heartbeat's cost there, 129 µs of server
CPU per ping and pong on the project machine. With 100,000 connections and
the default 25 s interval that is 4,000 pings/s, 0.65 of a core of six
workers before anything is published, which took the 100k broadcast's p99
over its target.

So the pings come from here: every ``tick`` this task walks the connections
and pings those silent for ``ping_interval``, with a synchronous send and no
task switch. The reader wakes only when the pong arrives. Its cancel scope
still does the rest, as before: it times out close handshakes and token
grace periods, and while no ping is out its deadline is ``ping_interval +
tick + ping_timeout`` after the last byte in. A ping goes out within a tick
of the interval, so that deadline is the pong's timeout, at most one tick
late, and the scope is never touched by this task (trio's deadline setter
costs a generator context manager, ~20% of the remaining cost when it was
moved per ping). Should this task stall, the deadline finds no ping out and
the reader sends it itself.

The walk costs ~0.1 µs per connection per tick; ``tick`` is an eighth of the
interval, at most one second.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Heartbeats"]

MAX_TICK = 1.0
# Connections per step of the walk: a server with 100k connections still lets
# fan-out and readers run every few milliseconds while it pings.
_CHUNK = 2048


class Heartbeats:
    """The ping sender of one server's connections (see the module docstring)."""

    __slots__ = ("_connections", "interval", "slack", "tick")

    def __init__(self, interval: float, timeout: float,
                 connections: Callable[[], Collection[Connection]]):
        self.interval = interval
        self.tick = min(MAX_TICK, interval / 8)
        #: The reader's deadline past the interval while no ping is out: the
        #: pong's timeout when this task pinged, else the reader pings itself.
        self.slack = self.tick + timeout
        self._connections = connections

    def sweep(self) -> int:
        """Ping every connection silent for the interval; returns how many were pinged."""
        return self._sweep_part(list(self._connections()))

    def _sweep_part(self, conns: list[Connection]) -> int:
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
