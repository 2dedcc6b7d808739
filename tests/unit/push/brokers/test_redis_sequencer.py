"""The Redis broker's pure bookkeeping (trioserve/push/brokers/redis_sequencer.py),
with no Redis and no trio: which publications a node hands to its hub, which it
holds, and when it must fetch a gap or give up on an epoch."""

from __future__ import annotations

import pytest

from trioserve.push.brokers.redis_sequencer import Message, Sequencer, Verdict, parse_message


def msg(offset: int, topic: str = "t", epoch: str = "e1") -> Message:
    return Message(topic, epoch, offset, b'{"offset":%d}' % offset)


def joined(topic: str = "t", epoch: str = "e1", position: int = 0) -> Sequencer:
    seq = Sequencer()
    seq.start_joining(topic)
    assert seq.start(topic, epoch, position) == []
    return seq


def test_parse_message_splits_epoch_offset_and_payload() -> None:
    m = parse_message(b"ts:pub:room.1", b'abc 42 {"op":"pub","data":"a b c"}')
    assert m == Message("room.1", "abc", 42, b'{"op":"pub","data":"a b c"}')
    assert parse_message(b"ts:node:1f2e", b"whatever") is None


@pytest.mark.parametrize("data", [b"no-spaces", b"epoch notanumber {}", b"\xff 1 {}", b""])
def test_a_message_that_is_not_ours_is_skipped(data: bytes) -> None:
    # Anyone can PUBLISH to a topic's channel: that must not stop the node.
    assert parse_message(b"ts:pub:t", data) is None


def test_a_run_in_order_is_handed_over_one_after_another() -> None:
    seq = joined(position=4)
    for offset in (5, 6, 7):
        assert seq.check(msg(offset)) is Verdict.NEXT
        seq.handed_over("t", offset)
    assert seq.last("t") == 7


def test_what_was_handed_over_already_is_ignored() -> None:
    seq = joined(position=4)
    assert seq.check(msg(4)) is Verdict.IGNORE
    assert seq.check(msg(1)) is Verdict.IGNORE


def test_a_jump_is_a_gap_to_fetch_and_the_range_is_known() -> None:
    seq = joined(position=4)
    assert seq.check(msg(9)) is Verdict.GAP
    assert seq.last("t") == 4  # fetch (4, 8], then 9 is NEXT
    for offset in range(5, 9):
        seq.handed_over("t", offset)
    assert seq.check(msg(9)) is Verdict.NEXT


def test_another_epoch_is_a_loss_and_reset_starts_over() -> None:
    seq = joined(position=4)
    assert seq.check(msg(1, epoch="e2")) is Verdict.EPOCH
    seq.reset("t", "e2", 0)
    assert seq.epoch("t") == "e2" and seq.check(msg(1, epoch="e2")) is Verdict.NEXT
    assert seq.check(msg(5, epoch="e1")) is Verdict.EPOCH  # the old epoch is not followed any more


def test_topics_not_joined_are_ignored_and_topics_are_independent() -> None:
    seq = joined("a", position=2)
    assert seq.check(msg(1, topic="b")) is Verdict.IGNORE
    assert seq.check(msg(3, topic="a")) is Verdict.NEXT
    assert not seq.is_known("b") and seq.is_joined("a") and seq.joined() == ["a"]


def test_while_joining_publications_are_held_and_those_after_the_position_replayed() -> None:
    seq = Sequencer()
    seq.start_joining("t")
    assert seq.is_known("t") and not seq.is_joined("t") and seq.joined() == []
    for offset in (3, 4, 5):  # arrived between SUBSCRIBE and reading the position
        assert seq.check(msg(offset)) is Verdict.HOLD
    held = seq.start("t", "e1", 4)
    assert held == [msg(5)]  # 3 and 4 are in the position already
    assert seq.check(held[0]) is Verdict.NEXT


def test_held_publications_of_another_epoch_are_kept_for_the_caller_to_judge() -> None:
    seq = Sequencer()
    seq.start_joining("t")
    seq.check(msg(1, epoch="old"))
    held = seq.start("t", "new", 0)
    assert held == [msg(1, epoch="old")] and seq.check(held[0]) is Verdict.EPOCH


def test_abandon_forgets_a_topic() -> None:
    seq = joined(position=3)
    seq.published("t", 9)
    seq.abandon("t")
    assert not seq.is_known("t") and seq.epoch("t") == "" and not seq.behind()
    assert seq.check(msg(4)) is Verdict.IGNORE


@pytest.mark.parametrize(("epoch", "position", "verdict"), [
    ("e1", 4, Verdict.IGNORE),   # nothing missed
    ("e1", 3, Verdict.IGNORE),   # Redis is behind what we have: nothing to fetch
    ("e1", 7, Verdict.GAP),      # missed 5..7 while disconnected
    ("e2", 7, Verdict.EPOCH),    # Redis lost its data meanwhile
])
def test_catch_up_after_a_reconnect(epoch: str, position: int, verdict: Verdict) -> None:
    assert joined(position=4).catch_up("t", epoch, position) is verdict


def test_catch_up_ignores_topics_that_are_joining_or_unknown() -> None:
    seq = Sequencer()
    seq.start_joining("t")
    assert seq.catch_up("t", "e1", 9) is Verdict.IGNORE
    assert seq.catch_up("other", "e1", 9) is Verdict.IGNORE


def test_behind_until_this_nodes_own_publications_came_back() -> None:
    seq = joined(position=0)
    seq.published("t", 2)
    assert seq.behind()
    seq.handed_over("t", 1)
    assert seq.behind()
    seq.handed_over("t", 2)
    assert not seq.behind()


def test_publications_to_topics_without_local_subscribers_are_not_waited_for() -> None:
    seq = Sequencer()
    seq.published("elsewhere", 5)
    assert not seq.behind()


def test_a_join_that_reads_a_position_past_our_publications_is_not_behind() -> None:
    seq = Sequencer()
    seq.start_joining("t")
    seq.published("t", 3)
    assert not seq.behind()  # joining: nobody here waits yet
    seq.start("t", "e1", 5)
    assert not seq.behind()


def test_a_loss_settles_what_we_waited_for() -> None:
    seq = joined(position=0)
    seq.published("t", 3)
    seq.reset("t", "e1", 3)  # 1..3 given up
    assert not seq.behind()
