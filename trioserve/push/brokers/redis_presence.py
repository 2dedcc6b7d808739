"""The Redis broker's presence: every node's members of a topic, and join/leave events between nodes.

Keys:

- ``ts:node:<node>``: this node is alive. Each node sets it every ``refresh``
  seconds with an expiry ``ttl`` on (``SET … PX … GET``), so Redis's own clock
  decides when a crashed node is gone: the nodes' clocks never have to agree.
  The ``GET`` part tells the node when its key had vanished (Redis restarted,
  or the node stalled past ``ttl`` and others swept its members): it then
  writes all its members again.
- ``ts:{T}:members``: a hash per topic, field = a member's ``conn`` (unique in
  the cluster: ``c12@<node>``), value = the member's JSON plus ``node``. A node
  writes an entry once, when its client joins, and deletes it when the client
  leaves. A refresh writes no entries: it only renews the node's key and each
  of its topics' hash expiry (``ttl`` after the last write, so a topic nobody
  is in leaves nothing behind). Refreshing costs a command per topic, not per
  member.
- channel ``ts:ev:T``: ``<node> <event JSON>``, a join or leave event for the
  other nodes' subscribers. A node listens to it (on the broker's pub/sub
  connection) while it has joined T and T has presence events, and ignores
  its own.

``member_joined``/``member_left`` only note the change (a set of dirty
``(topic, conn)`` pairs, a bounded list of events) and wake the writer task,
which sends everything noted as one pipeline per round: hash writes first,
then the events, so a node that gets a join event finds the member in the
hash. Nothing here runs per publication.

``members`` reads the hash, then which of the nodes found there are alive
(one ``MGET``), and skips this node's entries (the handler adds its own hub's
subscribers) and dead nodes' ones. Dead nodes' entries it saw are swept by the
writer task: a script deletes each one whose value is still what was read, and
the node that deleted it sends its ``leave`` event when the topic has presence
events, here and to the other nodes. A node also watches the nodes whose join
events it received: at each renewal it reads their keys (one ``MGET``), and
for one that expired it reads its topics' hashes the same way. So a crashed
node's members leave with an event within ``ttl + refresh`` even if nobody
asks for presence.

Each node keeps its members' encoded entries (topic → conn → bytes, about
200 bytes a member), to write them all again when Redis lost them.

The pure parts (keys, entries, liveness filtering, the commands of one round)
are functions, tested without Redis (tests/unit/push/brokers/test_redis_presence.py).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import coredis.exceptions
import orjson
import trio

from ...protocol.messages import encode_presence_event, kept_json
from .base import BrokerUnavailable

if TYPE_CHECKING:
    from ...config import Config

__all__ = ["EVENT_PREFIX", "MAX_DIRTY", "MAX_EVENTS", "REDIS_ERRORS", "SWEEP_SCRIPT", "Entry",
           "RedisPresence", "decode_entry", "encode_entry", "encode_event", "event_channel",
           "members_key", "new_node_id", "node_key", "parse_event", "plan_round", "visible_members"]

log = logging.getLogger("trioserve.brokers.redis")

# coredis surfaces a dropped connection (and, at cancellation, its own cleanup)
# as anyio stream errors too; to us all of them mean "reconnect".
REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError, trio.BrokenResourceError,
                anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)

EVENT_PREFIX = "ts:ev:"
#: Changed members remembered between rounds at most; past that, the next round
#: rewrites every member of this node instead (members that left meanwhile then
#: linger until their node's key expires).
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


def node_key(node: str) -> str:
    return f"ts:node:{node}"


def event_channel(topic: str) -> str:
    return f"{EVENT_PREFIX}{topic}"


class Entry(NamedTuple):
    """One decoded value of a members hash."""

    member: dict[str, Any]
    node: str


def encode_entry(member: dict[str, Any], node: str) -> bytes:
    return kept_json({**member, "node": node})


def decode_entry(value: bytes) -> Entry | None:
    """The entry, or None if *value* is not one of ours."""
    try:
        member = orjson.loads(value)
        node = member.pop("node")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(node, str):
        return None
    return Entry(member, node)


def visible_members(entries: dict[bytes, bytes], node: str, alive: Collection[str] | None
                    ) -> tuple[list[dict[str, Any]], list[tuple[bytes, bytes]], set[str]]:
    """From a members hash: the live members of other nodes, the entries of dead
    nodes (field, value) to sweep, and the other nodes found. *alive* is the
    set of other nodes whose key exists; None means "not asked yet": every other
    node counts as alive and nothing is swept. This node's own entries are
    skipped (its hub lists them), as are values not of ours."""
    live: list[dict[str, Any]] = []
    dead: list[tuple[bytes, bytes]] = []
    nodes: set[str] = set()
    for field, value in entries.items():
        entry = decode_entry(value)
        if entry is None or entry.node == node:
            continue
        nodes.add(entry.node)
        if alive is None or entry.node in alive:
            live.append(entry.member)
        else:
            dead.append((field, value))
    return live, dead, nodes


def encode_event(node: str, event: bytes) -> bytes:
    return node.encode() + b" " + event


def parse_event(channel: bytes, data: bytes, node: str) -> tuple[str, str, bytes] | None:
    """``(sender, topic, event)`` of another node's event, or None: not a
    presence channel, not of ours, or this node's own."""
    if not channel.startswith(b"ts:ev:"):
        return None
    sender, sep, event = data.partition(b" ")
    if not sep or not event or sender == node.encode():
        return None
    return sender.decode(errors="replace"), channel[len(EVENT_PREFIX):].decode(errors="replace"), event


def plan_round(local: dict[str, dict[str, bytes]], dirty: Iterable[tuple[str, str]],
               events: list[tuple[str, bytes]], *, full: bool, renew: bool, node: str,
               ttl: float) -> list[Command]:
    """The commands of one round, hash writes before events: ``("hset", key,
    {field: value})``, ``("hdel", key, [fields])``, ``("expire", key, seconds)``,
    ``("publish", channel, data)``. *local* is this node's entries (topic →
    conn → encoded entry). *full* writes every one of them; otherwise only the
    *dirty* ones, and a dirty member no longer in *local* is deleted. *renew*
    (the refresh) renews the expiry of every topic in *local*; otherwise only
    of the topics written."""
    writes: dict[str, list[str]] = {}
    deletes: dict[str, list[str]] = {}
    for topic, conn in dirty:
        (writes if conn in local.get(topic, ()) else deletes).setdefault(topic, []).append(conn)
    if full:
        writes = {topic: list(members) for topic, members in local.items()}
    commands: list[Command] = []
    seconds = math.ceil(ttl)
    for topic, conns in writes.items():
        key = members_key(topic)
        members = local[topic]
        for start in range(0, len(conns), MAX_FIELDS):
            commands.append(("hset", key, {c: members[c] for c in conns[start:start + MAX_FIELDS]}))
        if not renew:
            commands.append(("expire", key, seconds))
    if renew:
        commands.extend(("expire", members_key(topic), seconds) for topic in local)
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
        # topic → conn → encoded entry: this node's members, kept encoded (one
        # exact-size bytes each) to write them again when Redis lost them.
        self._local: dict[str, dict[str, bytes]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._events: list[tuple[str, bytes]] = []
        self._dropped = 0
        self._sweeps: list[tuple[str, list[tuple[bytes, bytes]]]] = []
        self._rewrite = False
        self._wake = trio.lowlevel.ParkingLot()
        self._failing = False
        # Other nodes whose join events arrived here → the topics (with events)
        # they were for: at each renewal, a dead one's members there are swept.
        self._peers: dict[str, set[str]] = {}

    # --- the seam (synchronous: note and return) -------------------------------------

    def joined(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        conn = member["conn"]
        self._local.setdefault(topic, {})[conn] = encode_entry(member, self.node)
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
        else:  # a full rewrite covers the joins; the leaves linger until the node's key expires
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
            sender, topic, event = parsed
            self._send_event(topic, event)
            # Watched from now on: if its key expires, this node sweeps its members
            # of *topic* and sends their leave events without waiting for a read.
            self._peers.setdefault(sender, set()).add(topic)

    async def members(self, topic: str) -> list[dict[str, Any]]:
        try:
            entries = await self._client.hgetall(members_key(topic))
            _, _, nodes = visible_members(entries, self.node, None)
            order = sorted(nodes)
            keys = await self._client.mget([node_key(n) for n in order]) if order else ()
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None
        alive = {n for n, value in zip(order, keys, strict=True) if value is not None}
        live, dead, _ = visible_members(entries, self.node, alive)
        if dead:
            self._sweeps.append((topic, dead))
            self._wake.unpark_all()
        return live

    # --- the writer --------------------------------------------------------------------

    async def run(self) -> None:
        """Write what changed, one pipeline per round; renew this node's key and
        its topics' expiry every ``refresh`` seconds. Runs until cancelled."""
        next_renew = trio.current_time()
        while True:
            with trio.move_on_at(next_renew):
                while not (self._dirty or self._events or self._sweeps or self._rewrite):
                    await self._wake.park()
            renew = trio.current_time() >= next_renew
            if renew:
                next_renew = trio.current_time() + self.refresh
            if not await self._round(renew):
                self._rewrite = True
                next_renew = trio.current_time()  # the node's key too, once Redis answers
                await trio.sleep(min(1.0, self.refresh))

    async def _round(self, renew: bool) -> bool:
        dirty, self._dirty = self._dirty, set()
        events, self._events = self._events, []
        sweeps, self._sweeps = self._sweeps, []
        full, self._rewrite = self._rewrite, False
        if self._dropped:
            log.warning("presence: dropped %d join/leave events (over %d waiting for redis)",
                        self._dropped, MAX_EVENTS)
            self._dropped = 0
        try:
            if renew:
                was = await self._client.set(node_key(self.node), b"1", px=math.ceil(self.ttl * 1000),
                                             get=True)
                if was is None:  # first round, or Redis lost it, or others swept our members
                    full = True
            commands = plan_round(self._local, () if full else dirty, events, full=full,
                                  renew=renew, node=self.node, ttl=self.ttl)
            if full:  # members that left still need deleting
                commands[:0] = [("hdel", members_key(t), [c]) for t, c in dirty
                                if c not in self._local.get(t, ())]
            for start in range(0, len(commands), MAX_PIPELINE):
                await self._send(commands[start:start + MAX_PIPELINE])
            for topic, dead in sweeps:
                await self._sweep(topic, dead)
            if renew and self._peers:
                await self._watch_peers()
        except (*REDIS_ERRORS, BrokerUnavailable) as exc:
            if not self._failing:  # once per outage: the broker logs its retries
                log.warning("presence: redis unavailable (%s); rewriting every member on recovery", exc)
            self._failing = True
            self._dirty |= dirty  # members that left are deleted then too
            return False
        self._failing = False
        return True

    async def _watch_peers(self) -> None:
        """Sweep the members of watched nodes whose key has expired (they crashed),
        in the topics this node is still in: their ``leave`` events then go out
        within ``ttl + refresh`` of the crash, even if nobody asks for presence."""
        for node, topics in list(self._peers.items()):
            topics &= self._local.keys()
            if not topics:
                del self._peers[node]
        order = sorted(self._peers)
        if not order:
            return
        keys = await self._client.mget([node_key(n) for n in order])
        for node, value in zip(order, keys, strict=True):
            if value is None:
                for topic in sorted(self._peers.pop(node)):
                    await self.members(topic)  # finds the dead entries and queues their sweep

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

    async def _sweep(self, topic: str, dead: list[tuple[bytes, bytes]]) -> None:
        """Delete *topic*'s entries of dead nodes still unchanged; send a leave
        event for each one this node deleted, when the topic has presence events."""
        args = [part for pair in dead for part in pair]
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
