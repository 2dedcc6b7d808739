"""Topics, subscribers and fan-out.

Publishers put publications into the hub's inbox and return; one fan-out task
drains everything waiting, joins each topic's publications into one buffer per
framing, and hands that one ``bytes`` object to every subscriber with a
synchronous ``send_prepared``. Under a burst one ``send()`` then carries many
publications, which lifts fan-out past one syscall per delivery. At low load
a batch is one publication, so latency does not change.

The inbox is a bounded FIFO with a parking lot rather than a memory channel:
a publication's offset and its place in the FIFO are assigned in one step
with no checkpoint between them, so per-topic offsets are always in the order
subscribers see them.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, cast

import attrs
import trio

from .brokers import Broker
from .brokers.memory import MemoryBroker
from .history import History, Recovery

__all__ = ["Framing", "Hub", "HubClosed", "HubOverloaded", "HubStatistics", "PositionedSubscriber",
           "PublishResult", "Recovery", "Subscriber"]

log = logging.getLogger("trioserve.hub")

#: Publications taken from the inbox in one fan-out round. Large, so that a
#: backlog spread over many topics still gives each topic a batch; the round
#: time stays bounded by the gathering below.
MAX_BATCH = 16384
#: Seconds a round under backlog may wait for readers to add more (see Hub._gather).
MAX_GATHER = 0.05
#: Rounds shorter than this (seconds) are not followed by gathering: at a steady
#: rate a round is a few publications, and a gathering pass would only delay them.
MIN_GATHER_ROUND = 0.001
#: At a wake after an expensive round: wait while each WAKE_QUIET adds more, at most WAKE_GATHER.
WAKE_QUIET, WAKE_GATHER = 0.001, 0.005
#: Bytes of one topic's joined buffer; a larger batch is sent in several.
MAX_BATCH_BYTES = 256 * 1024
DEFAULT_HISTORY_SIZE = 100
DEFAULT_HISTORY_TTL = 300.0
#: Upper bounds (seconds) of the fan-out latency histogram.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5)


class Framing(Hashable, Protocol):
    """How one transport frames payloads; the hub frames each batch once per framing."""

    @property
    def frame_batch(self) -> Callable[[Sequence[bytes]], bytes]: ...

    #: None, or (SSE) how to frame publications so that each subscriber ends
    #: the batch with its own position: the hub then calls
    #: :meth:`PositionedSubscriber.send_at` instead of ``send_prepared``.
    @property
    def frame_open(self) -> Callable[[Sequence[bytes]], bytes] | None: ...


class Subscriber(Hashable, Protocol):
    """What the hub needs of a subscribed connection (a :class:`trioserve.Connection`)."""

    @property
    def framing(self) -> Framing: ...

    def send_prepared(self, data: bytes, count: int = 1) -> bool: ...

    def start_close(self, code: int = ..., reason: str | None = None) -> None: ...


class PositionedSubscriber(Subscriber, Protocol):
    """A subscriber whose framing has ``frame_open`` (an SSE stream)."""

    def send_at(self, data: bytes, count: int, topic: str, offset: int) -> bool: ...


class HubClosed(Exception):
    """The hub takes no more publications (the server is draining)."""


class HubOverloaded(Exception):
    """The inbox is full; the publisher should retry later."""


@attrs.frozen
class PublishResult:
    offset: int
    #: Subscribers on this process at the time of publishing.
    subscribers: int


@attrs.frozen
class HubStatistics:
    topics: int
    subscriptions: int
    pending: int
    publications: int
    deliveries: int
    batches: int
    closed: bool
    #: Seconds from publish to handed to every subscriber's socket: cumulative
    #: counts per upper bound in LATENCY_BUCKETS (the last is +Inf), sum, count.
    fanout_latency_buckets: tuple[int, ...]
    fanout_latency_sum: float
    #: Extra reader passes the fan-out waited for under backlog (Hub._gather).
    gathered: int = 0
    #: send() calls saved by joining a connection's topics within a round.
    coalesced: int = 0


class Hub:
    """Subscriptions and fan-out for one process.

    ``await nursery.start(hub.run)`` starts the fan-out task.
    """

    def __init__(self, max_pending: int = 100_000, history: History | None = None,
                 broker: Broker | None = None):
        self.max_pending = max_pending
        self.history = history or History(lambda topic: (DEFAULT_HISTORY_SIZE, DEFAULT_HISTORY_TTL))
        self.broker: Broker = broker or MemoryBroker()
        self.broker.attach(self)
        self._topics: dict[str, dict[Framing, set[Subscriber]]] = {}
        # Kept on the hub side so an idle, unsubscribed connection carries nothing.
        # Most connections have one topic: that is stored as the str itself,
        # since an empty set alone costs 216 bytes per connection.
        self._by_conn: dict[Subscriber, str | set[str]] = {}
        self._inbox: deque[tuple[str, int, bytes, float]] = deque()
        self._wake = trio.lowlevel.ParkingLot()
        self._space = trio.lowlevel.ParkingLot()
        self._idle = trio.lowlevel.ParkingLot()
        self._busy = False
        self._closed = False
        self._publications = 0
        self._deliveries = 0
        self._batches = 0
        self._gathered = 0  # extra reader passes waited for under backlog
        self._coalesced = 0  # sends saved by joining a connection's topics in a round
        self._subscriptions = 0
        # Plain ints, not a prometheus Histogram: no lock on the fan-out path.
        self._latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0

    # --- subscriptions -----------------------------------------------------------

    def subscribe(self, conn: Subscriber, topic: str) -> bool:
        """Add *conn* to *topic*; False if it was subscribed already."""
        held = self._by_conn.get(conn)
        if held is None:
            self._by_conn[conn] = topic
        elif isinstance(held, str):
            if held == topic:
                return False
            self._by_conn[conn] = {held, topic}
        elif topic in held:
            return False
        else:
            held.add(topic)
        self._topics.setdefault(topic, {}).setdefault(conn.framing, set()).add(conn)
        self._subscriptions += 1
        return True

    def unsubscribe(self, conn: Subscriber, topic: str) -> bool:
        """Remove *conn* from *topic*; False if it was not subscribed."""
        held = self._by_conn.get(conn)
        if held is None or (held != topic if isinstance(held, str) else topic not in held):
            return False
        if isinstance(held, str) or len(held) == 1:
            del self._by_conn[conn]
        else:
            held.discard(topic)
        self._remove(conn, topic)
        return True

    def unsubscribe_all(self, conn: Subscriber) -> None:
        """Drop every subscription of *conn* (called when it disconnects)."""
        held = self._by_conn.pop(conn, None)
        for topic in (held,) if isinstance(held, str) else held or ():
            self._remove(conn, topic)

    def _remove(self, conn: Subscriber, topic: str) -> None:
        by_framing = self._topics[topic]
        subs = by_framing[conn.framing]
        subs.discard(conn)
        self._subscriptions -= 1
        if not subs:
            del by_framing[conn.framing]
            if not by_framing:
                del self._topics[topic]
                self.broker.leave(topic)

    def topics(self) -> list[str]:
        """The topics that have subscribers on this process."""
        return list(self._topics)

    def topic_count(self, conn: Subscriber) -> int:
        """How many topics *conn* is subscribed to (cheaper than ``len(topics_of(conn))``)."""
        held = self._by_conn.get(conn)
        return 0 if held is None else 1 if isinstance(held, str) else len(held)

    def is_subscribed(self, conn: Subscriber, topic: str) -> bool:
        held = self._by_conn.get(conn)
        return held is not None and (held == topic if isinstance(held, str) else topic in held)

    def topics_of(self, conn: Subscriber) -> frozenset[str]:
        held = self._by_conn.get(conn)
        return frozenset((held,) if isinstance(held, str) else held or ())

    def position(self, topic: str) -> int:
        """The offset of the last publication to *topic* already fanned out.

        A subscriber added now receives every publication after this one live.
        """
        return self.history.position(topic)

    def epoch_of(self, topic: str) -> str:
        return self.broker.epoch(topic)

    def recover(
        self,
        topic: str,
        epoch: str,
        offset: int,
        limit: int | None = None,
        fetched: tuple[list[tuple[int, bytes]], int] | None = None,
    ) -> Recovery:
        """What a subscriber that last saw ``(epoch, offset)`` of *topic* missed.

        *fetched* is what the broker returned from :meth:`Broker.fetch` for a
        gap older than this node's own history. Call this and :meth:`subscribe`
        with no checkpoint in between, and the subscriber sees every
        publication exactly once: what is fanned out later reaches it live.
        """
        current = self.broker.epoch(topic)
        position = self.position(topic)
        if epoch != current or offset > position:
            return Recovery(False, current, position, ())
        publications: list[bytes] = []
        start = offset
        if fetched is not None:
            entries, upto = fetched
            publications = [payload for off, payload in entries if off <= position]
            start = max(offset, min(upto, position))
        local, complete = self.history.since(topic, start, trio.current_time())
        if not complete:
            return Recovery(False, current, position, ())
        publications.extend(local)
        if limit is not None:
            publications = publications[:limit]
        return Recovery(True, current, position, tuple(publications))

    async def history_page(self, topic: str, after: int, limit: int) -> tuple[tuple[bytes, ...], bool]:
        """Up to *limit* publications of *topic* after offset *after*, and whether
        history still reaches back to ``after + 1`` (for ``GET /api/history``)."""
        if self.broker.synchronous:
            return self.history_after(topic, after, limit)
        entries, _ = await self.broker.fetch(topic, after, limit)
        if entries:
            return tuple(p for _, p in entries[:limit]), entries[0][0] == after + 1
        # An empty run: nothing follows *after*, or history no longer reaches it.
        _, head = await self.broker.head(topic)
        return (), after >= head

    def history_after(self, topic: str, offset: int, limit: int) -> tuple[tuple[bytes, ...], bool]:
        """Held publications of *topic* after *offset* (at most *limit*), and
        whether history still reaches back to ``offset + 1``."""
        return self.history.after(topic, offset, trio.current_time(), limit)

    def subscribers(self, topic: str) -> list[Subscriber]:
        """The connections subscribed to *topic*, on every transport."""
        return [conn for subs in self._topics.get(topic, {}).values() for conn in subs]

    def send_event(self, topic: str, payload: bytes, exclude: Subscriber | None = None) -> None:
        """Send a JSON *payload* that is not a publication (no offset, no history),
        such as a presence event, to the subscribers of *topic* now."""
        for framing, subs in self._topics.get(topic, {}).items():
            data = framing.frame_batch((payload,))
            for conn in subs:
                if conn is not exclude:
                    conn.send_prepared(data)

    def close_subscribers(self, topic: str, code: int, reason: str) -> int:
        """Start closing every subscriber of *topic* (a broker that lost publications
        makes them reconnect and recover); returns how many."""
        subs = self.subscribers(topic)
        for conn in subs:
            conn.start_close(code, reason)
        return len(subs)

    def reset_history(self, topic: str, position: int) -> None:
        """Forget *topic*'s held publications and go on from *position* (a broker
        joined the topic, or found a gap)."""
        self.history.reset(topic, position)

    def forget_history(self, topic: str) -> None:
        """Drop *topic*'s history and position (a broker left the topic)."""
        self.history.forget(topic)

    def subscriber_count(self, topic: str) -> int:
        return sum(len(s) for s in self._topics.get(topic, {}).values())

    # --- publishing --------------------------------------------------------------

    def publish_nowait(self, topic: str, data: Any) -> PublishResult:
        """Publish *data* (any JSON value) to *topic* without waiting.

        Raises :class:`HubOverloaded` when the inbox is full and
        :class:`HubClosed` once the server drains.
        """
        if self._closed:
            raise HubClosed("the server is draining")
        if len(self._inbox) >= self.max_pending:
            raise HubOverloaded(f"{len(self._inbox)} publications waiting for fan-out")
        if not self.broker.synchronous:
            raise RuntimeError("this hub's broker publishes over the network: use await hub.publish()")
        offset = self.broker.publish_nowait(topic, data)
        return PublishResult(offset, self.subscriber_count(topic))

    async def publish(self, topic: str, data: Any) -> PublishResult:
        """Publish, waiting while the inbox is full (backpressure, like a Go channel send).

        Raises :class:`HubClosed` when draining and
        :class:`~trioserve.push.brokers.BrokerUnavailable` when the broker is down.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self.broker.synchronous:
            if self._closed:
                raise HubClosed("the server is draining")
            offset = await self.broker.publish(topic, data)
            return PublishResult(offset, self.subscriber_count(topic))
        while True:
            try:
                result = self.publish_nowait(topic, data)
            except HubOverloaded:
                await self._space.park()
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return result

    async def publish_many(self, items: Sequence[tuple[str, Any]]) -> list[PublishResult]:
        """Publish each ``(topic, data)`` in order, one offset each.

        With the memory broker there is no checkpoint between them (only a wait
        while the inbox is full), so they reach subscribers in one fan-out
        round. A pipelined broker has them all in flight at once (Redis: one
        script call per topic, in one round trip). Raises :class:`HubClosed`,
        or :class:`~trioserve.push.brokers.BrokerUnavailable` if any failed;
        the ones before it may have been published.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise HubClosed("the server is draining")
        if not self.broker.synchronous:
            offsets = await self.broker.publish_many(items)
            out = []
            for (topic, _), offset in zip(items, offsets, strict=True):
                if not isinstance(offset, int):
                    raise offset
                out.append(PublishResult(offset, self.subscriber_count(topic)))
            return out
        results = []
        for topic, data in items:
            while True:
                try:
                    results.append(self.publish_nowait(topic, data))
                    break
                except HubOverloaded:
                    await self._space.park()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return results

    def deliver_nowait(self, topic: str, offset: int, payload: bytes) -> None:
        """Queue a publication for fan-out; brokers call this in offset order."""
        self._inbox.append((topic, offset, payload, trio.current_time()))
        self._publications += 1
        if self._wake:
            self._wake.unpark_all()

    async def wait_for_space(self) -> None:
        """Wait while the inbox is full (a broker reading from the network calls this)."""
        while len(self._inbox) >= self.max_pending and not self._closed:
            await self._space.park()

    def close(self) -> None:
        """Refuse new publications; those already accepted are still delivered."""
        self._closed = True
        self._space.unpark_all()

    @property
    def closed(self) -> bool:
        return self._closed

    async def flush(self) -> None:
        """Return once every publication accepted so far has been fanned out."""
        await self.broker.flush()
        while self._inbox or self._busy:
            await self._idle.park()
        await trio.lowlevel.checkpoint()

    # --- fan-out -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The fan-out task. Runs until cancelled."""
        task_status.started()
        inbox = self._inbox
        round_time = 0.0
        while True:
            if not inbox:
                self._idle.unpark_all()
                await self._wake.park()
                if not inbox:
                    continue
                # Woken from idle: after a cheap round send at once; after an
                # expensive one, wait while readers still add (a burst's frames
                # still arriving), or it goes out in two rounds of sends.
                if round_time >= MIN_GATHER_ROUND:
                    await self._gather(min(round_time, WAKE_GATHER), quiet=WAKE_QUIET)
            elif round_time >= MIN_GATHER_ROUND:
                # Work piled up while the last round ran: under backlog, let
                # the readers parse what their sockets already hold before
                # sending, so each topic's batch (and each subscriber's send)
                # carries more. Stop when a pass adds nothing, or after about
                # one round's time, so latency grows by at most that. A short
                # round (a steady trickle) is followed by the next at once.
                await self._gather(round_time)
            self._busy = True
            started = trio.current_time()
            try:
                self._fan_out_batch()
            finally:
                self._busy = False
            round_time = trio.current_time() - started
            if self._space:
                self._space.unpark_all()
            # Let readers and publishers run between batches; the next batch is
            # whatever piled up meanwhile.
            await trio.lowlevel.checkpoint()

    async def _gather(self, round_time: float, quiet: float = 0.0) -> None:
        """Let readers run until a pass (or *quiet* seconds) adds nothing, for at
        most *round_time* (and MAX_GATHER)."""
        inbox = self._inbox
        deadline = trio.current_time() + min(round_time, MAX_GATHER)
        waiting = len(inbox)
        while waiting < MAX_BATCH and trio.current_time() < deadline:
            await (trio.sleep(quiet) if quiet else trio.lowlevel.checkpoint())
            if len(inbox) == waiting:
                return
            waiting = len(inbox)
            self._gathered += 1

    def _fan_out_batch(self) -> None:
        inbox = self._inbox
        groups: dict[str, list[bytes]] = {}
        # Each topic's offsets, for positioned framings (SSE ids).
        offsets: dict[str, list[int]] = {}
        times = []
        history = self.history
        now = trio.current_time()
        for _ in range(min(len(inbox), MAX_BATCH)):
            topic, offset, payload, published_at = inbox.popleft()
            times.append(published_at)
            history.append(topic, offset, payload, now)
            group = groups.get(topic)
            if group is None:
                groups[topic] = [payload]
                offsets[topic] = [offset]
            else:
                group.append(payload)
                offsets[topic].append(offset)
        self._batches += 1
        if len(groups) == 1:
            for topic, payloads in groups.items():
                by_framing = self._topics.get(topic)
                if by_framing:
                    end = 0
                    for chunk in _chunks(payloads):
                        end += len(chunk)
                        self._deliver(by_framing, chunk, topic, offsets[topic][end - 1])
        else:
            self._deliver_joined(groups, offsets)
        now = trio.current_time()  # after the sends: that is the latency
        counts = self._latency_counts
        latency_sum = 0.0
        for published_at in times:
            latency = now - published_at
            counts[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
            latency_sum += latency
        self._latency_sum += latency_sum

    def _deliver_joined(self, groups: dict[str, list[bytes]], offsets: dict[str, list[int]]) -> None:
        """Several topics in one round: a connection subscribed to more than one
        of them gets their buffers joined into one send (one syscall per round,
        not one per topic).

        Each topic is still framed once per framing. Connections with one topic
        (held as a ``str``) are sent to at once; only the others pass through
        *joined*, which lives for this round only, so an idle connection
        carries nothing new. A positioned framing (SSE) is not joined: each
        topic's events end with the stream's own id, sent as they are framed.
        """
        topics = self._topics
        by_conn = self._by_conn
        joined: dict[Subscriber, list[Any]] = {}  # conn -> [count, buffer, buffer, ...]
        deliveries = 0
        for topic, payloads in groups.items():
            by_framing = topics.get(topic)
            if not by_framing:
                continue
            end = 0
            for chunk in _chunks(payloads):
                count = len(chunk)
                end += count
                for framing, subs in by_framing.items():
                    deliveries += count * len(subs)
                    if framing.frame_open is not None:
                        _send_positioned(framing, subs, chunk, topic, offsets[topic][end - 1])
                        continue
                    data = framing.frame_batch(chunk)
                    for conn in subs:
                        if by_conn.get(conn).__class__ is str:
                            conn.send_prepared(data, count)
                            continue
                        parts = joined.get(conn)
                        if parts is None:
                            joined[conn] = [count, data]
                        else:
                            parts[0] += count
                            parts.append(data)
        self._deliveries += deliveries
        for conn, parts in joined.items():
            if len(parts) == 2:
                conn.send_prepared(parts[1], parts[0])
            else:
                self._coalesced += len(parts) - 2
                conn.send_prepared(b"".join(parts[1:]), parts[0])

    def _deliver(self, by_framing: dict[Framing, set[Subscriber]], payloads: list[bytes],
                 topic: str, last: int) -> None:
        count = len(payloads)
        for framing, subs in by_framing.items():
            if framing.frame_open is None:
                data = framing.frame_batch(payloads)
                # The hot loop: one prepared buffer, one synchronous send per subscriber.
                for conn in subs:
                    conn.send_prepared(data, count)
            else:
                _send_positioned(framing, subs, payloads, topic, last)
            self._deliveries += count * len(subs)

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            topics=len(self._topics),
            subscriptions=self._subscriptions,
            pending=len(self._inbox),
            publications=self._publications,
            deliveries=self._deliveries,
            batches=self._batches,
            closed=self._closed,
            fanout_latency_buckets=tuple(itertools.accumulate(self._latency_counts)),
            fanout_latency_sum=self._latency_sum,
            gathered=self._gathered,
            coalesced=self._coalesced,
        )


def _send_positioned(framing: Framing, subs: set[Subscriber], payloads: list[bytes], topic: str,
                     last: int) -> None:
    """SSE: the same events for all, framed once; each subscriber adds its own id
    (its cursor over all of its topics, at *last* for *topic*) in the same send."""
    frame_open = framing.frame_open
    assert frame_open is not None
    data = frame_open(payloads)
    for positioned in cast("set[PositionedSubscriber]", subs):
        positioned.send_at(data, len(payloads), topic, last)


def _chunks(payloads: list[bytes]) -> list[list[bytes]]:
    if len(payloads) == 1:
        return [payloads]
    chunks: list[list[bytes]] = [[]]
    size = 0
    for p in payloads:
        if size + len(p) > MAX_BATCH_BYTES and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += len(p)
    return chunks

