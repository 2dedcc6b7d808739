"""The Redis broker: one offset sequence, history and epoch per topic, shared by every node.

Keys per topic T (a Redis Cluster would hash them to one slot thanks to ``{T}``):

- ``ts:{T}:off``: the last offset (INCR);
- ``ts:{T}:hist``: the history, a stream whose entry IDs are ``<offset>-1``
  (so XRANGE by offset needs no index), capped at the topic's history size;
- ``ts:{T}:epoch``: a random name for this history. If Redis loses its data,
  the key is gone and the next publish or join makes a new one, so clients
  learn their gap is unknowable (``recovered: false``);
- channel ``ts:pub:T``: ``<epoch> <offset> <publication JSON>``.

One Lua script assigns the offset, appends to history and publishes, so
offsets are gapless and in the same order on every node.

Each node subscribes only to topics it has local subscribers for, and
remembers the last offset it handed to its hub. A publication arriving with a
larger jump means this node missed some (its pub/sub connection dropped, say):
it fetches them from the stream and delivers them in order first. If history
no longer has them, the topic's local subscribers are closed with 1013, so
their clients reconnect, resubscribe with ``since`` and learn of the gap.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Any

import anyio
import coredis
import coredis.exceptions
import coredis.retry
import orjson
import trio

from ...config import redact_url
from ...protocol.codes import CloseCode
from .base import Broker, BrokerUnavailable

if TYPE_CHECKING:
    from ...config import Config

__all__ = ["RedisBroker"]

log = logging.getLogger("trioserve.brokers.redis")

# offset, history and epoch kept at least this long (seconds) after the last
# publish; all three expire together, so an expired topic comes back with a new epoch.
_KEEP = 86400

_PUBLISH = """
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', KEYS[3], epoch)
end
local offset = redis.call('INCR', KEYS[1])
local payload = ARGV[2] .. offset .. ARGV[3]
if tonumber(ARGV[4]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], offset .. '-1', 't', ARGV[7], 'p', payload)
else
  redis.call('DEL', KEYS[2])
end
local keep = math.max(tonumber(ARGV[5]), tonumber(ARGV[8]))
redis.call('EXPIRE', KEYS[1], keep)
redis.call('EXPIRE', KEYS[2], keep)
redis.call('EXPIRE', KEYS[3], keep)
redis.call('PUBLISH', ARGV[1], epoch .. ' ' .. offset .. ' ' .. payload)
return {offset, epoch}
"""

_POSITION = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch, 'EX', ARGV[2])
end
return {tonumber(redis.call('GET', KEYS[1]) or '0'), epoch}
"""

# coredis surfaces a dropped connection (and, at cancellation, its own cleanup)
# as anyio stream errors too; to us all of them mean "reconnect".
_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError, trio.BrokenResourceError,
           anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)


def _keys(topic: str) -> tuple[str, str, str]:
    return f"ts:{{{topic}}}:off", f"ts:{{{topic}}}:hist", f"ts:{{{topic}}}:epoch"


def _channel(topic: str) -> str:
    return f"ts:pub:{topic}"


class RedisBroker(Broker):
    """Publications through Redis (coredis), for several processes or hosts."""

    synchronous = False

    def __init__(self, url: str, config: Config):
        self.url = url
        self.config = config
        password = getattr(config, "broker_password", None)
        # No retries: a publish script that timed out may still run when Redis
        # recovers, and re-sending it would publish it twice under two offsets.
        # The caller gets a 503 instead, and decides (docs/decisions.md).
        options: dict[str, Any] = {"connect_timeout": 2, "stream_timeout": 5,
                                   "retry_policy": coredis.retry.NoRetryPolicy()}
        if password:
            options["password"] = password
        self._client: coredis.Redis[bytes] = coredis.Redis.from_url(url, **options)
        self._publish_script = self._client.register_script(_PUBLISH)
        self._position_script = self._client.register_script(_POSITION)
        self._pubsub: Any = None
        # Per joined topic: the epoch and the last offset handed to the hub.
        # None while joining: messages then wait in _pending.
        self._epochs: dict[str, str] = {}
        self._enqueued: dict[str, int | None] = {}
        self._pending: dict[str, list[tuple[str, int, bytes]]] = {}
        # Highest offset this node published, per topic, until it came back.
        self._published: dict[str, int] = {}
        self._inflight = 0
        self._progress = trio.lowlevel.ParkingLot()
        self._lock = trio.Lock()
        self._leaves_send, self._leaves = trio.open_memory_channel[str](math.inf)
        self.connected = trio.Event()
        self._node_channel = f"ts:node:{secrets.token_hex(8)}"

    def __repr__(self) -> str:
        # Logged ("connected to ..."): never with a password, in the userinfo or the query.
        return f"<RedisBroker {redact_url(self.url)}>"

    # --- the broker interface ------------------------------------------------------

    def epoch(self, topic: str) -> str:
        return self._epochs.get(topic, "")

    async def publish(self, topic: str, data: Any) -> int:
        size, ttl = self.config.history_for(topic)
        off_key, hist_key, epoch_key = _keys(topic)
        prefix = b'{"op":"pub","topic":' + orjson.dumps(topic) + b',"offset":'
        suffix = b',"data":' + orjson.dumps(data) + b"}"
        self._inflight += 1
        try:
            offset, _ = await self._run_script(self._publish_script,
                keys=[off_key, hist_key, epoch_key],
                args=[_channel(topic), prefix, suffix, size, math.ceil(ttl), secrets.token_hex(8),
                      int(time.time() * 1000), _KEEP],
            )
        except _ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None
        finally:
            self._inflight -= 1
            if self._progress:
                self._progress.unpark_all()
        offset = int(offset)
        if offset > self._published.get(topic, 0):
            self._published[topic] = offset
        return offset

    async def flush(self) -> None:
        # A publish returns when Redis took it, but this node receives it back
        # through pub/sub later: a drain must wait for that before its 1001.
        # Publishes still waiting for Redis's answer count too: their offsets
        # are not known yet, but their publishers will be told they succeeded.
        while True:
            behind = [t for t, off in self._published.items() if _behind(self._enqueued.get(t), off)]
            if not behind and not self._inflight:
                return
            await self._progress.park()

    async def join(self, topic: str) -> None:
        if self._enqueued.get(topic) is not None:
            return
        async with self._lock:
            if self._enqueued.get(topic) is not None:
                return
            if self._pubsub is None:
                raise BrokerUnavailable("redis is not connected")
            self._enqueued[topic] = None
            self._pending[topic] = []
            try:
                # Subscribe first, then read the position: every publication
                # after it is sure to arrive on the channel.
                await self._pubsub.subscribe(_channel(topic))
                epoch, position = await self._position(topic)
            except _ERRORS as exc:
                self._enqueued.pop(topic, None)
                self._pending.pop(topic, None)
                raise BrokerUnavailable(f"redis: {exc}") from None
            self._start_topic(topic, epoch, position)

    def leave(self, topic: str) -> None:
        self._leaves_send.send_nowait(topic)

    async def head(self, topic: str) -> tuple[str, int]:
        if self._enqueued.get(topic) is not None:
            # Joined: what this node has fanned out, in step with its subscribers.
            return self._epochs[topic], self.hub.position(topic)
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
        _, hist_key, _ = _keys(topic)
        _, ttl = self.config.history_for(topic)
        try:
            entries = await self._client.xrange(hist_key, f"{after + 1}-1", "+", count=limit)
        except _ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None
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
        async with self._client:
            while True:
                try:
                    # retry_policy=None: a dropped connection ends this block, so
                    # we know to look for publications missed meanwhile.
                    async with self._client.pubsub(ignore_subscribe_messages=True,
                                                   retry_policy=None) as pubsub:
                        await self._resume(pubsub)
                        log.info("connected to %r", self)
                        backoff = 0.1
                        if not started:
                            started = True
                            task_status.started()
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._leave_loop)
                            async for message in pubsub:
                                await self._on_message(message)
                except* _ERRORS as group:
                    # Cancellation (a drain) also surfaces from coredis as a
                    # stream error: check for it before calling Redis down.
                    await trio.lowlevel.checkpoint()
                    log.warning("redis unavailable (%s); retrying in %.1fs", _first_leaf(group), backoff)
                self._pubsub = None
                self.connected = trio.Event()
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _resume(self, pubsub: Any) -> None:
        """Subscribe again to every joined topic and deliver what was missed."""
        topics = [t for t, last in self._enqueued.items() if last is not None]
        # coredis ends iteration while nothing is subscribed; this node's own
        # channel keeps the reader alive when it has no topics.
        await pubsub.subscribe(self._node_channel, *(_channel(t) for t in topics))
        self._pubsub = pubsub
        self.connected.set()
        for topic in topics:
            epoch, position = await self._position(topic)
            last = self._enqueued.get(topic)
            if last is not None and (position > last or epoch != self._epochs[topic]):
                await self._deliver(topic, epoch, position, None)

    async def _leave_loop(self) -> None:
        async for topic in self._leaves:
            async with self._lock:
                if self.hub.subscriber_count(topic) or self._enqueued.get(topic) is None:
                    continue
                self._enqueued.pop(topic, None)
                self._epochs.pop(topic, None)
                self.hub.forget_history(topic)
                if self._pubsub is not None:
                    await self._pubsub.unsubscribe(_channel(topic))

    async def _on_message(self, message: Any) -> None:
        if message.get("type") != "message":
            return
        topic = _text(message["channel"])[len("ts:pub:"):]
        epoch, offset, payload = bytes(message["data"]).split(b" ", 2)
        if topic not in self._enqueued:
            return  # left meanwhile
        if self._enqueued[topic] is None:
            self._pending[topic].append((epoch.decode(), int(offset), payload))
            return
        await self._deliver(topic, epoch.decode(), int(offset), payload)

    def _start_topic(self, topic: str, epoch: str, position: int) -> None:
        # No checkpoint from here to the end: messages that arrived while joining
        # are replayed before any later one can be handled.
        self._epochs[topic] = epoch
        self._enqueued[topic] = position
        self.hub.reset_history(topic, position)
        for msg_epoch, offset, payload in self._pending.pop(topic, []):
            if msg_epoch == self._epochs[topic] and offset <= position:
                continue  # published before the position we read: not ours to deliver
            if msg_epoch != self._epochs[topic] or offset != position + 1:
                # Pub/sub does not lose messages on a live connection, so this
                # means Redis lost data while we joined: treat it as a gap.
                self._lost(topic, msg_epoch, offset)
            self._hand_over(topic, offset, payload)
            position = offset

    async def _deliver(self, topic: str, epoch: str, offset: int, payload: bytes | None) -> None:
        """Hand *offset* (and any missed before it) to the hub; *payload* None
        means only catch up to *offset*."""
        last = self._enqueued[topic]
        assert last is not None
        if epoch != self._epochs[topic]:
            self._lost(topic, epoch, offset if payload is not None else offset + 1)
            last = self._enqueued[topic]
            assert last is not None
        if offset <= last:
            return
        missing = offset - last - (1 if payload is not None else 0)
        if missing > 0:
            entries, upto = await self.fetch(topic, last, missing)
            if upto < last + missing:
                self._lost(topic, epoch, offset if payload is not None else offset + 1)
            else:
                for off, data in entries:
                    await self.hub.wait_for_space()
                    self._hand_over(topic, off, data)
        if payload is not None:
            await self.hub.wait_for_space()
            self._hand_over(topic, offset, payload)

    @staticmethod
    async def _run_script(script: Any, keys: list[str], args: list[Any]) -> tuple[Any, Any]:
        result = await script(keys=keys, args=args)
        return result[0], result[1]

    def _hand_over(self, topic: str, offset: int, payload: bytes) -> None:
        self._enqueued[topic] = offset
        self.hub.deliver_nowait(topic, offset, payload)
        if self._published.get(topic, offset + 1) <= offset:
            del self._published[topic]
        if self._progress:
            self._progress.unpark_all()

    def _lost(self, topic: str, epoch: str, next_offset: int) -> None:
        """Publications before *next_offset* cannot be delivered: make the
        topic's subscribers recover (and learn of the gap) by reconnecting."""
        closed = self.hub.close_subscribers(topic, CloseCode.TRY_AGAIN_LATER,
                                            "publications missed; reconnect and recover")
        log.warning("%s: publications before %d of topic %s are lost to this node; "
                    "closing its %d subscribers so they recover", self, next_offset, topic, closed)
        self._epochs[topic] = epoch
        self._enqueued[topic] = next_offset - 1
        self.hub.reset_history(topic, next_offset - 1)
        if self._progress:
            self._progress.unpark_all()


def _behind(enqueued: int | None, published: int) -> bool:
    # None: no local subscribers (or joining), so nothing here waits for it.
    return enqueued is not None and enqueued < published


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
