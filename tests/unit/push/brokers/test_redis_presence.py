"""The Redis broker's presence, its pure parts (trioserve/push/brokers/redis_presence.py),
with no Redis: entries, liveness filtering, events and the commands of one round."""

from __future__ import annotations

import sys
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
    node_key,
    parse_event,
    plan_round,
    visible_members,
)

ALICE = {"client": "alice", "conn": "c1@aa", "transport": "websocket"}
BOB = {"client": "bob", "conn": "c2@bb", "transport": "tcp"}


def test_keys_and_channels() -> None:
    assert members_key("room.1") == "ts:{room.1}:members"
    assert node_key("ab12cd34") == "ts:node:ab12cd34"
    assert event_channel("room.1") == "ts:ev:room.1"


def test_node_ids_are_short_and_distinct() -> None:
    ids = {new_node_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 8 and i.isalnum() for i in ids)


def test_an_entry_round_trips_and_is_exact_size() -> None:
    value = encode_entry(ALICE, "aa")
    assert orjson.loads(value) == {**ALICE, "node": "aa"}
    assert decode_entry(value) == Entry(ALICE, "aa")
    # Kept per member: not orjson's ~4 KB buffer (sys.getsizeof counts the allocation).
    assert sys.getsizeof(value) < len(value) + 64


@pytest.mark.parametrize("value", [b"", b"not json", b"[1]", b'{"conn":"c1"}', b'{"node":1}',
                                   b'{"node":null}'])
def test_a_value_not_of_ours_is_none(value: bytes) -> None:
    assert decode_entry(value) is None


def test_visible_members_keep_live_nodes_and_sweep_dead_ones() -> None:
    entries = {
        b"c1@aa": encode_entry(ALICE, "aa"),  # this node's: its hub lists it
        b"c2@bb": encode_entry(BOB, "bb"),  # a live node
        b"c3@cc": encode_entry({**BOB, "conn": "c3@cc"}, "cc"),  # a dead node
        b"junk": b"written by someone else",
    }
    # First pass: which nodes to ask about; nothing is swept before asking.
    assert visible_members(entries, "aa", None) == ([BOB, {**BOB, "conn": "c3@cc"}], [], {"bb", "cc"})
    live, dead, nodes = visible_members(entries, "aa", {"bb"})
    assert live == [BOB] and nodes == {"bb", "cc"}
    assert dead == [(b"c3@cc", entries[b"c3@cc"])]
    # This node's own entries are never swept by it, dead or not: it writes them again.
    assert visible_members({b"c1@aa": entries[b"c1@aa"]}, "aa", set()) == ([], [], set())


def test_events_carry_the_node_and_a_node_ignores_its_own() -> None:
    event = b'{"op":"join","topic":"t","client":{}}'
    data = encode_event("aa", event)
    assert data == b"aa " + event
    assert parse_event(b"ts:ev:t", data, "bb") == ("aa", "t", event)
    assert parse_event(b"ts:ev:t", data, "aa") is None
    assert parse_event(b"ts:pub:t", data, "bb") is None
    assert parse_event(b"ts:ev:t", b"nospace", "bb") is None
    assert parse_event(b"ts:ev:t", b"aa ", "bb") is None


def test_a_round_writes_the_dirty_members_then_the_events() -> None:
    local = {"t": {"c1@aa": encode_entry(ALICE, "aa")}}
    dirty = [("t", "c1@aa"), ("t", "c9@aa"), ("u", "c1@aa")]
    commands = plan_round(local, dirty, [("t", b"{}")], full=False, renew=False, node="aa", ttl=2.5)
    assert commands == [
        ("hset", "ts:{t}:members", {"c1@aa": local["t"]["c1@aa"]}),
        ("expire", "ts:{t}:members", 3),
        ("hdel", "ts:{t}:members", ["c9@aa"]),
        ("hdel", "ts:{u}:members", ["c1@aa"]),
        ("publish", "ts:ev:t", b"aa {}"),
    ]


def test_a_refresh_renews_each_topic_and_writes_no_member() -> None:
    members = {f"c{i}@aa": encode_entry({**ALICE, "conn": f"c{i}@aa"}, "aa") for i in range(1000)}
    local = {"t": members, "u": {"c1@aa": encode_entry(ALICE, "aa")}}
    # One command per topic, whatever the members: the cost a refresh adds.
    assert plan_round(local, [], [], full=False, renew=True, node="aa", ttl=30) == [
        ("expire", "ts:{t}:members", 30), ("expire", "ts:{u}:members", 30)]


def test_a_full_round_rewrites_every_member_in_chunks() -> None:
    members = {f"c{i}@aa": encode_entry({**ALICE, "conn": f"c{i}@aa"}, "aa") for i in range(MAX_FIELDS + 1)}
    local = {"t": members, "u": {"c1@aa": encode_entry(ALICE, "aa")}}
    commands = plan_round(local, [], [], full=True, renew=False, node="aa", ttl=30)
    assert [(c[0], c[1], len(c[2]) if c[0] == "hset" else c[2]) for c in commands] == [
        ("hset", "ts:{t}:members", MAX_FIELDS), ("hset", "ts:{t}:members", 1),
        ("expire", "ts:{t}:members", 30),
        ("hset", "ts:{u}:members", 1), ("expire", "ts:{u}:members", 30),
    ]
    assert commands[0][2]["c0@aa"] is members["c0@aa"]  # written as kept, not encoded again


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
    assert p._local == {"room.1": {member["conn"]: encode_entry(member, p.node)}}
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
