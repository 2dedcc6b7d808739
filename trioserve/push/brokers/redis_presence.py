"""The Redis broker's presence: every node's members of a topic, and join/leave events between nodes.

Keys per topic T:

- ``ts:{T}:members``: a hash, field = a member's ``conn`` (unique in the
  cluster: ``c12@<node>``), value = the member's JSON plus ``node`` and
  ``expires`` (Unix ms). Each node writes only its own members, and rewrites
  all of them every ``refresh`` seconds with a new expiry ``ttl`` seconds on,
  so a crashed node's members stop counting once their expiry passes. The
  hash itself expires ``ttl`` after the last write, so a topic nobody is in
  leaves nothing behind.
- channel ``ts:ev:T``: ``<node> <event JSON>``, a join or leave event for the
  other nodes' subscribers. A node listens to it (on the broker's pub/sub
  connection) while it has joined T and T has presence events, and ignores
  its own.

``member_joined``/``member_left`` only note the change (a set of dirty
``(topic, conn)`` pairs, a bounded list of events) and wake the writer task,
which sends everything noted as one pipeline per round: hash writes first,
then the events, so a node that gets a join event finds the member in the
hash. Nothing here runs per publication.

``members`` reads the hash and skips this node's entries (the handler adds its
own hub's subscribers) and expired ones. Expired entries it saw are swept by
the writer task: a script deletes each one whose value is still what was read
(a node that came back and refreshed it keeps it), and the node that deleted
it sends its ``leave`` event when the topic has presence events, here and to
the other nodes. So a crashed node's members leave with an event once someone
asks for the topic's presence after their expiry.

The pure parts (keys, entries, expiry filtering, the commands of one round)
are functions, tested without Redis (tests/unit/push/brokers/test_redis_presence.py).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import coredis.exceptions
import orjson
import trio

from ...protocol.messages import encode_presence_event
from .base import BrokerUnavailable

if TYPE_CHECKING:
    from ...config import Config

__all__ = ["EVENT_PREFIX", "MAX_DIRTY", "MAX_EVENTS", "REDIS_ERRORS", "SWEEP_SCRIPT", "Entry",
           "RedisPresence", "decode_entry", "encode_entry", "encode_event", "event_channel",
           "members_key", "new_node_id", "parse_event", "plan_round", "visible_members"]

log = logging.getLogger("trioserve.brokers.redis")

# coredis surfaces a dropped connection (and, at cancellation, its own cleanup)
# as anyio stream errors too; to us all of them mean "reconnect".
REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError, trio.BrokenResourceError,
                anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)

EVENT_PREFIX = "ts:ev:"
#: Changed members remembered between rounds at most; past that, the next round
#: rewrites every member of this node instead (members that left meanwhile then
#: linger until their expiry).
MAX_DIRTY = 100_000
#: Events waiting for the next round at most; more are dropped (and logged).
MAX_EVENTS = 10_000
#: Commands per pipeline, and fields per HSET.
MAX_PIPELINE = 1000
MAX_FIELDS = 500

#: KEYS: the members hash. ARGV: field, value pairs read by ``members``. Deletes
#: each field whose value is unchanged; returns the values it deleted.
SWEEP_SCRIPT = """
local gone = {}
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    gone[#gone + 1] = ARGV[i + 1]
  end
end
return gone
"""

Command = tuple[Any, ...]


def new_node_id() -> str:
    """A short id for this process, unique in the cluster with overwhelming odds."""
    return secrets.token_hex(4)


def members_key(topic: str) -> str:
    return f"ts:{{{topic}}}:members"


def event_channel(topic: str) -> str:
    return f"{EVENT_PREFIX}{topic}"


class Entry(NamedTuple):
    """One decoded value of a members hash."""

    member: dict[str, Any]
    node: str
    #: Unix time in ms after which the member no longer counts.
    expires: int


def encode_entry(member: dict[str, Any], node: str, expires: int) -> bytes:
    return orjson.dumps({**member, "node": node, "expires": expires})


def decode_entry(value: bytes) -> Entry | None:
    """The entry, or None if *value* is not one of ours."""
    try:
        member = orjson.loads(value)
        node = member.pop("node")
        expires = member.pop("expires")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(node, str) or not isinstance(expires, int) or isinstance(expires, bool):
        return None
    return Entry(member, node, expires)


def visible_members(entries: dict[bytes, bytes], node: str, now: int
                    ) -> tuple[list[dict[str, Any]], list[tuple[bytes, bytes]]]:
    """From a members hash read at *now* (Unix ms): the other nodes' live members,
    and the expired entries of other nodes (field, value) to sweep. This node's
    own entries are skipped (its hub lists them), as are values not of ours."""
    live: list[dict[str, Any]] = []
    expired: list[tuple[bytes, bytes]] = []
    for field, value in entries.items():
        entry = decode_entry(value)
        if entry is None or entry.node == node:
            continue
        if entry.expires <= now:
            expired.append((field, value))
        else:
            live.append(entry.member)
    return live, expired


def encode_event(node: str, event: bytes) -> bytes:
    return node.encode() + b" " + event


def parse_event(channel: bytes, data: bytes, node: str) -> tuple[str, bytes] | None:
    """``(topic, event)`` of another node's event, or None: not a presence
    channel, not of ours, or this node's own."""
    if not channel.startswith(b"ts:ev:"):
        return None
    sender, sep, event = data.partition(b" ")
    if not sep or not event or sender == node.encode():
        return None
    return channel[len(EVENT_PREFIX):].decode(errors="replace"), event


def plan_round(local: dict[str, dict[str, dict[str, Any]]], dirty: Iterable[tuple[str, str]],
               events: list[tuple[str, bytes]], *, full: bool, node: str, now: int, ttl: float
               ) -> list[Command]:
    """The commands of one round, hash writes before events: ``("hset", key,
    {field: value})``, ``("hdel", key, [fields])``, ``("expire", key, seconds)``,
    ``("publish", channel, data)``. *full* rewrites every member in *local*
    (topic → conn → member); otherwise only the *dirty* ones, and a dirty
    member no longer in *local* is deleted."""
    expires = now + int(ttl * 1000)
    writes: dict[str, list[str]] = {}
    deletes: dict[str, list[str]] = {}
    for topic, conn in dirty:
        (writes if conn in local.get(topic, ()) else deletes).setdefault(topic, []).append(conn)
    if full:
        writes = {topic: list(members) for topic, members in local.items()}
    commands: list[Command] = []
    for topic, conns in writes.items():
        key = members_key(topic)
        members = local[topic]
        for start in range(0, len(conns), MAX_FIELDS):
            chunk = conns[start:start + MAX_FIELDS]
            commands.append(("hset", key, {c: encode_entry(members[c], node, expires) for c in chunk}))
        commands.append(("expire", key, math.ceil(ttl)))
    for topic, conns in deletes.items():
        commands.append(("hdel", members_key(topic), conns))
    for topic, event in events:
        commands.append(("publish", event_channel(topic), encode_event(node, event)))
    return commands


class RedisPresence:
    """This node's members in Redis, written by :meth:`run`; the others' read by :meth:`members`."""

    def __init__(self, client: coredis.Redis[bytes], config: Config,
                 send_event: Callable[[str, bytes], None], *, refresh: float = 10.0,
                 ttl: float = 30.0) -> None:
        self.node = new_node_id()
        self.config = config
        self.refresh = refresh
        self.ttl = ttl
        self._client = client
        self._send_event = send_event
        self._sweep_script = client.register_script(SWEEP_SCRIPT)
        # topic → conn → member, this node's members (what a full round rewrites).
        self._local: dict[str, dict[str, dict[str, Any]]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._events: list[tuple[str, bytes]] = []
        self._dropped = 0
        self._sweeps: list[tuple[str, list[tuple[bytes, bytes]]]] = []
        self._rewrite = False
        self._wake = trio.lowlevel.ParkingLot()
        self._failing = False

    # --- the seam (synchronous: note and return) -------------------------------------

    def joined(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        conn = member["conn"]
        self._local.setdefault(topic, {})[conn] = member
        self._changed(topic, conn, event)

    def left(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        conn = member["conn"]
        members = self._local.get(topic)
        if members is not None:
            members.pop(conn, None)
            if not members:
                del self._local[topic]
        self._changed(topic, conn, event)

    def _changed(self, topic: str, conn: str, event: bytes | None) -> None:
        if len(self._dirty) < MAX_DIRTY:
            self._dirty.add((topic, conn))
        else:  # a full rewrite covers the joins; the leaves linger until they expire
            self._rewrite = True
        if event is not None:
            self._add_event(topic, event)
        self._wake.unpark_all()

    def _add_event(self, topic: str, event: bytes) -> None:
        if len(self._events) < MAX_EVENTS:
            self._events.append((topic, event))
        else:
            self._dropped += 1

    def rewrite(self) -> None:
        """Rewrite every member next round (Redis may have lost them: it came back)."""
        self._rewrite = True
        self._wake.unpark_all()

    def listens(self, topic: str) -> bool:
        """Whether this node subscribes to *topic*'s event channel when it joins it."""
        return self.config.presence_events_for(topic)

    def deliver(self, channel: bytes, data: bytes) -> None:
        """A pub/sub message that is not a publication: if it is another node's
        event, hand it to the hub."""
        parsed = parse_event(channel, data, self.node)
        if parsed is not None:
            self._send_event(*parsed)

    async def members(self, topic: str) -> list[dict[str, Any]]:
        try:
            entries = await self._client.hgetall(members_key(topic))
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None
        live, expired = visible_members(entries, self.node, int(time.time() * 1000))
        if expired:
            self._sweeps.append((topic, expired))
            self._wake.unpark_all()
        return live

    # --- the writer --------------------------------------------------------------------

    async def run(self) -> None:
        """Write what changed, one pipeline per round, and everything every
        ``refresh`` seconds; runs until cancelled."""
        next_full = trio.current_time()
        while True:
            with trio.move_on_at(next_full):
                while not (self._dirty or self._events or self._sweeps or self._rewrite):
                    await self._wake.park()
            full = self._rewrite or trio.current_time() >= next_full
            if full:
                next_full = trio.current_time() + self.refresh
            if not await self._round(full):
                self._rewrite = True
                await trio.sleep(min(1.0, self.refresh))

    async def _round(self, full: bool) -> bool:
        dirty, self._dirty = self._dirty, set()
        events, self._events = self._events, []
        sweeps, self._sweeps = self._sweeps, []
        self._rewrite = False
        if self._dropped:
            log.warning("presence: dropped %d join/leave events (over %d waiting for redis)",
                        self._dropped, MAX_EVENTS)
            self._dropped = 0
        commands = plan_round(self._local, () if full else dirty, events, full=full,
                              node=self.node, now=int(time.time() * 1000), ttl=self.ttl)
        if full:  # members that left still need deleting
            commands[:0] = [("hdel", members_key(t), [c]) for t, c in dirty
                            if c not in self._local.get(t, ())]
        try:
            for start in range(0, len(commands), MAX_PIPELINE):
                await self._send(commands[start:start + MAX_PIPELINE])
            for topic, expired in sweeps:
                await self._sweep(topic, expired)
        except REDIS_ERRORS as exc:
            if not self._failing:  # once per outage: the broker logs its retries
                log.warning("presence: redis unavailable (%s); rewriting every member on recovery", exc)
            self._failing = True
            self._dirty |= dirty  # members that left are deleted then too
            return False
        self._failing = False
        return True

    async def _send(self, commands: list[Command]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for name, key, arg in commands:
                if name == "hset":
                    pipe.hset(key, arg)
                elif name == "hdel":
                    pipe.hdel(key, arg)
                elif name == "expire":
                    pipe.expire(key, arg)
                else:
                    pipe.publish(key, arg)

    async def _sweep(self, topic: str, expired: list[tuple[bytes, bytes]]) -> None:
        """Delete *topic*'s expired entries still unchanged; send a leave event
        for each one this node deleted, when the topic has presence events."""
        args = [part for pair in expired for part in pair]
        gone: list[Any] = await self._sweep_script(keys=[members_key(topic)], args=args)
        if not gone or not self.config.presence_events_for(topic):
            return
        for value in gone:
            entry = decode_entry(value if isinstance(value, bytes) else str(value).encode())
            if entry is not None:
                event = encode_presence_event("leave", topic, entry.member)
                self._send_event(topic, event)
                self._add_event(topic, event)
        self._wake.unpark_all()
