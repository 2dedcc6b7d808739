"""The sending half of a :class:`~trioserve.net.connection.Connection`.

Sending is synchronous: with an empty queue a frame goes straight to the
socket, and only what the kernel did not take waits in a bounded queue, for a
writer task that exists only while there is backlog. A queue over its limit
trips the slow-consumer policy (close 4008, or drop the oldest frames).

:class:`Sender` is the Connection's base class rather than an object of its
own, so an idle connection stays one object.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import trio

from ..config import Config, SlowConsumerPolicy
from ..protocol.codes import CloseCode
from .transport import Transport

__all__ = [
    "CLOSE_FAILED",
    "CLOSE_HANDSHAKE",
    "CLOSE_REPLIED",
    "ConnectionClosed",
    "ConnectionState",
    "Framing",
    "QueueTotal",
    "Sender",
]

log = logging.getLogger("trioserve.connection")

_MAX_IOV = 64
# Bytes handed to one sendmsg(); more would only sit in the kernel's buffer anyway.
_MAX_WRITE = 256 * 1024

# How a close ends once our close frame (or line) is flushed:
#: wait for the peer's close frame (WebSocket) or EOF (TCP);
CLOSE_HANDSHAKE = "handshake"
#: we answered the peer's close: close the transport;
CLOSE_REPLIED = "replied"
#: we failed the connection (bad input): send EOF and discard whatever still
#: arrives until the peer closes or the close deadline passes, so our close
#: frame is not destroyed by a reset (closing with unread input sends RST).
CLOSE_FAILED = "failed"


class ConnectionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class ConnectionClosed(Exception):
    """The connection is closed; ``code`` and ``reason`` say why."""

    def __init__(self, code: int | None, reason: str | None):
        super().__init__(f"connection closed: {code} {reason or ''}".rstrip())
        self.code = code
        self.reason = reason


@attrs.frozen
class Framing:
    """How a transport frames payloads; the hub frames each batch once per framing."""

    name: str
    frame_batch: Callable[[Sequence[bytes]], bytes]
    #: Set for SSE only: publications framed with the last event left open,
    #: for each subscriber to end with its own ``id:`` (see push.hub).
    frame_open: Callable[[Sequence[bytes]], bytes] | None = None


class QueueTotal:
    """Outbound bytes queued over every connection of a server, against ``max_queued_bytes``.

    Connections add and subtract their own queue's changes here, so the total is
    always exact and costs nothing on the hot path: a frame the kernel takes at
    once is never queued and never touches this. The alternative, a task adding
    up every connection's queue every 100 ms, would cost O(connections) per tick
    even on an idle server, and would notice a burst 100 ms late. Crossing the
    limit calls *on_over* once, which wakes the server's shedder; shedding itself
    (finding the largest queues) runs in that task, outside the fan-out loop.
    """

    __slots__ = ("bytes", "limit", "on_over", "over")

    def __init__(self, limit: int = 0, on_over: Callable[[], object] | None = None):
        #: Bytes queued now, over every connection that shares this total.
        self.bytes = 0
        #: 0: no limit.
        self.limit = limit
        self.on_over = on_over
        #: True from crossing the limit until the shedder has run.
        self.over = False

    def exceeded(self) -> None:
        if not self.over:
            self.over = True
            if self.on_over is not None:
                self.on_over()


class Sender:
    """Sending, the outbound queue and its writer: the part of a Connection
    that the fan-out calls (:meth:`send_prepared`)."""

    # The sending fields; the Connection subclass adds the rest.
    __slots__ = (
        "_bytes_out",
        "_drained",
        "_dropped",
        "_head_offset",
        "_msgs_out",
        "_queue",
        "_queued_bytes",
        "_queued_frames",
        "_slow",
        "_writer_running",
    )  # fmt: skip

    framing: ClassVar[Framing]
    state: ConnectionState
    remote: str | None
    _transport: Transport
    _total: QueueTotal
    _config: Config
    _nursery: trio.Nursery
    _queue: deque[tuple[bytes, int]] | None
    _head_offset: int
    _queued_bytes: int
    _queued_frames: int
    _writer_running: bool
    _drained: trio.Event | None
    _bytes_out: int
    _msgs_out: int
    _dropped: int
    _slow: bool
    _close_code: int | None
    _close_reason: str | None
    _close_mode: str

    def frame(self, message: str | bytes) -> bytes:
        """The wire bytes of one application message on this transport."""
        raise NotImplementedError

    def _start_close(self, code: int, reason: str | None = None, *, failed: bool = False) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _broken(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    # --- sending -------------------------------------------------------------------

    def send_prepared(self, data: bytes, count: int = 1) -> bool:
        """Send bytes that are already framed for this transport (*count* frames).

        This is the fan-out hot path: no checkpoint, and with an empty queue
        no task switch. Returns False if the connection is not open (the data
        is dropped, as the connection is going away).
        """
        if self.state is not ConnectionState.OPEN:
            return False
        self._write(data, count, limited=True)
        return True

    def send_encoded(self, payload: bytes) -> bool:
        """Send one UTF-8 text payload (a JSON reply, say) as a text message."""
        return self.send_prepared(self.framing.frame_batch((payload,)))

    def send_nowait(self, message: str | bytes) -> bool:
        """Queue one message (``str``: text, ``bytes``: binary or a raw line).

        Applies the slow-consumer policy when the queue is over its limit.
        """
        return self.send_prepared(self.frame(message))

    async def send(self, message: str | bytes) -> None:
        """Send one message, waiting while the outbound queue is full.

        Like a send on a Go buffered channel: it blocks on backpressure instead
        of tripping the slow-consumer policy. Raises :class:`ConnectionClosed`.
        """
        frame = self.frame(message)
        while self._queue is not None and self._over_limit(len(frame), 1):
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()
        if not self.send_prepared(frame):
            raise ConnectionClosed(self._close_code, self._close_reason)
        await trio.lowlevel.checkpoint()

    def _over_limit(self, extra_bytes: int = 0, extra_frames: int = 0) -> bool:
        cfg = self._config
        return (
            self._queued_bytes + extra_bytes > cfg.queue_max_bytes
            or self._queued_frames + extra_frames > cfg.queue_max_frames
        )

    def _write(self, data: bytes, count: int, limited: bool) -> None:
        if self._queue is None:
            try:
                sent = self._transport.try_send(data)
            except OSError:
                self._broken()
                return
            self._bytes_out += sent
            if sent == len(data):
                self._msgs_out += count
                if self.state is ConnectionState.CLOSING:
                    self._flushed()
                return
            self._queue = deque()
            self._head_offset = sent
            added = len(data) - sent
        else:
            added = len(data)
        # Only frames the kernel did not take at once get here: the fan-out hot
        # path above is unchanged by the process-wide total.
        self._queue.append((data, count))
        self._queued_bytes += added
        self._queued_frames += count
        total = self._total
        total.bytes += added
        if limited and self._over_limit():
            self._on_backlog_limit()
        if total.bytes > total.limit > 0:
            total.exceeded()
        if not self._writer_running and self._queue is not None:
            self._writer_running = True
            self._nursery.start_soon(self._writer)

    def _on_backlog_limit(self) -> None:
        queue = self._queue
        assert queue is not None
        # A partly sent frame must be finished, or the peer's framing breaks.
        keep = 1 if self._head_offset else 0
        if self._config.slow_consumer_policy is SlowConsumerPolicy.DROP_OLDEST:
            total = self._total
            while len(queue) > keep + 1 and self._over_limit():
                data, count = queue[keep]
                del queue[keep]
                self._queued_bytes -= len(data)
                total.bytes -= len(data)
                self._queued_frames -= count
                self._dropped += count
            return
        log.info("slow consumer %s: queue over its limit, closing 4008", self.remote)
        self._close_slow()

    def _close_slow(self) -> None:
        """Drop what waits in the queue and close with 4008."""
        queue = self._queue
        assert queue is not None
        keep = 1 if self._head_offset else 0
        self._slow = True
        total = self._total
        while len(queue) > keep:
            data, count = queue.pop()
            self._queued_bytes -= len(data)
            total.bytes -= len(data)
            self._queued_frames -= count
        # The queue object stays even if empty: a batch may be in flight, and the
        # close frame must go out after it, not around it.
        self._start_close(CloseCode.SLOW_CONSUMER)

    def shed(self) -> None:
        """Give up on this connection's queue to save the process's memory
        (``max_queued_bytes``): an open connection drops its queue and closes
        with 4008; one that is already closing is closed at once."""
        if self.state is ConnectionState.OPEN and self._queue is not None:
            log.info("slow consumer %s: one of the largest queues while the server is over "
                     "max_queued_bytes, closing 4008", self.remote)
            self._close_slow()
        elif self.state is not ConnectionState.CLOSED:
            self.abort()

    async def _writer(self) -> None:
        try:
            while self._queue:
                await self._transport.wait_writable()
                if not self._queue:
                    break
                batch, bufs = self._take_batch()
                self._after_send(batch, await self._transport.send_some(bufs))
        except OSError:
            self._broken()
        finally:
            self._writer_running = False

    def _take_batch(self) -> tuple[list[tuple[bytes, int]], list[bytes | memoryview]]:
        # Entries leave the queue while in flight, so the slow-consumer policy
        # never trims bytes a send already holds. The deque itself stays, so
        # send_prepared keeps queueing behind them instead of overtaking them.
        queue = self._queue
        assert queue is not None
        batch: list[tuple[bytes, int]] = []
        bufs: list[bytes | memoryview] = []
        size = 0
        while queue and len(batch) < _MAX_IOV and size < _MAX_WRITE:
            entry = queue.popleft()
            data = entry[0]
            if not batch and self._head_offset:
                bufs.append(memoryview(data)[self._head_offset :])
            else:
                bufs.append(data)
            size += len(bufs[-1])
            batch.append(entry)
        return batch, bufs

    def _after_send(self, batch: list[tuple[bytes, int]], sent: int) -> None:
        self._bytes_out += sent
        queue = self._queue
        if queue is None:  # closed while the write was in flight
            return
        self._queued_bytes -= sent
        self._total.bytes -= sent
        offset = self._head_offset + sent
        for i, (data, count) in enumerate(batch):
            if offset < len(data):
                queue.extendleft(reversed(batch[i:]))
                break
            offset -= len(data)
            self._queued_frames -= count
            self._msgs_out += count
        else:
            offset = 0
        self._head_offset = offset
        if not queue:
            self._queue = None
            self._flushed()

    def _flushed(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None
        if self.state is ConnectionState.CLOSING:
            if self._close_mode is CLOSE_REPLIED:
                self._finish()
            elif self._close_mode is CLOSE_FAILED:
                self._transport.shutdown_write()
            else:
                self._on_close_sent()

    def _on_close_sent(self) -> None:
        """The close frame is out; wait for the peer's (the reader does)."""
