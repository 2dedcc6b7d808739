"""The embedded broker's sequencer on its own: requests in, frames out, no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from trioserve.config import Config, HistoryRule
from trioserve.protocol.messages import encode_publication
from trioserve.push.brokers.sequencer import Sequencer, publication
from trioserve.push.brokers.wire import FrameReader, encode_frame


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(config: Config | None = None, **kwargs: Any) -> tuple[Sequencer, Clock]:
    clock = Clock()
    return Sequencer((config or Config()).history_for, epoch="e1", clock=clock, **kwargs), clock


def out(seq: Sequencer, worker: int) -> list[tuple[Any, bytes]]:
    return FrameReader().feed(bytes(seq.take(worker)))


def pub(seq: Sequencer, worker: int, request_id: int, topic: str, data: bytes = b"1") -> None:
    seq.handle(worker, ["pub", request_id, topic], data)


def test_a_worker_is_greeted_with_the_epoch_and_its_id() -> None:
    seq, _ = make()
    seq.connect(2)
    assert seq.ready == {2}
    assert out(seq, 2) == [(["hello", "e1", 2], b"")]
    assert seq.ready == set()
    assert out(seq, 2) == []


def test_offsets_are_gapless_per_topic_whichever_worker_publishes() -> None:
    seq, _ = make()
    seq.connect(1)
    seq.connect(2)
    out(seq, 1), out(seq, 2)
    pub(seq, 1, 10, "a")
    pub(seq, 2, 10, "a")
    pub(seq, 1, 11, "b")
    pub(seq, 2, 11, "a")
    assert out(seq, 1) == [(["ok", 10, 1], b""), (["ok", 11, 1], b"")]
    assert out(seq, 2) == [(["ok", 10, 2], b""), (["ok", 11, 3], b"")]


def test_the_publication_is_encoded_once_exactly_as_a_single_process_does() -> None:
    data = {"k": [1, None, "é"], "n": 2.5}
    import orjson

    assert publication("room/1", 7, orjson.dumps(data)) == encode_publication("room/1", 7, data)


def test_relays_go_only_to_workers_that_joined_and_follow_the_join_reply() -> None:
    seq, _ = make()
    for w in (1, 2, 3):
        seq.connect(w)
        out(seq, w)
    pub(seq, 3, 1, "t", b'"before"')
    seq.handle(1, ["join", 5, "t"], b"")
    seq.handle(2, ["join", 6, "other"], b"")
    pub(seq, 3, 2, "t", b'"after"')
    relay = (["m", "t", 2], encode_publication("t", 2, "after"))
    assert out(seq, 1) == [(["ok", 5, 1], b""), relay]
    assert out(seq, 2) == [(["ok", 6, 0], b"")]
    assert out(seq, 3) == [(["ok", 1, 1], b""), (["ok", 2, 2], b"")]  # not joined: replies only
    assert seq.joined("t") == {1}


def test_a_burst_waits_in_one_outbox_and_is_taken_whole() -> None:
    seq, _ = make()
    seq.connect(1)
    out(seq, 1)
    seq.handle(1, ["join", 1, "t"], b"")
    for i in range(100):
        pub(seq, 1, 2 + i, "t", b"%d" % i)
    frames = out(seq, 1)
    relays = [h for h, _ in frames if h[0] == "m"]
    assert [h[2] for h in relays] == list(range(1, 101))
    assert len(frames) == 1 + 100 + 100


def test_leave_and_disconnect_stop_the_relays() -> None:
    seq, _ = make()
    seq.connect(1)
    seq.connect(2)
    seq.handle(1, ["join", 1, "t"], b"")
    seq.handle(2, ["join", 1, "t"], b"")
    seq.handle(1, ["leave", "t"], b"")
    seq.disconnect(2)
    out(seq, 1)
    pub(seq, 1, 2, "t")
    assert out(seq, 1) == [(["ok", 2, 1], b"")]
    assert seq.joined("t") == frozenset()
    assert seq.connected() == [1]
    # A restarted worker starts afresh: joined to nothing, greeted again.
    seq.connect(2)
    assert out(seq, 2) == [(["hello", "e1", 2], b"")]


def test_fetch_returns_the_unbroken_run_after_an_offset() -> None:
    seq, _ = make(Config(history_size=5))
    seq.connect(1)
    out(seq, 1)
    for i in range(1, 9):
        pub(seq, 1, i, "t", b"%d" % i)
    out(seq, 1)
    assert seq.fetch("t", 5) == ([(6, encode_publication("t", 6, 6)), (7, encode_publication("t", 7, 7)),
                                  (8, encode_publication("t", 8, 8))], 8)
    assert seq.fetch("t", 5, limit=1) == ([(6, encode_publication("t", 6, 6))], 6)
    assert seq.fetch("t", 8) == ([], 8)
    assert seq.fetch("t", 9) == ([], 9)
    # Offsets 1-3 fell out of the ring of 5: the run after 1 is broken at once.
    assert seq.fetch("t", 1) == ([], 1)
    assert seq.fetch("t", 2)[1] == 2
    assert seq.fetch("t", 3)[1] == 8
    # On the wire: the lengths in the header, the payloads back to back.
    seq.handle(1, ["fetch", 20, "t", 6, None], b"")
    ((header, payload),) = out(seq, 1)
    assert header == ["ok", 20, 8, [len(encode_publication("t", 7, 7)), len(encode_publication("t", 8, 8))]]
    assert payload == encode_publication("t", 7, 7) + encode_publication("t", 8, 8)


def test_fetch_honours_the_ttl_and_the_rules_and_stops_at_the_byte_cap() -> None:
    config = Config(history_size=100, history_ttl=10.0,
                    history_rules=[HistoryRule("none.*", 0, 10.0), HistoryRule("short.*", 2, 60.0)])
    seq, clock = make(config, max_fetch_bytes=100)
    seq.connect(1)
    for topic in ("t", "none.x", "short.x"):
        for i in range(4):
            pub(seq, 1, i, topic, b"%d" % i)
    assert seq.fetch("none.x", 0) == ([], 0)
    assert seq.history.position("none.x") == 4  # offsets go on without history
    assert [off for off, _ in seq.fetch("short.x", 2)[0]] == [3, 4]
    assert seq.fetch("short.x", 1) == ([], 1)
    # Each publication is ~45 bytes: the cap of 100 stops the run after two.
    assert seq.fetch("t", 0)[1] == 2
    clock.now += 11
    assert seq.fetch("t", 0) == ([], 0)


def test_head_sync_and_a_bad_request_are_answered_in_order() -> None:
    seq, _ = make()
    seq.connect(1)
    out(seq, 1)
    pub(seq, 1, 1, "t")
    seq.handle(1, ["head", 2, "t"], b"")
    seq.handle(1, ["head", 3, "never"], b"")
    seq.handle(1, ["sync", 4], b"")
    seq.handle(1, ["dance", 5], b"")
    seq.handle(1, ["pub", 6, 42], b"1")
    frames = [h for h, _ in out(seq, 1)]
    assert frames[:4] == [["ok", 1, 1], ["ok", 2, 1], ["ok", 3, 0], ["ok", 4, 0]]
    assert frames[4][:2] == ["err", 5] and "unknown request" in frames[4][2]
    assert frames[5][:2] == ["err", 6] and "topic" in frames[5][2]


def test_closed_it_refuses_publications_and_still_answers_the_rest() -> None:
    seq, _ = make()
    seq.connect(1)
    seq.handle(1, ["join", 1, "t"], b"")
    pub(seq, 1, 2, "t")
    seq.close()
    pub(seq, 1, 3, "t")
    seq.handle(1, ["sync", 4], b"")
    frames = [h for h, _ in out(seq, 1)][1:]
    assert frames == [["ok", 1, 0], ["m", "t", 1], ["ok", 2, 1], ["err", 3, "the server is draining"],
                      ["ok", 4, 0]]


def test_a_worker_far_behind_makes_publishing_to_its_topics_refuse() -> None:
    seq, _ = make(max_outbox=1000)
    seq.connect(1)
    seq.connect(2)
    seq.handle(2, ["join", 1, "t"], b"")
    big = b'"' + b"x" * 600 + b'"'
    pub(seq, 1, 1, "t", big)
    pub(seq, 1, 2, "t", big)  # worker 2's outbox is now over 1000 bytes
    pub(seq, 1, 3, "t", big)
    pub(seq, 1, 4, "elsewhere", big)
    replies = [h for h, _ in out(seq, 1)][1:]
    assert replies[:2] == [["ok", 1, 1], ["ok", 2, 2]]
    assert replies[2][:2] == ["err", 3] and replies[2][2].startswith("overloaded: worker 2 is")
    assert replies[3] == ["ok", 4, 1]
    out(seq, 2)  # it caught up
    pub(seq, 1, 5, "t", big)
    assert [h for h, _ in out(seq, 1)] == [["ok", 5, 3]]


@pytest.mark.parametrize("request_", [["pub"], ["fetch", 1, "t", "x", None], ["join", 1, ""]])
def test_malformed_requests_never_raise(request_: list[Any]) -> None:
    seq, _ = make()
    seq.connect(1)
    out(seq, 1)
    seq.handle(1, request_, b"")
    ((header, _),) = out(seq, 1)
    assert header[0] == "err"


def test_frames_for_a_gone_worker_are_dropped() -> None:
    seq, _ = make()
    seq.handle(9, ["sync", 1], b"")  # never connected
    assert seq.ready == set() and seq.take(9) == bytearray()
    assert encode_frame(["x"]) != b""


def test_a_control_message_goes_to_every_other_connected_worker() -> None:
    seq, _ = make()
    for w in (1, 2, 3):
        seq.connect(w)
        out(seq, w)
    seq.disconnect(3)
    seq.handle(1, ["ctl", 7], b'{"q":"x"}')
    assert out(seq, 1) == [(["ok", 7, 1], b"")]  # one other worker reached
    assert out(seq, 2) == [(["ctl"], b'{"q":"x"}')]
    seq.connect(3)
    assert [h for h, _ in out(seq, 3)] == [["hello", "e1", 3]]  # nothing of what came before
