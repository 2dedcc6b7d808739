"""Brokers: where offsets are assigned and publications travel between processes.

The hub above is the same for every broker. A broker assigns each topic's
offsets and epoch, and hands publications to ``hub.deliver_nowait`` in offset
order: the memory broker does it in-process, the Redis broker through Redis
pub/sub, so every node of a cluster sees the same offsets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ..config import Config
    from ..hub import Hub

__all__ = ["Broker", "BrokerUnavailable", "make_broker"]


class BrokerUnavailable(Exception):
    """The broker cannot be reached; the publisher should retry later."""


class Broker:
    """What the hub needs from a broker."""

    #: True when publishing completes without I/O: the hub then publishes with
    #: no checkpoint, so a burst from one reader becomes one fan-out batch.
    synchronous: bool = True

    def attach(self, hub: Hub) -> None:
        self.hub = hub

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (connections, pub/sub); runs until cancelled."""
        task_status.started()
        await trio.sleep_forever()

    def epoch(self, topic: str) -> str:
        """The name of *topic*'s current history; it changes when history is lost."""
        raise NotImplementedError

    def offset(self, topic: str) -> int:
        """The last offset assigned to *topic* that this process knows without I/O."""
        return 0

    def publish_nowait(self, topic: str, data: Any) -> int:
        """Publish without waiting (synchronous brokers only); returns the offset."""
        raise NotImplementedError

    async def publish(self, topic: str, data: Any) -> int:
        """Publish; returns the offset. Raises :class:`BrokerUnavailable`."""
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


def make_broker(config: Config) -> Broker:
    """The broker *config* names (``broker = "memory://"`` or ``"redis://..."``)."""
    url = getattr(config, "broker", "memory://") or "memory://"
    if url.startswith(("redis://", "rediss://")):
        try:
            from .redis import RedisBroker
        except ImportError as exc:
            raise RuntimeError(
                f"the Redis broker needs coredis: pip install 'trioserve[redis]' ({exc})"
            ) from None
        return RedisBroker(url, config)
    from .memory import MemoryBroker

    return MemoryBroker()
