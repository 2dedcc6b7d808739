"""The embedded broker, a worker's side: the supervisor is the sequencer.

``trioserve serve --workers N`` without ``--broker`` connects each worker to
the supervisor over a Unix socket in its runtime dir (the supervisor's side is
:mod:`.sequencer` and :mod:`.relay`). To the hub this is an asynchronous broker
like Redis:

- **publish** sends ``["pub", id, topic]`` and the data's JSON; the reply
  carries the offset. Many publishes are in flight on the one socket at once,
  matched by id, and a run of them (:meth:`publish_many`) goes out in one
  write. Nothing is retried, so nothing is published twice.
- **join** subscribes this worker to a topic's relays; the reply names the
  position, and every relay after it follows on. **leave** stops them.
- **relays** arrive in offset order. A chunk read from the socket is handed to
  the hub whole, with no checkpoint between publications, so a burst becomes
  one fan-out batch here as it does in a single process.
- **fetch** and **head** ask the sequencer, which keeps the history ring.
- **presence**: this worker's members go to the sequencer as ``mjoin`` and
  ``mleave`` frames, queued with the rest (no wait, one per subscribe or
  unsubscribe); ``members`` asks it for the other workers'; a join/leave event
  from another worker arrives as ``ev`` and goes to the hub's subscribers.
  Member ids carry ``@w<worker id>`` (:attr:`node`, from the ``hello``).
- **control** (the server API, :meth:`broadcast`): ``["ctl", id]`` + the
  message goes to the sequencer, which relays it as ``["ctl"]`` to every other
  connected worker and answers with how many it reached.
- **flush** (a drain) sends ``sync``: its reply comes after every relay
  sequenced before it, so the drain delivers all of them before its 1001.

The socket is reliable and ordered, so a gap in a topic's offsets cannot
happen. If one showed up anyway, the topic's subscribers are closed with 1013
(they reconnect and recover), as the Redis broker does; nothing is skipped
silently. If the socket closes, the supervisor is gone: :attr:`lost` is set,
every request fails with :class:`BrokerUnavailable`, and the worker exits
rather than serve on alone (``ops/worker.py``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import trio

from ...protocol.codes import CloseCode
from .base import Broker, BrokerUnavailable
from .wire import FrameError, FrameReader, encode_frame

__all__ = ["InHostBroker"]

log = logging.getLogger("trioserve.brokers.inhost")

#: Bytes read from the socket at a time.
CHUNK = 256 * 1024
#: Requests waiting for the sequencer's answer before publishing refuses (503).
MAX_IN_FLIGHT = 100_000

# Turns a reply's header and payload into the caller's value.
_Decode = Callable[[list[Any], bytes], Any]


class _Waiter:
    """The answers to a run of requests; one wake-up for the whole run."""

    __slots__ = ("done", "remaining", "results")

    def __init__(self, count: int):
        self.results: list[Any] = [None] * count
        self.remaining = count
        self.done = trio.Event()

    def settle(self, index: int, value: Any) -> None:
        self.results[index] = value
        self.remaining -= 1
        if not self.remaining:
            self.done.set()


class InHostBroker(Broker):
    """A worker's connection to the supervisor's sequencer (``serve --workers N``)."""

    synchronous = False
    pipelined = True
    shares_presence = True

    def __init__(self, path: str | Path):
        self.path = str(path)
        #: Set when the connection to the supervisor is gone: the worker must stop.
        self.lost = trio.Event()
        self.lost_reason = ""
        self._epoch = ""
        self._out = bytearray()
        self._writer = trio.lowlevel.ParkingLot()
        self._ids = itertools.count(1)
        self._calls: dict[int, tuple[_Waiter, int, _Decode]] = {}
        # Joined topics: the last offset handed to the hub.
        self._enqueued: dict[str, int] = {}
        self._joining: dict[str, trio.Event] = {}

    def __repr__(self) -> str:
        return f"<InHostBroker {self.path}>"

    # --- the broker interface ------------------------------------------------------

    def epoch(self, topic: str) -> str:
        return self._epoch

    async def publish(self, topic: str, data: Any) -> int:
        (result,) = await self.publish_many([(topic, data)])
        if isinstance(result, BrokerUnavailable):
            raise result
        return result

    async def publish_many(self, items: Sequence[tuple[str, Any]]) -> list[int | BrokerUnavailable]:
        if not items:
            return []
        # Encoded before anything is sent: data that is not JSON fails alone, here.
        encoded = [orjson.dumps(data) for _, data in items]
        waiter = _Waiter(len(items))
        for index, ((topic, _), data_json) in enumerate(zip(items, encoded, strict=True)):
            try:
                self._request(["pub", None, topic], data_json, waiter, index, _offset)
            except BrokerUnavailable as exc:
                waiter.settle(index, exc)
        await waiter.done.wait()
        return waiter.results

    async def flush(self) -> None:
        if self.lost.is_set():
            return
        try:
            await self._call(["sync", None], _offset)
        except BrokerUnavailable:
            pass  # lost: nothing more will arrive

    async def join(self, topic: str) -> None:
        while topic not in self._enqueued:
            joining = self._joining.get(topic)
            if joining is not None:
                await joining.wait()
                if self.lost.is_set():
                    raise BrokerUnavailable(self.lost_reason)
                continue
            joining = self._joining[topic] = trio.Event()
            try:
                # The topic starts in the reader, as the reply is read: relays
                # right behind it in the same chunk must find it joined.
                await self._call(["join", None, topic], lambda h, _: self._start_topic(topic, h[2]))
            finally:
                del self._joining[topic]
                joining.set()

    def leave(self, topic: str) -> None:
        if self._enqueued.pop(topic, None) is None:
            return
        self.hub.forget_history(topic)
        if not self.lost.is_set():
            self._send(encode_frame(["leave", topic]))

    def joined(self, topic: str) -> bool:
        return topic in self._enqueued

    def member_joined(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        if not self.lost.is_set():
            self._send(encode_frame(["mjoin", topic, member], event or b""))

    def member_left(self, topic: str, member: dict[str, Any], event: bytes | None) -> None:
        if not self.lost.is_set():
            self._send(encode_frame(["mleave", topic, member["conn"]], event or b""))

    async def members(self, topic: str) -> list[dict[str, Any]] | None:
        result: list[dict[str, Any]] = await self._call(["members", None, topic], _members)
        return result

    async def broadcast(self, message: bytes) -> int:
        waiter = _Waiter(1)
        self._request(["ctl", None], message, waiter, 0, _offset)
        await waiter.done.wait()
        (result,) = waiter.results
        if isinstance(result, BrokerUnavailable):
            raise result
        return int(result)

    async def head(self, topic: str) -> tuple[str, int]:
        if topic in self._enqueued:
            # Joined: what this worker has fanned out, in step with its subscribers.
            return self._epoch, self.hub.position(topic)
        position = await self._call(["head", None, topic], _offset)
        return self._epoch, position

    async def fetch(self, topic: str, after: int, limit: int | None = None
                    ) -> tuple[list[tuple[int, bytes]], int]:
        result: tuple[list[tuple[int, bytes]], int] = await self._call(
            ["fetch", None, topic, after, limit], _fetched)
        return result

    # --- requests --------------------------------------------------------------------

    async def _call(self, header: list[Any], decode: _Decode) -> Any:
        waiter = _Waiter(1)
        self._request(header, b"", waiter, 0, decode)
        await waiter.done.wait()
        (result,) = waiter.results
        if isinstance(result, BrokerUnavailable):
            raise result
        return result

    def _request(self, header: list[Any], payload: bytes, waiter: _Waiter, index: int,
                 decode: _Decode) -> None:
        if self.lost.is_set():
            raise BrokerUnavailable(self.lost_reason)
        if len(self._calls) >= MAX_IN_FLIGHT:
            raise BrokerUnavailable(f"overloaded: {len(self._calls)} requests waiting for the supervisor")
        request_id = header[1] = next(self._ids)
        self._send(encode_frame(header, payload))
        self._calls[request_id] = (waiter, index, decode)

    def _send(self, frame: bytes) -> None:
        self._out += frame
        if self._writer:
            self._writer.unpark_all()

    # --- background ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            stream = await trio.open_unix_socket(self.path)
        except OSError as exc:
            raise BrokerUnavailable(f"cannot reach the supervisor at {self.path}: {exc}") from None
        reason = "the supervisor closed the connection"
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop, stream)
                await self._read_loop(stream, task_status)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError, FrameError) as group:
            reason = f"the connection to the supervisor failed: {_first_leaf(group)}"
        self._lose(reason)
        # The worker watches `lost` and stops; until then, refuse quietly.
        await trio.sleep_forever()

    async def _read_loop(self, stream: trio.SocketStream, task_status: trio.TaskStatus[None]) -> None:
        reader = FrameReader()
        hub = self.hub
        started = False
        while data := await stream.receive_some(CHUNK):
            # The whole chunk with no checkpoint: the hub's next batch carries all of it.
            for header, payload in reader.feed(data):
                self._on_frame(header, payload)
            if not started and self._epoch:
                started = True
                task_status.started()
            await hub.wait_for_space()

    async def _write_loop(self, stream: trio.SocketStream) -> None:
        while True:
            if not self._out:
                await self._writer.park()
                continue
            data, self._out = self._out, bytearray()
            await stream.send_all(data)

    def _on_frame(self, header: list[Any], payload: bytes) -> None:
        kind = header[0]
        if kind == "m":
            self._relay(header[1], header[2], payload)
        elif kind == "ok" or kind == "err":
            call = self._calls.pop(header[1], None)
            if call is None:
                log.error("%r: an answer to no request: %r", self, header)
                return
            waiter, index, decode = call
            if kind == "ok":
                waiter.settle(index, decode(header, payload))
            else:
                waiter.settle(index, BrokerUnavailable(str(header[2])))
        elif kind == "ev":
            self.hub.send_event(header[1], payload)
        elif kind == "ctl":
            self.control_arrived(payload)
        elif kind == "hello":
            self._epoch = str(header[1])
            self.node = f"w{header[2]}"
        else:
            raise FrameError(f"unknown frame {header!r:.100}")

    def _relay(self, topic: str, offset: int, payload: bytes) -> None:
        last = self._enqueued.get(topic)
        if last is None:
            return  # not joined: left, or joining (then it precedes the join's position)
        if offset == last + 1:
            self._enqueued[topic] = offset
            self.hub.deliver_nowait(topic, offset, payload)
            return
        if offset <= last:
            log.error("%r: offset %d of topic %s again (at %d); dropped", self, offset, topic, last)
            return
        # Cannot happen on a working socket; if it does, never skip silently.
        closed = self.hub.close_subscribers(topic, CloseCode.TRY_AGAIN_LATER,
                                            "publications missed; reconnect and recover")
        log.error("%r: topic %s jumped from offset %d to %d; closing its %d subscribers so "
                  "they recover", self, topic, last, offset, closed)
        self._start_topic(topic, offset - 1)
        self._enqueued[topic] = offset
        self.hub.deliver_nowait(topic, offset, payload)

    def _start_topic(self, topic: str, position: int) -> int:
        self._enqueued[topic] = position
        self.hub.reset_history(topic, position)
        return position

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        log.error("%r: %s", self, reason)
        calls, self._calls = self._calls, {}
        for waiter, index, _ in calls.values():
            waiter.settle(index, BrokerUnavailable(reason))


def _offset(header: list[Any], payload: bytes) -> int:
    return int(header[2])


def _members(header: list[Any], payload: bytes) -> list[dict[str, Any]]:
    members: list[dict[str, Any]] = orjson.loads(payload)
    return members


def _fetched(header: list[Any], payload: bytes) -> tuple[list[tuple[int, bytes]], int]:
    upto, lengths = int(header[2]), header[3]
    first = upto - len(lengths) + 1
    entries = []
    pos = 0
    for i, length in enumerate(lengths):
        entries.append((first + i, payload[pos:pos + length]))
        pos += length
    return entries, upto


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
