"""The broker seam: what a broker offers the hub, and what it may do to the hub.

The hub above is the same for every broker. A broker assigns each topic's
offsets and epoch, and hands publications to ``hub.deliver_nowait`` in offset
order: the memory broker does it in-process, the Redis broker through Redis
pub/sub, so every node of a cluster sees the same offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

__all__ = ["Broker", "BrokerUnavailable", "HubPort"]


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

    def send_event(self, topic: str, payload: bytes, exclude: Any = None) -> None:
        """Send a non-publication JSON *payload* (a presence event) to *topic*'s
        subscribers here, now."""


class BrokerUnavailable(Exception):
    """The broker cannot be reached; the publisher should retry later."""


class Broker:
    """What the hub needs from a broker."""

    #: True when publishing completes without I/O: the hub then publishes with
    #: no checkpoint, so a burst from one reader becomes one fan-out batch.
    synchronous: bool = True
    #: True when :meth:`publish_many` sends a run of publications together (many
    #: in flight at once): the push handler then hands it a client's burst whole.
    pipelined: bool = False

    #: True when this broker keeps presence for the whole cluster: the push handler
    #: then calls :meth:`member_joined`, :meth:`member_left` and :meth:`members`.
    #: False (the memory broker, one process): it calls none of them, so presence
    #: costs exactly what it does without a broker, and lists this hub's subscribers.
    shares_presence: bool = False
    #: This node's name in a member's ``conn`` id (``c12@w2``), unique in the
    #: cluster; "" for one process (``c12``). Read once a connection subscribes,
    #: so a broker that learns it from its peer sets it before :meth:`run` starts.
    node: str = ""

    hub: HubPort
    #: Where control messages from the other nodes go (see :meth:`broadcast`).
    _control_handler: Callable[[bytes], None] | None = None

    def attach(self, hub: HubPort) -> None:
        self.hub = hub

    # --- cluster control (the server API: disconnect a user everywhere, ...) -----------

    def on_control(self, handler: Callable[[bytes], None]) -> None:
        """Call *handler* with each control message another node broadcast."""
        self._control_handler = handler

    def control_arrived(self, message: bytes) -> None:
        """A control message from another node (a broker's reader calls this)."""
        if self._control_handler is not None:
            self._control_handler(message)

    async def broadcast(self, message: bytes) -> int:
        """Send *message* to every other node's :meth:`on_control` handler (never
        back to this one); returns how many nodes it reached, so a caller waiting
        for their answers knows how many to expect. One process: 0, at once.
        Raises :class:`BrokerUnavailable`. Never on the delivery path: an API call's."""
        return 0

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

    async def publish_many(self, items: Sequence[tuple[str, Any]]) -> list[int | BrokerUnavailable]:
        """Publish each ``(topic, data)``; per item its offset, or why it was refused.
        Here one after another; a pipelined broker sends them together."""
        results: list[int | BrokerUnavailable] = []
        for topic, data in items:
            try:
                results.append(await self.publish(topic, data))
            except BrokerUnavailable as exc:
                results.append(exc)
        return results

    async def flush(self) -> None:
        """Return once publications this process published have reached the hub
        (a drain delivers them before its 1001). Synchronous brokers: at once."""

    async def join(self, topic: str) -> None:
        """Make sure this node receives *topic* (before a local subscriber is added)."""

    def leave(self, topic: str) -> None:
        """This node has no more subscribers to *topic*."""

    def joined(self, topic: str) -> bool:
        """Whether this node receives *topic* now. A subscriber is added only while
        it does: a leave may come between a :meth:`join` and the subscribe."""
        return True

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

    # --- presence (only called when shares_presence is True) ---------------------------

    def member_joined(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        """A connection here subscribed to *topic*: *member* is how presence shows it
        (``{"client","conn","transport"}``, ``conn`` unique in the cluster). *event* is
        the ``join`` event to deliver to *topic*'s subscribers on every other node
        (this node's have had it), or None when the topic has no presence events.
        Synchronous: queue it and return, never wait (a subscribe's hot path)."""

    def member_left(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        """The connection *member* here left *topic* (unsubscribed, or disconnected):
        as :meth:`member_joined`, with the ``leave`` event."""

    async def members(self, topic: str) -> list[dict[str, Any]] | None:
        """*topic*'s members on the other nodes (the handler adds this hub's own
        subscribers), or None when this node's subscribers are the whole answer.
        Raises :class:`BrokerUnavailable`."""
        return None
