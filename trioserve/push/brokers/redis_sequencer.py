"""The Redis broker's bookkeeping, kept pure: which publications a node hands to its hub.

Per joined topic it holds the epoch and the last offset handed to the hub, and
for each publication that arrives over pub/sub it gives a :class:`Verdict`:
hand it over, ignore it, hold it (the topic is still joining), fetch what is
missing before it, or treat it as the start of a new epoch. The broker does the
I/O each verdict asks for (the fetch from the stream, closing the topic's
subscribers); this module does none, so every rule here is tested without Redis
(tests/unit/push/brokers/test_redis_sequencer.py).

It also remembers, per topic, the highest offset this node published until it
came back over pub/sub, which is what a drain waits for (:meth:`Sequencer.behind`).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = ["Message", "Sequencer", "Verdict", "parse_message"]

CHANNEL_PREFIX = "ts:pub:"


class Message(NamedTuple):
    """One publication as it arrived on a topic's channel."""

    topic: str
    epoch: str
    offset: int
    #: The publication's JSON, exactly as fanned out.
    payload: bytes


def parse_message(channel: bytes, data: bytes) -> Message | None:
    """A channel message ``<epoch> <offset> <publication JSON>``, or None if
    the channel is not a topic's, or the message is not one of ours (anyone
    can PUBLISH to a channel)."""
    name = channel.decode(errors="replace")
    if not name.startswith(CHANNEL_PREFIX):
        return None
    try:
        epoch, offset, payload = data.split(b" ", 2)
        return Message(name[len(CHANNEL_PREFIX):], epoch.decode(), int(offset), payload)
    except ValueError:  # UnicodeDecodeError is one too
        return None


class Verdict(enum.Enum):
    #: The topic is not joined (it was left meanwhile), or the publication was
    #: handed over already.
    IGNORE = "ignore"
    #: The topic is joining: the publication is held until its position is known.
    HOLD = "hold"
    #: The next offset: hand it to the hub.
    NEXT = "next"
    #: Offsets are missing before it: fetch ``(last(topic), offset)`` from the
    #: stream first, then hand it over.
    GAP = "gap"
    #: Another epoch: the history this node followed is gone.
    EPOCH = "epoch"


class Sequencer:
    """Per topic: the epoch, the last offset handed to the hub, and what waits."""

    def __init__(self) -> None:
        self._epochs: dict[str, str] = {}
        # None while joining: publications then wait in _held.
        self._last: dict[str, int | None] = {}
        self._held: dict[str, list[Message]] = {}
        # Highest offset this node published, per topic, until it came back.
        self._published: dict[str, int] = {}

    # --- joining and leaving ---------------------------------------------------------

    def is_joined(self, topic: str) -> bool:
        """Joined, and no longer joining."""
        return self._last.get(topic) is not None

    def is_known(self, topic: str) -> bool:
        """Joined or joining."""
        return topic in self._last

    def joined(self) -> list[str]:
        return [t for t, last in self._last.items() if last is not None]

    def start_joining(self, topic: str) -> None:
        """From now on the topic's publications are held (the channel is being subscribed)."""
        self._last[topic] = None
        self._held[topic] = []

    def abandon(self, topic: str) -> None:
        """The join failed, or the topic is left: forget it."""
        self._last.pop(topic, None)
        self._held.pop(topic, None)
        self._epochs.pop(topic, None)
        self._published.pop(topic, None)

    def start(self, topic: str, epoch: str, position: int) -> list[Message]:
        """The join read *topic*'s position: start from it. Returns the held
        publications that come after it, in arrival order; pass each to
        :meth:`check` (a gap among them means Redis lost data while joining)."""
        self.reset(topic, epoch, position)
        held = self._held.pop(topic, [])
        return [m for m in held if m.epoch != epoch or m.offset > position]

    # --- what arrives ------------------------------------------------------------------

    def epoch(self, topic: str) -> str:
        return self._epochs.get(topic, "")

    def last(self, topic: str) -> int:
        """The last offset handed to the hub (the topic is joined)."""
        last = self._last[topic]
        assert last is not None, f"{topic} is still joining"
        return last

    def check(self, message: Message) -> Verdict:
        """What to do with a publication that arrived over pub/sub."""
        topic = message.topic
        if topic not in self._last:
            return Verdict.IGNORE
        last = self._last[topic]
        if last is None:
            self._held[topic].append(message)
            return Verdict.HOLD
        if message.epoch != self._epochs[topic]:
            return Verdict.EPOCH
        if message.offset <= last:
            return Verdict.IGNORE
        if message.offset == last + 1:
            return Verdict.NEXT
        return Verdict.GAP

    def catch_up(self, topic: str, epoch: str, position: int) -> Verdict:
        """What to do when Redis says *topic* is at ``(epoch, position)`` (after
        a reconnect): IGNORE when nothing was missed, GAP when ``(last,
        position]`` must be fetched, EPOCH when the history was lost."""
        last = self._last.get(topic)
        if last is None:
            return Verdict.IGNORE
        if epoch != self._epochs[topic]:
            return Verdict.EPOCH
        return Verdict.GAP if position > last else Verdict.IGNORE

    def handed_over(self, topic: str, offset: int) -> None:
        """*offset* went to the hub."""
        self._last[topic] = offset
        if self._published.get(topic, offset + 1) <= offset:
            del self._published[topic]

    def reset(self, topic: str, epoch: str, position: int) -> None:
        """Go on after *position*, in *epoch* (a join read the position, or the
        publications up to it cannot be delivered)."""
        self._epochs[topic] = epoch
        self.handed_over(topic, position)

    # --- this node's own publications ---------------------------------------------------

    def published(self, topic: str, offset: int) -> None:
        """This node published *topic* up to *offset*. Only a joined (or
        joining) topic is remembered: no one here waits for the others."""
        if topic in self._last and offset > self._published.get(topic, 0):
            self._published[topic] = offset

    def behind(self) -> bool:
        """A joined topic has not yet received back all this node published to it."""
        for topic, offset in self._published.items():
            last = self._last.get(topic)
            # None: no local subscribers (or joining), so nothing here waits for it.
            if last is not None and last < offset:
                return True
        return False
