"""Subscriptions: the consumer's iterator, and the reader's side of it. Internal.

The reader's side keeps each subscription's position (the topic's epoch and the
last offset handed over) and fills the consumer's bounded channel in offset
order: it skips offsets seen already, holds live publications while a
subscribe is in flight, and puts a :class:`RecoveryGap` where publications
were lost for good.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import attrs
import trio

from ._errors import ClientClosed, ClientError, RecoveryGap
from ._models import ClientInfo, PresenceEvent, Publication, StreamPosition, int_or_zero

log = logging.getLogger("trioserve.client")


class Session(Protocol):
    """What a subscription needs of the connection's session (``_session.Session``)."""

    def start_subscribe(self, state: SubState) -> None: ...

#: ``def on_gap(gap: RecoveryGap) -> bool``: True continues from the new position.
GapHandler = Callable[[RecoveryGap], bool]
#: ``def on_presence(event: PresenceEvent) -> None``.
PresenceHandler = Callable[[PresenceEvent], None]

# What a subscription's channel carries: a publication with its topic's epoch
# (so the consumer's position is exact), or an exception to raise in order.
_Item = tuple[str | None, Publication] | Exception


@attrs.define
class Counters:
    """What the readers count, for :meth:`Client.statistics`."""

    received: int = 0
    duplicates: int = 0
    gaps: int = 0


class SubState:
    """The reader's side of one subscription."""

    def __init__(self, topic: str, since: StreamPosition | None, on_gap: GapHandler | None,
                 on_presence: PresenceHandler | None, buffer_size: int, counters: Counters):
        self.topic = topic
        self.on_presence = on_presence
        # The last position handed to the channel; resubscribing asks for what follows.
        self.epoch = since.epoch if since is not None else None
        self.offset = since.offset if since is not None else None
        self.on_gap = on_gap
        self.counters = counters
        self.send, self.recv = trio.open_memory_channel[_Item](buffer_size)
        #: Set once the first subscribe reply (or an error) is in.
        self.ready = trio.Event()
        #: Position when ready, for the Subscription's initial ``position``.
        self.start_position: StreamPosition | None = None
        #: Failed before ready: :meth:`Client.subscribe` raises it.
        self.error: ClientError | None = None
        #: Failed after ready: the iterator raises it once the channel is empty.
        self.failure: ClientError | None = None
        self.closed = False
        #: The connection on which a subscribe is in flight; its publications wait in ``held``.
        self.pending: Session | None = None
        self.held: list[dict[str, Any]] = []

    def end(self, exc: ClientError | None) -> None:
        """No more publications: fail with *exc*, or (None) end quietly."""
        if not self.ready.is_set():
            self.error = exc or ClientClosed(1000, "closed by the client")
            self.ready.set()
        elif exc is not None:
            self.failure = exc
        self.pending = None
        self.held = []
        self.send.close()

    async def receive_publication(self, session: Session, msg: dict[str, Any]) -> None:
        if self.pending is not None:
            self.held.append(msg)
            return
        await self._deliver(session, msg, live=True)

    async def receive_presence(self, msg: dict[str, Any]) -> None:
        if self.on_presence is None:
            return
        try:
            client = ClientInfo.from_json(msg.get("client"))
            self.on_presence(PresenceEvent(str(msg["op"]), self.topic, client))
        except Exception as exc:
            await self._put(exc)

    async def _deliver(self, session: Session, msg: dict[str, Any], live: bool) -> None:
        offset = msg.get("offset")
        if not isinstance(offset, int):
            return
        last = self.offset
        if last is not None and offset <= last:
            self.counters.duplicates += 1
            return
        if last is not None and offset > last + 1:
            if live and self.epoch is not None:
                # Offsets jumped on a live connection (the server dropped some
                # for a slow consumer): ask for them from the server's history.
                session.start_subscribe(self)
                self.held.append(msg)
                return
            await self._gap(RecoveryGap(self.topic, self.epoch, last, self.epoch, offset - 1))
            self.offset = offset - 1
        if await self._put((self.epoch, Publication(self.topic, offset, msg.get("data")))):
            self.offset = offset
            self.counters.received += 1

    async def apply_subscribe(self, session: Session, reply: dict[str, Any]) -> None:
        """The server accepted a subscribe sent on *session*: take up its position,
        recovered publications, and what was held meanwhile."""
        held, self.held = self.held, []
        self.pending = None
        if self.closed:
            return
        epoch = reply.get("epoch")
        epoch = epoch if isinstance(epoch, str) else None
        offset = int_or_zero(reply.get("offset"))
        last_epoch, last = self.epoch, self.offset
        if last is None:
            self.epoch, self.offset = epoch, offset
        self.start_position = self.start_position or StreamPosition(self.epoch, self.offset or 0)
        # Ready before anything is delivered: the consumer must be free to
        # drain the channel while the reader fills it.
        self.ready.set()
        if last is not None:
            await self._recover(session, reply, last_epoch, last, epoch, offset, held)
        for msg in held:
            if self.pending is None:
                await self._deliver(session, msg, live=True)
            else:
                self.held.append(msg)

    async def _recover(self, session: Session, reply: dict[str, Any], last_epoch: str | None, last: int,
                       epoch: str | None, offset: int, held: list[dict[str, Any]]) -> None:
        if reply.get("recovered") is True:
            self.epoch = epoch if epoch is not None else last_epoch
            publications = reply.get("publications")
            for msg in publications if isinstance(publications, list) else ():
                if isinstance(msg, dict):
                    await self._deliver(session, msg, live=False)
            return
        if epoch == last_epoch and offset == last:
            # Nothing was published meanwhile (also how a server without
            # recovery support says "no gap").
            return
        new_offset = offset
        held_offsets = [m["offset"] for m in held if isinstance(m.get("offset"), int)]
        if held_offsets:
            new_offset = min(offset, min(held_offsets) - 1)
        await self._gap(RecoveryGap(self.topic, last_epoch, last, epoch, new_offset))
        self.epoch, self.offset = epoch, new_offset

    async def _gap(self, gap: RecoveryGap) -> None:
        self.counters.gaps += 1
        item: Exception = gap
        if self.on_gap is not None:
            try:
                if self.on_gap(gap):
                    log.info("%s (on_gap continues)", gap)
                    return
            except Exception as exc:
                exc.__context__ = gap
                item = exc
        log.warning("%s", gap)
        await self._put(item)

    async def _put(self, item: _Item) -> bool:
        try:
            await self.send.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


class Subscriptions:
    """A client's active subscriptions, one per topic, and what their readers count."""

    def __init__(self) -> None:
        self._by_topic: dict[str, SubState] = {}
        self.counters = Counters()

    def add(self, topic: str, since: StreamPosition | None, on_gap: GapHandler | None,
            on_presence: PresenceHandler | None, buffer_size: int) -> SubState:
        if topic in self._by_topic:
            raise RuntimeError(f"this client is already subscribed to {topic!r}")
        state = SubState(topic, since, on_gap, on_presence, buffer_size, self.counters)
        self._by_topic[topic] = state
        return state

    def get(self, topic: Any) -> SubState | None:
        """The open subscription to *topic* (any JSON value from a message), if any."""
        state = self._by_topic.get(topic) if isinstance(topic, str) else None
        return None if state is None or state.closed else state

    def end(self, state: SubState, exc: ClientError | None) -> bool:
        """Remove *state* and end it (see :meth:`SubState.end`); whether it was active."""
        active = self._by_topic.get(state.topic) is state
        if active:
            del self._by_topic[state.topic]
        state.end(exc)
        return active

    def __iter__(self) -> Iterator[SubState]:
        # A copy: ending a subscription while iterating removes it.
        return iter(list(self._by_topic.values()))

    def __len__(self) -> int:
        return len(self._by_topic)


class Subscription:
    """A subscription to one topic: an async iterator of :class:`Publication`.

    Made by :meth:`Client.subscribe`; it lasts until its ``async with`` block
    ends, across reconnects. Each offset is yielded once, in order. If
    publications were lost (see :class:`RecoveryGap`), iteration raises
    :class:`RecoveryGap` at the point of the gap, unless an ``on_gap`` handler
    chose to continue; iterating again continues after the gap.

    Iteration ends (``StopAsyncIteration``) when the client is closed with
    :meth:`Client.aclose`, and raises :class:`Unauthorized`,
    :class:`ClientClosed` or :class:`ServerError` when the client or this
    subscription failed; publications received before that are yielded first.
    """

    def __init__(self, state: SubState):
        self._state = state
        self._position = state.start_position

    @property
    def topic(self) -> str:
        return self._state.topic

    @property
    def position(self) -> StreamPosition | None:
        """The position of the last publication yielded (or the subscribe
        position before the first one). Pass it as ``since=`` to resume later."""
        return self._position

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Publication:
        try:
            item = await self._state.recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._state.failure is not None:
                raise self._state.failure.with_traceback(None) from None
            raise StopAsyncIteration from None
        if isinstance(item, Exception):
            if isinstance(item, RecoveryGap):
                self._position = StreamPosition(item.new_epoch, item.new_offset)
            raise item
        epoch, pub = item
        self._position = StreamPosition(epoch, pub.offset)
        return pub

    def __repr__(self) -> str:
        return f"<Subscription {self.topic!r} at {self._position}>"
