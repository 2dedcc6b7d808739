"""The sequencer's presence: members per worker, relayed join/leave events, and a
gone worker's members dropped. Requests in, frames out, no sockets."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from trioserve.protocol.messages import encode_presence_event
from trioserve.push.brokers.sequencer import Sequencer

from .test_sequencer import make, out


def member(conn: str, client: str = "alice") -> dict[str, Any]:
    return {"client": client, "conn": conn, "transport": "websocket"}


def event(op: str, topic: str, m: dict[str, Any]) -> bytes:
    return encode_presence_event(op, topic, m)


def three() -> Sequencer:
    """Workers 1, 2 and 3 connected, 1 and 2 joined to "room", all outboxes read."""
    seq, _ = make()
    for w in (1, 2, 3):
        seq.connect(w)
    seq.handle(1, ["join", 1, "room"], b"")
    seq.handle(2, ["join", 1, "room"], b"")
    for w in (1, 2, 3):
        out(seq, w)
    return seq


def members_of(seq: Sequencer, worker: int, topic: str, request_id: int = 9) -> list[dict[str, Any]]:
    seq.handle(worker, ["members", request_id, topic], b"")
    ((header, payload),) = out(seq, worker)
    members: list[dict[str, Any]] = orjson.loads(payload)
    assert header == ["ok", request_id, len(members)]
    return members


def test_members_answer_with_the_other_workers_members() -> None:
    seq = three()
    a, b, c = member("c1@w1"), member("c1@w2", "bob"), member("c2@w2", "carol")
    seq.handle(1, ["mjoin", "room", a], b"")
    seq.handle(2, ["mjoin", "room", b], b"")
    seq.handle(2, ["mjoin", "room", c], b"")
    seq.handle(3, ["mjoin", "other", member("c5@w3")], b"")
    # No events configured (empty payloads): nothing is relayed.
    assert seq.ready == set()
    assert members_of(seq, 1, "room") == [b, c]
    assert members_of(seq, 2, "room") == [a]
    assert members_of(seq, 3, "room") == [a, b, c]  # a worker that did not join may ask too
    assert members_of(seq, 1, "nobody") == []
    seq.handle(2, ["mleave", "room", "c1@w2"], b"")
    seq.handle(2, ["mleave", "room", "c9@w2"], b"")  # not a member: ignored
    assert members_of(seq, 1, "room") == [c]
    assert seq.members("room") == [a, c]


def test_events_go_to_the_other_workers_that_joined_the_topic_only() -> None:
    seq = three()
    b = member("c1@w2", "bob")
    joined = event("join", "room", b)
    seq.handle(2, ["mjoin", "room", b], joined)
    assert seq.ready == {1}  # not 2 (its hub sent it), not 3 (not joined)
    assert out(seq, 1) == [(["ev", "room"], joined)]
    left = event("leave", "room", b)
    seq.handle(2, ["mleave", "room", "c1@w2"], left)
    assert out(seq, 1) == [(["ev", "room"], left)]
    assert out(seq, 2) == [] and out(seq, 3) == []


def test_a_gone_worker_s_members_leave_with_events_where_the_topic_has_them() -> None:
    seq = three()
    loud, quiet = member("c1@w2", "bob"), member("c2@w2", "carol")
    seq.handle(2, ["mjoin", "room", loud], event("join", "room", loud))
    seq.handle(2, ["mjoin", "quiet", quiet], b"")
    seq.handle(1, ["join", 2, "quiet"], b"")
    out(seq, 1)
    seq.disconnect(2)
    # Worker 1 joined both topics; only "room" has events.
    assert out(seq, 1) == [(["ev", "room"], event("leave", "room", loud))]
    assert members_of(seq, 1, "room") == [] and members_of(seq, 1, "quiet") == []
    seq.handle(1, ["mjoin", "room", member("c1@w1")], b"")
    seq.connect(2)  # a restarted worker 2 starts with no members
    assert members_of(seq, 1, "room", 10) == []
    seq.handle(3, ["join", 1, "room"], b"")
    out(seq, 3)
    seq.disconnect(2)
    seq.disconnect(1)  # its member's topic has no events (it sent none)
    assert out(seq, 3) == []


def test_a_disconnect_relays_the_leave_event_a_single_process_would_send() -> None:
    seq = three()
    loud = member("c1@w2", "bob")
    seq.handle(2, ["mjoin", "room", loud], event("join", "room", loud))
    out(seq, 1)
    seq.disconnect(2)
    assert out(seq, 1) == [(["ev", "room"], event("leave", "room", loud))]
    assert orjson.loads(event("leave", "room", loud)) == {"op": "leave", "topic": "room", "client": loud}


def test_a_replaced_connection_s_members_leave_too() -> None:
    seq = three()
    loud = member("c1@w2", "bob")
    seq.handle(2, ["mjoin", "room", loud], event("join", "room", loud))
    out(seq, 1)
    seq.connect(2)
    assert out(seq, 1) == [(["ev", "room"], event("leave", "room", loud))]


@pytest.mark.parametrize("request_", [["mjoin", "room", "c1"], ["mjoin", "room", {"client": "a"}],
                                      ["mleave", "room", 3], ["mjoin", "", member("c1")],
                                      ["members", 1, 7], ["mleave"]])
def test_malformed_presence_requests_are_answered_and_change_nothing(request_: list[Any]) -> None:
    seq = three()
    seq.handle(1, request_, b"")
    ((header, _),) = out(seq, 1)
    assert header[0] == "err"
    assert members_of(seq, 2, "room") == []
