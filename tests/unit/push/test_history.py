"""History: ring buffer bounds, TTL, epochs and what recovery can promise."""

from __future__ import annotations

from trioserve.push.history import History


def make(size: int = 5, ttl: float = 100.0) -> History:
    return History(lambda topic: (size, ttl))


def fill(h: History, topic: str, n: int, start: float = 0.0, step: float = 1.0) -> None:
    for i in range(1, n + 1):
        h.append(topic, i, f"p{i}".encode(), start + (i - 1) * step)


def test_recovers_exactly_what_was_missed() -> None:
    h = make()
    fill(h, "t", 4)
    assert h.since("t", 1, now=4) == ((b"p2", b"p3", b"p4"), True)
    assert h.position("t") == 4


def test_nothing_missed_is_a_recovery() -> None:
    h = make()
    fill(h, "t", 3)
    assert h.since("t", 3, now=3) == ((), True)


def test_unknown_topic_at_offset_zero_is_a_recovery() -> None:
    assert make().since("new", 0, now=0) == ((), True)


def test_reset_starts_a_topic_at_a_position() -> None:
    h = make()
    fill(h, "t", 3)
    h.reset("t", 40)  # a node joining a topic in Redis at offset 40
    assert h.position("t") == 40 and h.retained("t") == 0
    assert h.since("t", 40, now=0) == ((), True)
    assert h.since("t", 39, now=0) == ((), False)
    h.append("t", 41, b"p41", 1)
    assert h.since("t", 40, now=1) == ((b"p41",), True)


def test_gap_older_than_the_ring_cannot_be_recovered() -> None:
    h = make(size=5)
    fill(h, "t", 10)  # holds 6..10
    assert h.retained("t") == 5
    assert not h.since("t", 4, now=10)[1]
    assert h.since("t", 5, now=10) == ((b"p6", b"p7", b"p8", b"p9", b"p10"), True)


def test_ttl_expires_old_publications() -> None:
    h = make(size=100, ttl=10)
    fill(h, "t", 5, start=0, step=5)  # published at 0, 5, 10, 15, 20
    assert not h.since("t", 2, now=21)[1]  # 3 (t=10) is older than 11: gone
    assert h.since("t", 3, now=21) == ((b"p4", b"p5"), True)


def test_offsets_from_the_future_are_refused() -> None:
    h = make()
    fill(h, "t", 2)
    assert not h.since("t", 7, now=2)[1]


def test_size_zero_keeps_no_history_but_tracks_position() -> None:
    h = make(size=0)
    fill(h, "t", 3)
    assert h.position("t") == 3 and h.retained("t") == 0
    assert not h.since("t", 1, now=3)[1]
    assert h.since("t", 3, now=3)[1]


def test_after_reports_completeness() -> None:
    h = make(size=3)
    fill(h, "t", 6)  # holds 4..6
    assert h.after("t", 3, now=6, limit=10) == ((b"p4", b"p5", b"p6"), True)
    assert h.after("t", 1, now=6, limit=10) == ((b"p4", b"p5", b"p6"), False)
    assert h.after("t", 4, now=6, limit=1) == ((b"p5",), True)
    assert h.after("t", 6, now=6, limit=10) == ((), True)
    assert h.after("none", 0, now=6, limit=10) == ((), True)


def test_policy_is_per_topic() -> None:
    h = History(lambda topic: (2, 100.0) if topic.startswith("chat.") else (10, 100.0))
    fill(h, "chat.a", 5)
    fill(h, "news", 5)
    assert (h.retained("chat.a"), h.retained("news")) == (2, 5)
