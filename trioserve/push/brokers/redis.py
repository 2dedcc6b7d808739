"""The Redis broker: one offset sequence, history and epoch per topic, shared by every node.

Keys per topic T (a Redis Cluster would hash them to one slot thanks to ``{T}``):

- ``ts:{T}:off``: the last offset (INCRBY);
- ``ts:{T}:hist``: the history, a stream whose entry IDs are ``<offset>-1``
  (so XRANGE by offset needs no index), capped at the topic's history size;
- ``ts:{T}:epoch``: a random name for this history. If Redis loses its data,
  the key is gone and the next publish or join makes a new one, so clients
  learn their gap is unknowable (``recovered: false``);
- channel ``ts:pub:T``: ``<epoch> <offset> <publication JSON>``;
- presence: the hash ``ts:{T}:members`` and the channel ``ts:ev:T``
  (redis_presence.py), joined and left with ``ts:pub:T``.
- channel ``ts:ctl``: ``<node> <message>``, the server API's control messages,
  to every node (:meth:`RedisBroker.broadcast`); every node always listens.

One Lua script assigns offsets, appends to history and publishes, so offsets
are gapless and in the same order on every node.

**Publishing.** ``publish()`` puts the publication in this node's queue and
waits; ``publish_many()`` (a client connection's run of publishes, through the
push handler) puts them all there and waits for all. One sender task takes
everything waiting and sends it to Redis as one script call per topic, which
assigns the publications consecutive offsets and answers with the first: N
concurrent publications cost one round trip and one script run, not N. A
batch is sent once and never again: if its call fails or times out, every
publisher in it gets :class:`BrokerUnavailable` (the script may still run once
Redis recovers, and a second send would publish it twice under new offsets).

**Reading.** Each node subscribes only to topics it has local subscribers for,
on its own pub/sub connection (redis_pubsub.py), which hands over everything
that arrived in one read. The consumer checks each publication with the
:class:`~.redis_sequencer.Sequencer` and hands the whole run to the hub with no
checkpoint between publications (``deliver_nowait``; it waits only when the
hub's inbox is full), so a burst becomes one fan-out batch, as with the memory
broker. A publication arriving with a jump in offset means this node missed
some (its pub/sub connection dropped, say): it fetches them from the stream and
hands them over first. If history no longer has them, the topic's local
subscribers are closed with 1013, so their clients reconnect, resubscribe with
``since`` and learn of the gap.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import coredis
import coredis.retry
import orjson
import trio
from coredis.connection import TCPLocation

from ...config import redact_url
from ...protocol.codes import CloseCode
from .base import Broker, BrokerUnavailable
from .redis_presence import REDIS_ERRORS as _ERRORS
from .redis_presence import RedisPresence, event_channel
from .redis_pubsub import PubSubConnection
from .redis_sequencer import Message, Sequencer, Verdict, parse_message

if TYPE_CHECKING:
    from ...config import Config

__all__ = ["CONTROL_CHANNEL", "MAX_PUBLISH_BATCH", "MAX_PUBLISH_BYTES", "PUBLISH_SCRIPT", "RedisBroker",
           "publish_call", "take_batch"]

log = logging.getLogger("trioserve.brokers.redis")

# offset, history and epoch kept at least this long (seconds) after the last
# publish; all three expire together, so an expired topic comes back with a new epoch.
_KEEP = 86400

#: Publications of one script call at most, and their JSON bytes (at least one is sent).
MAX_PUBLISH_BATCH = 1024
MAX_PUBLISH_BYTES = 1024 * 1024

#: KEYS: offset, history, epoch. ARGV: channel, a new epoch (if the topic has
#: none), now (ms), history size, history TTL (s), the minimum TTL (s), the
#: publication's JSON before its offset, then the JSON after the offset of each
#: publication. Returns the first offset and the epoch.
PUBLISH_SCRIPT = """
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[3], epoch)
end
local n = #ARGV - 7
local last = redis.call('INCRBY', KEYS[1], n)
local first = last - n + 1
local size = tonumber(ARGV[4])
for i = 1, n do
  local offset = first + i - 1
  local payload = ARGV[7] .. offset .. ARGV[7 + i]
  if size > 0 then
    redis.call('XADD', KEYS[2], offset .. '-1', 't', ARGV[3], 'p', payload)
  end
  redis.call('PUBLISH', ARGV[1], epoch .. ' ' .. offset .. ' ' .. payload)
end
if size > 0 then
  redis.call('XTRIM', KEYS[2], 'MAXLEN', size)
else
  redis.call('DEL', KEYS[2])
end
local keep = math.max(tonumber(ARGV[5]), tonumber(ARGV[6]))
redis.call('EXPIRE', KEYS[1], keep)
redis.call('EXPIRE', KEYS[2], keep)
redis.call('EXPIRE', KEYS[3], keep)
return {first, epoch}
"""

_POSITION = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch, 'EX', ARGV[2])
end
return {tonumber(redis.call('GET', KEYS[1]) or '0'), epoch}
"""

CONTROL_CHANNEL = "ts:ctl"
_CONTROL = CONTROL_CHANNEL.encode()


def _keys(topic: str) -> tuple[str, str, str]:
    return f"ts:{{{topic}}}:off", f"ts:{{{topic}}}:hist", f"ts:{{{topic}}}:epoch"


def _channel(topic: str) -> str:
    return f"ts:pub:{topic}"


def publish_call(topic: str, suffixes: list[bytes], size: int, ttl: float
                 ) -> tuple[list[str], list[Any]]:
    """The keys and arguments of :data:`PUBLISH_SCRIPT` for *topic*'s publications,
    each given as the JSON after its offset (``,"data":...}``)."""
    prefix = b'{"op":"pub","topic":' + orjson.dumps(topic) + b',"offset":'
    return list(_keys(topic)), [_channel(topic), secrets.token_hex(8), int(time.time() * 1000), size,
                                math.ceil(ttl), _KEEP, prefix, *suffixes]


class _Publication:
    """One publication waiting in the queue for its offset; its publisher waits on *event*."""

    __slots__ = ("error", "event", "offset", "queued", "suffix", "topic")

    def __init__(self, topic: str, data: Any) -> None:
        self.topic = topic
        self.suffix = b',"data":' + orjson.dumps(data) + b"}"
        self.offset = 0
        self.error: BaseException | None = None
        self.queued = True
        self.event = trio.Event()

    def answer(self) -> None:
        self.event.set()


def take_batch(queue: deque[Any], max_count: int = MAX_PUBLISH_BATCH,
               max_bytes: int = MAX_PUBLISH_BYTES) -> list[Any]:
    """The oldest waiting publications (at least one) within the batch limits."""
    first = queue.popleft()
    batch = [first]
    size = len(first.suffix)
    while queue and len(batch) < max_count and size + len(queue[0].suffix) <= max_bytes:
        pub = queue.popleft()
        batch.append(pub)
        size += len(pub.suffix)
    return batch


class RedisBroker(Broker):
    """Publications through Redis (coredis), for several processes or hosts."""

    synchronous = False
    pipelined = True
    shares_presence = True
    #: Seconds to connect, and to wait for any answer (a publish batch, a
    #: subscribe, a PING); tests shorten them.
    connect_timeout = 2.0
    stream_timeout = 5.0
    #: Seconds of pub/sub silence before a PING.
    keepalive = 15.0
    #: Seconds between rewrites of this node's presence members, and how long
    #: each write keeps them (a crashed node's members go after that); tests shorten them.
    presence_refresh = 10.0
    presence_ttl = 30.0

    def __init__(self, url: str, config: Config):
        self.url = url
        self.config = config
        password = getattr(config, "broker_password", None)
        # No retries: a publish script that timed out may still run when Redis
        # recovers, and re-sending it would publish it twice under two offsets.
        # The caller gets a 503 instead, and decides (docs/decisions.md).
        options: dict[str, Any] = {"connect_timeout": self.connect_timeout,
                                   "stream_timeout": self.stream_timeout,
                                   "retry_policy": coredis.retry.NoRetryPolicy()}
        if password:
            options["password"] = password
        self._client: coredis.Redis[bytes] = coredis.Redis.from_url(url, **options)
        self._publish_script = self._client.register_script(PUBLISH_SCRIPT)
        self._position_script = self._client.register_script(_POSITION)
        self._presence = RedisPresence(self._client, config, lambda t, e: self.hub.send_event(t, e),
                                       refresh=self.presence_refresh, ttl=self.presence_ttl)
        self.node = self._presence.node  # per process: each worker of --workers N is a node
        self._pubsub: PubSubConnection | None = None
        self._seq = Sequencer()
        # Publications waiting for the sender, and those it is sending.
        self._queue: deque[_Publication] = deque()
        self._sending: list[_Publication] = []
        self._queued = trio.lowlevel.ParkingLot()
        # Publications accepted and not yet answered (queued or sent).
        self._inflight = 0
        self._progress = trio.lowlevel.ParkingLot()
        self._lock = trio.Lock()
        self._leaves_send, self._leaves = trio.open_memory_channel[str](math.inf)
        self.connected = trio.Event()

    def __repr__(self) -> str:
        # Logged ("connected to ..."): never with a password, in the userinfo or the query.
        return f"<RedisBroker {redact_url(self.url)}>"

    # --- the broker interface ------------------------------------------------------

    def epoch(self, topic: str) -> str:
        return self._seq.epoch(topic)

    async def publish(self, topic: str, data: Any) -> int:
        (pub,) = await self._queue_and_wait([_Publication(topic, data)])
        if pub.error is not None:
            raise pub.error
        return pub.offset

    async def publish_many(self, items: Sequence[tuple[str, Any]]) -> list[int | BrokerUnavailable]:
        # All queued before the sender runs: they go to Redis in one script call per topic.
        pubs = await self._queue_and_wait([_Publication(topic, data) for topic, data in items])
        results: list[int | BrokerUnavailable] = []
        for pub in pubs:
            if pub.error is None:
                results.append(pub.offset)
            elif isinstance(pub.error, BrokerUnavailable):
                results.append(pub.error)
            else:
                raise pub.error
        return results

    async def _queue_and_wait(self, pubs: list[_Publication]) -> list[_Publication]:
        for pub in pubs:
            self._enqueue(pub)
        try:
            for pub in pubs:
                await pub.event.wait()
        except BaseException:
            for pub in pubs:
                if pub.queued:  # not sent yet: take it back, so it never happens
                    self._queue.remove(pub)
                    pub.queued = False
                    self._finished(1)
            raise
        return pubs

    def _enqueue(self, pub: _Publication) -> None:
        self._queue.append(pub)
        self._inflight += 1
        if self._queued:
            self._queued.unpark_all()

    async def flush(self) -> None:
        # A publish returns when Redis took it, but this node receives it back
        # through pub/sub later: a drain must wait for that before its 1001.
        # Publishes still waiting for Redis's answer count too: their offsets
        # are not known yet, but their publishers will be told they succeeded.
        while self._seq.behind() or self._inflight:
            await self._progress.park()

    async def join(self, topic: str) -> None:
        if self._seq.is_joined(topic):
            return
        async with self._lock:
            if self._seq.is_joined(topic):
                return
            pubsub = self._pubsub
            if pubsub is None:
                raise BrokerUnavailable("redis is not connected")
            self._seq.start_joining(topic)
            try:
                # Subscribe first, then read the position: every publication
                # after it is sure to arrive on the channel.
                await pubsub.subscribe(*self._channels(topic))
                epoch, position = await self._position(topic)
            except _ERRORS as exc:
                self._seq.abandon(topic)
                raise BrokerUnavailable(f"redis: {exc}") from None
            self._start_topic(topic, epoch, position)

    def leave(self, topic: str) -> None:
        self._leaves_send.send_nowait(topic)

    def _channels(self, topic: str) -> list[str]:
        """The channels a node joined to *topic* listens to."""
        if self._presence.listens(topic):
            return [_channel(topic), event_channel(topic)]
        return [_channel(topic)]

    # --- presence (redis_presence.py) --------------------------------------------------

    def member_joined(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        self._presence.joined(topic, member, event)

    def member_left(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        self._presence.left(topic, member, event)

    async def members(self, topic: str) -> list[dict[str, Any]] | None:
        return await self._presence.members(topic)

    async def broadcast(self, message: bytes) -> int:
        if self._pubsub is None:
            raise BrokerUnavailable("redis is not connected")
        try:
            reached = await self._client.publish(CONTROL_CHANNEL, self.node.encode() + b" " + message)
        except _ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None
        return max(0, int(reached) - 1)  # this node listens too, and ignores its own

    async def head(self, topic: str) -> tuple[str, int]:
        if self._seq.is_joined(topic):
            # Joined: what this node has fanned out, in step with its subscribers.
            return self._seq.epoch(topic), self.hub.position(topic)
        # Not joined, so this node follows neither the offsets nor the epoch: ask Redis.
        try:
            return await self._position(topic)
        except _ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None

    async def _position(self, topic: str) -> tuple[str, int]:
        """*topic*'s epoch (made now if it has none) and last offset, from Redis."""
        off_key, _, epoch_key = _keys(topic)
        position, epoch = await self._run_script(
            self._position_script, keys=[off_key, epoch_key], args=[secrets.token_hex(8), _KEEP])
        return _text(epoch), int(position)

    async def fetch(self, topic: str, after: int, limit: int | None = None
                    ) -> tuple[list[tuple[int, bytes]], int]:
        try:
            return await self._fetch(topic, after, limit)
        except _ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None

    async def _fetch(self, topic: str, after: int, limit: int | None = None
                     ) -> tuple[list[tuple[int, bytes]], int]:
        _, hist_key, _ = _keys(topic)
        _, ttl = self.config.history_for(topic)
        entries = await self._client.xrange(hist_key, f"{after + 1}-1", "+", count=limit)
        oldest_ms = (time.time() - ttl) * 1000
        run: list[tuple[int, bytes]] = []
        expected = after + 1
        for entry in entries:
            offset = int(_text(entry.identifier).split("-")[0])
            fields = entry.field_values
            if offset != expected or float(fields[b"t"]) < oldest_ms:
                break
            payload = fields[b"p"]
            run.append((offset, payload.encode() if isinstance(payload, str) else payload))
            expected += 1
        return run, expected - 1

    # --- background ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        backoff = 0.1
        async with self._client, trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop)
            nursery.start_soon(self._presence.run)
            while True:
                try:
                    pubsub = await self._open_pubsub()
                    try:
                        async with trio.open_nursery() as reading:
                            # A dropped connection ends this block, so we know
                            # to look for publications missed meanwhile.
                            reading.start_soon(pubsub.run)
                            await self._resume(pubsub)
                            log.info("connected to %r", self)
                            backoff = 0.1
                            if not started:
                                started = True
                                task_status.started()
                            reading.start_soon(self._leave_loop, pubsub)
                            await self._consume(pubsub)
                    finally:
                        self._pubsub = None
                        await pubsub.aclose()
                except* _ERRORS as group:
                    # Cancellation (a drain) also surfaces from coredis as a
                    # stream error: check for it before calling Redis down.
                    await trio.lowlevel.checkpoint()
                    log.warning("redis unavailable (%s); retrying in %.1fs", _first_leaf(group), backoff)
                self.connected = trio.Event()
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _open_pubsub(self) -> PubSubConnection:
        # The address, credentials, database and TLS context coredis parsed from the URL.
        pool = self._client.connection_pool
        location = pool.location
        assert isinstance(location, TCPLocation), location
        kw: dict[str, Any] = dict(pool.connection_kwargs)
        return await PubSubConnection.open(
            location.host, location.port, ssl_context=kw.get("ssl_context"), username=kw.get("username"),
            password=kw.get("password"), db=kw.get("db"), connect_timeout=self.connect_timeout,
            timeout=self.stream_timeout, keepalive=self.keepalive)

    async def _resume(self, pubsub: PubSubConnection) -> None:
        """Subscribe again to every joined topic and deliver what was missed.
        The consumer starts after this: what arrives meanwhile waits in *pubsub*."""
        topics = self._seq.joined()
        await pubsub.subscribe(CONTROL_CHANNEL, *(c for t in topics for c in self._channels(t)))
        self._pubsub = pubsub
        self.connected.set()
        self._presence.rewrite()  # Redis may have restarted without them
        for topic in topics:
            if not self._seq.is_joined(topic):
                continue  # left meanwhile
            epoch, position = await self._position(topic)
            verdict = self._seq.catch_up(topic, epoch, position)
            if verdict is Verdict.EPOCH:
                self._lost(topic, epoch, position + 1)
            elif verdict is Verdict.GAP:
                await self._fill_gap(topic, position)

    async def _leave_loop(self, pubsub: PubSubConnection) -> None:
        async for topic in self._leaves:
            async with self._lock:
                if self.hub.subscriber_count(topic) or not self._seq.is_joined(topic):
                    continue
                self._seq.abandon(topic)
                self.hub.forget_history(topic)
                await pubsub.unsubscribe(*self._channels(topic))

    async def _consume(self, pubsub: PubSubConnection) -> None:
        """Hand each run of publications to the hub, in order, with no checkpoint
        between them unless a gap must be fetched or the hub's inbox is full."""
        while True:
            for channel, data in await pubsub.receive():
                message = parse_message(channel, data)
                if message is not None:
                    await self._arrive(message)
                elif channel == _CONTROL:  # another node's (this one's own is skipped)
                    sender, _, control = data.partition(b" ")
                    if control and sender != self.node.encode():
                        self.control_arrived(control)
                else:  # not a publication: a presence event, maybe
                    self._presence.deliver(channel, data)

    async def _arrive(self, message: Message) -> None:
        await self.hub.wait_for_space()  # returns at once (no checkpoint) unless the inbox is full
        seq = self._seq
        while True:
            verdict = seq.check(message)
            if verdict is Verdict.NEXT:
                self._hand_over(message.topic, message.offset, message.payload)
                return
            if verdict is Verdict.GAP:
                await self._fill_gap(message.topic, message.offset - 1)
            elif verdict is Verdict.EPOCH:
                self._lost(message.topic, message.epoch, message.offset)
            else:
                return  # IGNORE, HOLD

    async def _fill_gap(self, topic: str, upto: int) -> None:
        """Hand over the publications after the last one handed over, up to
        *upto*, from the stream; or, if history no longer has them, give them up."""
        seq = self._seq
        last = seq.last(topic)
        entries, reached = await self._fetch(topic, last, upto - last)
        for offset, payload in entries:
            if not seq.is_joined(topic) or seq.last(topic) != offset - 1:
                return  # the topic was left or rejoined meanwhile: the caller checks again
            await self.hub.wait_for_space()
            self._hand_over(topic, offset, payload)
        if reached < upto and seq.is_joined(topic) and seq.last(topic) == reached:
            self._lost(topic, seq.epoch(topic), upto + 1)

    def _start_topic(self, topic: str, epoch: str, position: int) -> None:
        # No checkpoint from here to the end: messages that arrived while joining
        # are replayed before any later one can be handled.
        held = self._seq.start(topic, epoch, position)
        self.hub.reset_history(topic, position)
        for message in held:
            verdict = self._seq.check(message)
            if verdict is Verdict.IGNORE:
                continue
            if verdict is not Verdict.NEXT:
                # Pub/sub does not lose messages on a live connection, so this
                # means Redis lost data while we joined: treat it as a gap.
                self._lost(topic, message.epoch, message.offset)
            self._hand_over(topic, message.offset, message.payload)

    # --- publishing --------------------------------------------------------------------

    async def _send_loop(self) -> None:
        """Send what waits in the queue, one batch at a time."""
        queue = self._queue
        try:
            while True:
                while not queue:
                    await self._queued.park()
                batch = self._sending = take_batch(queue)
                groups: dict[str, list[_Publication]] = {}
                for pub in batch:
                    pub.queued = False
                    groups.setdefault(pub.topic, []).append(pub)
                if len(groups) == 1:
                    await self._send_group(batch[0].topic, batch)
                else:  # one script call per topic, sent together
                    async with trio.open_nursery() as nursery:
                        for topic, pubs in groups.items():
                            nursery.start_soon(self._send_group, topic, pubs)
                # Answered in queue order, so one connection's replies keep theirs.
                self._sending = []
                for pub in batch:
                    pub.answer()
                self._finished(len(batch))
        finally:
            # The broker stops: nothing more will be sent.
            stopped = [*self._sending, *queue]
            queue.clear()
            for pub in stopped:
                pub.queued = False
                pub.error = BrokerUnavailable("the broker stopped")
                pub.answer()
            self._finished(len(stopped))

    async def _send_group(self, topic: str, pubs: list[_Publication]) -> None:
        """One script call for *pubs* (all of *topic*): each gets its offset or the error."""
        size, ttl = self.config.history_for(topic)
        keys, args = publish_call(topic, [p.suffix for p in pubs], size, ttl)
        try:
            first, _ = await self._run_script(self._publish_script, keys=keys, args=args)
        except _ERRORS as exc:
            for pub in pubs:
                pub.error = BrokerUnavailable(f"redis: {exc}")
            return
        first = int(first)
        for n, pub in enumerate(pubs):
            pub.offset = first + n
        self._seq.published(topic, first + len(pubs) - 1)

    def _finished(self, count: int) -> None:
        self._inflight -= count
        if self._progress:
            self._progress.unpark_all()

    @staticmethod
    async def _run_script(script: Any, keys: list[str], args: list[Any]) -> tuple[Any, Any]:
        result = await script(keys=keys, args=args)
        return result[0], result[1]

    # --- handing over ------------------------------------------------------------------

    def _hand_over(self, topic: str, offset: int, payload: bytes) -> None:
        self._seq.handed_over(topic, offset)
        self.hub.deliver_nowait(topic, offset, payload)
        if self._progress:
            self._progress.unpark_all()

    def _lost(self, topic: str, epoch: str, next_offset: int) -> None:
        """Publications before *next_offset* cannot be delivered: make the
        topic's subscribers recover (and learn of the gap) by reconnecting."""
        closed = self.hub.close_subscribers(topic, CloseCode.TRY_AGAIN_LATER,
                                            "publications missed; reconnect and recover")
        log.warning("%s: publications before %d of topic %s are lost to this node; "
                    "closing its %d subscribers so they recover", self, next_offset, topic, closed)
        self._seq.reset(topic, epoch, next_offset - 1)
        self.hub.reset_history(topic, next_offset - 1)
        if self._progress:
            self._progress.unpark_all()


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
