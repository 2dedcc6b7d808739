"""The Redis broker's presence, its pure parts (trioserve/push/brokers/redis_presence.py),
with no Redis: entries, expiry filtering, events and the commands of one round."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from trioserve.push.brokers.redis_presence import (
    MAX_DIRTY,
    MAX_EVENTS,
    MAX_FIELDS,
    Entry,
    RedisPresence,
    decode_entry,
    encode_entry,
    encode_event,
    event_channel,
    members_key,
    new_node_id,
    parse_event,
    plan_round,
    visible_members,
)

ALICE = {"client": "alice", "conn": "c1@aa", "transport": "websocket"}
BOB = {"client": "bob", "conn": "c2@bb", "transport": "tcp"}


def test_keys_and_channels() -> None:
    assert members_key("room.1") == "ts:{room.1}:members"
    assert event_channel("room.1") == "ts:ev:room.1"


def test_node_ids_are_short_and_distinct() -> None:
    ids = {new_node_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 8 and i.isalnum() for i in ids)


def test_an_entry_round_trips() -> None:
    value = encode_entry(ALICE, "aa", 1234)
    assert orjson.loads(value) == {**ALICE, "node": "aa", "expires": 1234}
    assert decode_entry(value) == Entry(ALICE, "aa", 1234)


@pytest.mark.parametrize("value", [b"", b"not json", b"[1]", b'{"node":"aa"}', b'{"expires":1}',
                                   b'{"node":1,"expires":1}', b'{"node":"aa","expires":"1"}',
                                   b'{"node":"aa","expires":true}'])
def test_a_value_not_of_ours_is_none(value: bytes) -> None:
    assert decode_entry(value) is None


def test_visible_members_skip_this_nodes_own_expired_and_foreign_entries() -> None:
    entries = {
        b"c1@aa": encode_entry(ALICE, "aa", 2000),  # this node's: its hub lists it
        b"c2@bb": encode_entry(BOB, "bb", 2000),  # live
        b"c3@bb": encode_entry({**BOB, "conn": "c3@bb"}, "bb", 1000),  # expired at now
        b"c4@cc": encode_entry({**BOB, "conn": "c4@cc"}, "cc", 999),  # expired
        b"junk": b"written by someone else",
    }
    live, expired = visible_members(entries, "aa", now=1000)
    assert live == [BOB]
    assert expired == [(b"c3@bb", entries[b"c3@bb"]), (b"c4@cc", entries[b"c4@cc"])]
    # This node's own expired entries are never swept by it: its next round rewrites them.
    assert visible_members({b"c1@aa": encode_entry(ALICE, "aa", 1)}, "aa", now=1000) == ([], [])


def test_events_carry_the_node_and_a_node_ignores_its_own() -> None:
    event = b'{"op":"join","topic":"t","client":{}}'
    data = encode_event("aa", event)
    assert data == b"aa " + event
    assert parse_event(b"ts:ev:t", data, "bb") == ("t", event)
    assert parse_event(b"ts:ev:t", data, "aa") is None
    assert parse_event(b"ts:pub:t", data, "bb") is None
    assert parse_event(b"ts:ev:t", b"nospace", "bb") is None
    assert parse_event(b"ts:ev:t", b"aa ", "bb") is None


def test_a_round_writes_the_dirty_members_then_the_events() -> None:
    local = {"t": {"c1@aa": ALICE}}
    dirty = [("t", "c1@aa"), ("t", "c9@aa"), ("u", "c1@aa")]
    commands = plan_round(local, dirty, [("t", b"{}")], full=False, node="aa", now=1000, ttl=2.5)
    assert commands == [
        ("hset", "ts:{t}:members", {"c1@aa": encode_entry(ALICE, "aa", 3500)}),
        ("expire", "ts:{t}:members", 3),
        ("hdel", "ts:{t}:members", ["c9@aa"]),
        ("hdel", "ts:{u}:members", ["c1@aa"]),
        ("publish", "ts:ev:t", b"aa {}"),
    ]


def test_a_full_round_rewrites_every_member_in_chunks() -> None:
    members = {f"c{i}@aa": {**ALICE, "conn": f"c{i}@aa"} for i in range(MAX_FIELDS + 1)}
    commands = plan_round({"t": members, "u": {"c1@aa": ALICE}}, [], [], full=True, node="aa",
                          now=0, ttl=30)
    assert [(c[0], c[1], len(c[2]) if c[0] == "hset" else c[2]) for c in commands] == [
        ("hset", "ts:{t}:members", MAX_FIELDS), ("hset", "ts:{t}:members", 1),
        ("expire", "ts:{t}:members", 30),
        ("hset", "ts:{u}:members", 1), ("expire", "ts:{u}:members", 30),
    ]


class FakeClient:
    def register_script(self, script: str) -> Any:
        return None


class FakeConfig:
    def presence_events_for(self, topic: str) -> bool:
        return topic.startswith("room.")


def presence() -> RedisPresence:
    return RedisPresence(FakeClient(), FakeConfig(), lambda t, e: None)  # type: ignore[arg-type]


def test_joins_and_leaves_are_noted_not_sent() -> None:
    p = presence()
    member = {**ALICE, "conn": f"c1@{p.node}"}
    p.joined("room.1", member, b"join")
    assert p._local == {"room.1": {member["conn"]: member}}
    p.left("room.1", member, b"leave")
    assert p._local == {}
    assert p._dirty == {("room.1", member["conn"])}
    assert p._events == [("room.1", b"join"), ("room.1", b"leave")]
    assert p.listens("room.1") and not p.listens("plain")


def test_the_waiting_work_is_bounded() -> None:
    p = presence()
    for i in range(MAX_EVENTS + 5):
        p.joined("room.1", {**ALICE, "conn": f"c{i}"}, b"e")
    assert len(p._events) == MAX_EVENTS and p._dropped == 5
    p._dirty = {("t", str(i)) for i in range(MAX_DIRTY)}
    p.left("t", {**ALICE, "conn": "x"}, None)
    assert len(p._dirty) == MAX_DIRTY and p._rewrite  # the next round rewrites everything
