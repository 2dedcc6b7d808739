"""The broker seam: what a broker offers the hub, and what it may do to the hub.

The hub above is the same for every broker. A broker assigns each topic's
offsets and epoch, and hands publications to ``hub.deliver_nowait`` in offset
order: the memory broker does it in-process, the Redis broker through Redis
pub/sub, so every node of a cluster sees the same offsets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import trio

__all__ = ["Broker", "BrokerUnavailable", "HubPort", "Published"]

#: Called once a queued publication is answered: ``(offset, None)``, or ``(0, error)``.
Published = Callable[[int, BaseException | None], None]


class HubPort(Protocol):
    """What a broker may do to the hub it feeds (a :class:`trioserve.Hub`)."""

    def deliver_nowait(self, topic: str, offset: int, payload: bytes) -> None:
        """Queue a publication for fan-out, in offset order."""

    async def wait_for_space(self) -> None:
        """Wait while the hub's inbox is full."""

    def position(self, topic: str) -> int:
        """The offset of the last publication of *topic* already fanned out."""

    def subscriber_count(self, topic: str) -> int: ...

    def close_subscribers(self, topic: str, code: int, reason: str) -> int:
        """Make *topic*'s subscribers reconnect and recover."""

    def reset_history(self, topic: str, position: int) -> None: ...

    def forget_history(self, topic: str) -> None: ...


class BrokerUnavailable(Exception):
    """The broker cannot be reached; the publisher should retry later."""


class Broker:
    """What the hub needs from a broker."""

    #: True when publishing completes without I/O: the hub then publishes with
    #: no checkpoint, so a burst from one reader becomes one fan-out batch.
    synchronous: bool = True
    #: True when :meth:`publish_later` works: an asynchronous broker can then
    #: take a connection's publications one after another, without waiting for
    #: each one's answer, and send them on together.
    pipelined: bool = False

    hub: HubPort

    def attach(self, hub: HubPort) -> None:
        self.hub = hub

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (connections, pub/sub); runs until cancelled."""
        task_status.started()
        await trio.sleep_forever()

    def epoch(self, topic: str) -> str:
        """The name of *topic*'s current history; it changes when history is lost."""
        raise NotImplementedError

    def publish_nowait(self, topic: str, data: Any) -> int:
        """Publish without waiting (synchronous brokers only); returns the offset."""
        raise NotImplementedError

    async def publish(self, topic: str, data: Any) -> int:
        """Publish; returns the offset. Raises :class:`BrokerUnavailable`."""
        raise NotImplementedError

    def publish_later(self, topic: str, data: Any, done: Published) -> bool:
        """Queue a publication without waiting (pipelined brokers only); *done*
        is called with its offset or error later, in the order of the calls.
        Returns False, having queued nothing, when the queue is full: the
        caller should ``await publish()`` instead."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Return once publications this process published have reached the hub
        (a drain delivers them before its 1001). Synchronous brokers: at once."""

    async def join(self, topic: str) -> None:
        """Make sure this node receives *topic* (before a local subscriber is added)."""

    def leave(self, topic: str) -> None:
        """This node has no more subscribers to *topic*."""

    async def head(self, topic: str) -> tuple[str, int]:
        """*topic*'s epoch and last offset, even on a node with no subscribers to
        it (``GET /api/history``). Memory brokers: the hub's own view."""
        return self.epoch(topic), self.hub.position(topic)

    async def fetch(self, topic: str, after: int, limit: int | None = None
                    ) -> tuple[list[tuple[int, bytes]], int]:
        """History the node's own may lack: the unbroken run of publications
        after *after* (at most *limit*), and the offset the run reaches.
        Memory brokers have nothing to add to the hub's own history."""
        return [], after
