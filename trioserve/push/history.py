"""Per-topic publication history: a ring buffer bounded by count and age, and an epoch.

The hub appends each publication when it fans it out, so history holds exactly
what subscribers have been sent. A recovering subscriber reads history and is
added to the topic in one step with no checkpoint between them: every later
publication reaches it live, every earlier one came from history, and none
does both.

The epoch that names a history's lifetime belongs to the broker (one per
process for the memory broker, one per topic in Redis); this module only
knows offsets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import attrs

__all__ = ["History", "Recovery"]

#: (max publications, max age in seconds) for a topic; size 0 keeps none.
Policy = Callable[[str], tuple[int, float]]


@attrs.frozen
class Recovery:
    """What a subscriber that last saw ``(epoch, offset)`` has missed."""

    recovered: bool
    epoch: str
    #: The topic's position: the offset of the last publication fanned out.
    offset: int
    #: The missed publications' payloads, in offset order (empty unless recovered).
    publications: tuple[bytes, ...]


class History:
    """In-memory history for every topic of one hub."""

    def __init__(self, policy: Policy):
        self.policy = policy
        # topic -> (entries of (offset, payload, published_at), size, ttl)
        self._topics: dict[str, tuple[deque[tuple[int, bytes, float]], int, float]] = {}
        self._positions: dict[str, int] = {}

    def position(self, topic: str) -> int:
        """The offset of the last publication to *topic* that was fanned out."""
        return self._positions.get(topic, 0)

    def append(self, topic: str, offset: int, payload: bytes, now: float) -> None:
        self._positions[topic] = offset
        held = self._topics.get(topic)
        if held is None:
            size, ttl = self.policy(topic)
            if size <= 0:
                return
            held = self._topics[topic] = (deque(maxlen=size), size, ttl)
        entries, _, ttl = held
        entries.append((offset, payload, now))
        self._expire(entries, ttl, now)

    def reset(self, topic: str, position: int) -> None:
        """Start *topic* afresh at *position* (a node joining a topic in Redis)."""
        self._topics.pop(topic, None)
        self._positions[topic] = position

    def forget(self, topic: str) -> None:
        self._topics.pop(topic, None)
        self._positions.pop(topic, None)

    def since(self, topic: str, offset: int, now: float, limit: int | None = None
              ) -> tuple[tuple[bytes, ...], bool]:
        """What follows *offset* in *topic*: (payloads, complete), where complete
        means history still covers everything up to the position."""
        position = self.position(topic)
        if not 0 <= offset <= position:
            return (), False
        if offset == position:
            return (), True
        held = self._topics.get(topic)
        if held is None:
            return (), False
        entries, _, ttl = held
        self._expire(entries, ttl, now)
        if not entries or entries[0][0] > offset + 1:
            return (), False
        missed = [payload for off, payload, _ in entries if off > offset]
        if limit is not None:
            missed = missed[:limit]
        return tuple(missed), True

    def after(self, topic: str, offset: int, now: float, limit: int) -> tuple[tuple[bytes, ...], bool]:
        """Up to *limit* held publications after *offset*, and whether history
        reached back far enough to hold all of them (no gap before the first)."""
        held = self._topics.get(topic)
        if held is None:
            return (), offset >= self.position(topic)
        entries, _, ttl = held
        self._expire(entries, ttl, now)
        complete = offset >= self.position(topic) or bool(entries and entries[0][0] <= offset + 1)
        missed = tuple(payload for off, payload, _ in entries if off > offset)[:limit]
        return missed, complete

    def retained(self, topic: str) -> int:
        held = self._topics.get(topic)
        return len(held[0]) if held else 0

    @staticmethod
    def _expire(entries: deque[tuple[int, bytes, float]], ttl: float, now: float) -> None:
        cutoff = now - ttl
        while entries and entries[0][2] < cutoff:
            entries.popleft()
