"""A client connection: reader, heartbeat deadline, rate limit and close handshake.

One task per connection, the one that made it, reads; nothing else runs while
the connection is idle. Sending is in :mod:`.outbound`. The heartbeat's
timeout is the deadline of the reader's cancel scope, not a sleeping task;
under a server the pings themselves come from one task for all connections
(:mod:`.heartbeat`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Any, ClassVar

import attrs
import trio

from ..config import Config
from ..protocol.claims import Claims, seconds_left
from ..protocol.codes import CloseCode, default_reason
from ..protocol.messages import REFRESH_REQUIRED
from .heartbeat import Heartbeats
from .outbound import (
    CLOSE_FAILED,
    CLOSE_HANDSHAKE,
    ConnectionClosed,
    ConnectionState,
    Framing,
    QueueTotal,
    Sender,
)
from .transport import Transport

__all__ = [
    "RATE_CLOSE_FACTOR",
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "ConnectionStatistics",
    "Framing",
    "QueueTotal",
    "next_connection_id",
]

log = logging.getLogger("trioserve.connection")

_ids = itertools.count(1)


def next_connection_id() -> int:
    """A connection id taken before the connection exists: the connect proxy names
    an upgrade with the id its connection will have (``Connection(conn_id=...)``)."""
    return next(_ids)

#: A connection that sends this many times ``rate_burst`` messages beyond its
#: allowance (it kept going after ``rate_limited`` replies) is closed with 4029.
RATE_CLOSE_FACTOR = 10

# Connections made without a server (tests, your own listener) share this one: no limit.
_NO_TOTAL = QueueTotal()


@attrs.frozen
class ConnectionStatistics:
    transport: str
    state: str
    remote: str | None
    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int
    queued_frames: int
    queued_bytes: int
    #: Frames discarded by the drop-oldest slow-consumer policy.
    dropped_frames: int
    #: True once the disconnect policy has closed this connection with 4008.
    slow_consumer: bool
    close_code: int | None
    close_reason: str | None


class Connection(Sender):
    """Base class; see :class:`WebSocketConnection` and :class:`TcpConnection`.

    A Connection belongs to the task that created it: that task reads (via
    :meth:`receive` or ``async for``); any task may send.
    """

    framing: ClassVar[Framing]
    transport_name: ClassVar[str]

    __slots__ = (
        "_beats",
        "_bytes_in",
        "_close_code",
        "_close_deadline",
        "_close_mode",
        "_close_reason",
        "_config",
        "_data",
        "_done",
        "_expires_at",
        "_inbox",
        "_last_rx",
        "_msgs_in",
        "_nursery",
        "_ping_sent_at",
        "_rate_at",
        "_rate_debt",
        "_reading",
        "_refresh_sent",
        "_scope",
        "_task",
        "_total",
        "_transport",
        "claims",
        "id",
        "remote",
        "state",
    )  # fmt: skip

    def __init__(
        self,
        transport: Transport,
        config: Config,
        nursery: trio.Nursery,
        remote: str | None = None,
        *,
        queue_total: QueueTotal | None = None,
        heartbeats: Heartbeats | None = None,
        conn_id: int | None = None,
    ):
        self._transport = transport
        self._total = _NO_TOTAL if queue_total is None else queue_total
        # None: no sweeping task, the reader's deadline sends each ping itself.
        self._beats = heartbeats
        self._config = config
        # Writers are spawned here, lazily, so an idle connection has one task.
        self._nursery = nursery
        self._task = trio.lowlevel.current_task()
        self.remote = remote
        #: A number unique within the process, shown in presence as ``c<id>``.
        self.id = next(_ids) if conn_id is None else conn_id
        #: Who this is and what it may do; None until authenticated (TCP ``connect``).
        self.claims: Claims | None = None
        self._expires_at: float | None = None
        self._refresh_sent = False
        self._data: dict[str, Any] | None = None
        self.state = ConnectionState.OPEN
        # None rather than an empty deque: an idle connection should not pay for one.
        self._queue: deque[tuple[bytes, int]] | None = None
        self._head_offset = 0
        self._queued_bytes = 0
        self._queued_frames = 0
        self._writer_running = False
        self._drained: trio.Event | None = None
        self._done: trio.Event | None = None
        self._inbox: deque[str | bytes] | None = None
        self._reading = False
        self._scope: trio.CancelScope | None = None
        self._last_rx = trio.current_time()
        # The rate limit's token bucket, kept as the tokens missing from a full
        # bucket: two numbers, refilled lazily when a message arrives, so it needs
        # no timer. The debt is the int 1 after a message that found the bucket
        # full, and the time is _last_rx's own float, so the usual idle connection
        # holds no number objects of its own for them: only the two slots.
        self._rate_debt: float = 0
        self._rate_at = self._last_rx
        self._ping_sent_at: float | None = None
        self._close_code: int | None = None
        self._close_reason: str | None = None
        self._close_deadline = 0.0
        self._close_mode = CLOSE_HANDSHAKE
        self._bytes_in = self._bytes_out = self._msgs_in = self._msgs_out = 0
        self._dropped = 0
        self._slow = False

    # --- framing hooks -----------------------------------------------------------

    def _close_frame(self, code: int, reason: str) -> bytes:
        raise NotImplementedError

    def _ping_frame(self) -> bytes:
        raise NotImplementedError

    def _feed(self, data: bytes) -> None:
        """Parse received bytes; queue complete messages with :meth:`_deliver_in`."""
        raise NotImplementedError

    # --- receiving -------------------------------------------------------------------

    def _deliver_in(self, message: str | bytes) -> None:
        # After we started closing, the handler has been told; late data is dropped.
        if self.state is ConnectionState.OPEN:
            self._msgs_in += 1
            if self._inbox is None:
                self._inbox = deque()
            self._inbox.append(message)

    async def receive(self) -> str | bytes:
        """The next message: ``str`` for text, ``bytes`` for binary.

        Raises :class:`ConnectionClosed` once the connection is closed.
        Messages already received are returned without a checkpoint, so a burst
        from one client is handled in one go (which lets the hub batch it).
        """
        # Reading is inlined here rather than in a helper: this coroutine is on
        # the stack of every idle connection, and each frame costs ~250 bytes.
        while True:
            inbox = self._inbox
            if inbox:
                message = inbox.popleft()
                if not inbox:
                    self._inbox = None
                return message
            if self.state is ConnectionState.CLOSED:
                raise ConnectionClosed(self._close_code, self._close_reason)
            self._reading = True
            with trio.CancelScope(deadline=self._next_deadline()) as scope:
                self._scope = scope
                try:
                    data = await self._transport.receive_some()
                except OSError:
                    data = b""
                finally:
                    self._scope = None
                    self._reading = False
            if scope.cancelled_caught:
                self._on_deadline()
            elif not data:
                if self._close_code is None:
                    self._close_code = CloseCode.ABNORMAL
                    self._close_reason = default_reason(CloseCode.ABNORMAL)
                self._finish()
            else:
                self._last_rx = trio.current_time()
                self._ping_sent_at = None
                self._bytes_in += len(data)
                self._feed(data)

    def receive_nowait(self) -> str | bytes | None:
        """The next message if it has already arrived, else None; never waits.

        A handler can take a burst's run of messages together (the push handler
        sends a run of publishes to a pipelined broker in one write). With the
        parsed messages used up, it reads what the kernel already holds: a
        burst's first frames often come in a chunk of their own, and the rest
        is there by the time they are handled.
        """
        inbox = self._inbox
        if not inbox:
            if self.state is not ConnectionState.OPEN:
                return None
            data = self._transport.try_receive()
            if data is None:
                return None
            self._last_rx = trio.current_time()
            self._ping_sent_at = None
            self._bytes_in += len(data)
            self._feed(data)
            inbox = self._inbox
            if not inbox:
                return None
        message = inbox.popleft()
        if not inbox:
            self._inbox = None
        return message

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> str | bytes:
        try:
            return await self.receive()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    def check_rate(self) -> bool:
        """Count one message against the rate limit (``rate_limit``, ``rate_burst``).

        True: handle it. False: the connection is over its rate; answer
        ``rate_limited`` instead. Refused messages count too, so a client that
        keeps sending gets nothing through until it slows down, and once it is
        ``RATE_CLOSE_FACTOR * rate_burst`` messages in debt it is closed with
        4029. The push protocol calls this for every message; a custom handler
        may call it too.
        """
        cfg = self._config
        rate = cfg.rate_limit
        if not rate:
            return True
        # Messages are counted by arrival: the time the chunk holding them was read.
        now = self._last_rx
        refill = (now - self._rate_at) * rate
        debt = self._rate_debt
        debt = debt - refill + 1 if refill < debt else 1
        self._rate_debt = debt
        self._rate_at = now
        burst = cfg.rate_burst
        if debt <= burst:
            return True
        if debt > (RATE_CLOSE_FACTOR + 1) * burst and self.state is ConnectionState.OPEN:
            log.info("rate limit: %s kept sending after rate_limited replies, closing 4029",
                     self.remote)
            self._start_close(CloseCode.RATE_LIMITED)
        return False

    def _next_deadline(self) -> float:
        if self.state is ConnectionState.CLOSING:
            return self._close_deadline
        if self._ping_sent_at is not None:
            deadline = self._ping_sent_at + self._config.ping_timeout
        else:
            deadline = self._last_rx + self._config.ping_interval
            if self._beats is not None:
                deadline += self._beats.slack  # the sweep pings; see trioserve/net/heartbeat.py
        if self._expires_at is not None and self._expires_at < deadline:
            return self._expires_at
        return deadline

    def set_claims(self, claims: Claims) -> None:
        """Authenticate the connection as *claims* (on connect, or on a token refresh).

        When the claims expire the client is sent ``{"op":"refresh_required"}``
        and has ``refresh_grace`` seconds to refresh before a 4001 close.
        """
        self.claims = claims
        self._refresh_sent = False
        left = seconds_left(claims)
        self._expires_at = None if left is None else trio.current_time() + left
        if self._scope is not None:
            self._scope.deadline = self._next_deadline()

    def ping_if_idle(self, cutoff: float, now: float) -> bool:
        """Send the heartbeat ping if nothing came in since *cutoff* and none is out.

        Called by :class:`~trioserve.net.heartbeat.Heartbeats`, whose ``slack``
        makes the reader's current deadline this ping's timeout.
        """
        if self._last_rx > cutoff or self._ping_sent_at is not None \
                or self.state is not ConnectionState.OPEN:
            return False
        self._ping(now)
        return True

    def _ping(self, now: float) -> None:
        self._ping_sent_at = now
        self._write(self._ping_frame(), 0, limited=False)

    def _on_deadline(self) -> None:
        now = trio.current_time()
        if self.state is ConnectionState.CLOSING:
            log.debug("close handshake with %s timed out; closing", self.remote)
            self._finish()
        elif self._expires_at is not None and now >= self._expires_at:
            if self._refresh_sent:
                self._start_close(CloseCode.UNAUTHORIZED, "unauthorized: token expired")
            else:
                # Token expiry shares the heartbeat's deadline: no timer task per connection.
                self._refresh_sent = True
                self._expires_at = now + self._config.refresh_grace
                self.send_encoded(REFRESH_REQUIRED)
        elif self._ping_sent_at is None:
            self._ping(now)
        elif now >= self._ping_sent_at + self._config.ping_timeout:
            self._start_close(CloseCode.HEARTBEAT_TIMEOUT)
        # Else the sweep pinged late, and the next deadline is that ping's timeout.

    # --- closing ------------------------------------------------------------------------

    def _start_close(
        self, code: int, reason: str | None = None, *, failed: bool = False
    ) -> None:
        if self.state is not ConnectionState.OPEN:
            return
        reason = default_reason(code) if reason is None else reason
        self.state = ConnectionState.CLOSING
        self._close_code = code
        self._close_reason = reason
        self._close_deadline = trio.current_time() + self._config.close_timeout
        self._close_mode = CLOSE_FAILED if failed else CLOSE_HANDSHAKE
        if self._scope is not None:
            self._scope.deadline = self._close_deadline
        self._write(self._close_frame(code, reason), 0, limited=False)

    def start_close(self, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
        """Begin the close handshake without waiting: queued data goes out first,
        then the close frame. The reader finishes the handshake."""
        self._start_close(code, reason)

    async def close(self, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
        """Close with *code* and *reason*, waiting for the handshake.

        Queued data is sent first. If the peer does not answer within
        ``close_timeout`` the connection is closed anyway.
        """
        self._start_close(code, reason)
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        if self._reading or trio.lowlevel.current_task() is not self._task:
            # Another task reads; it will see the peer's close or the deadline.
            with trio.move_on_at(self._close_deadline):
                if self._done is None:
                    self._done = trio.Event()
                await self._done.wait()
            self._finish()
            return
        # This task reads: messages still arriving are dropped (state is CLOSING)
        # until the peer's close, EOF or the close deadline.
        while not self.closed:
            try:
                await self.receive()
            except ConnectionClosed:
                return

    def abort(self) -> None:
        """Close the transport now, without a handshake."""
        if self._close_code is None:
            self._close_code = CloseCode.ABNORMAL
            self._close_reason = "aborted"
        self._finish()

    def _broken(self) -> None:
        if self._close_code is None or self.state is ConnectionState.OPEN:
            self._close_code = CloseCode.ABNORMAL
            self._close_reason = default_reason(CloseCode.ABNORMAL)
        self._finish()

    def _finish(self) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self.state = ConnectionState.CLOSED
        self._queue = None
        self._total.bytes -= self._queued_bytes
        self._queued_bytes = self._queued_frames = 0
        self._transport.close()
        if self._done is not None:
            self._done.set()
        if self._drained is not None:
            self._drained.set()

    # --- introspection ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the transport is closed (handshake done, timed out, or aborted)."""
        return self.state is ConnectionState.CLOSED

    @property
    def data(self) -> dict[str, Any]:
        """Your per-connection state (a nick, a rate limiter...); made on first use,
        so connections that never use it don't pay for a dict."""
        if self._data is None:
            self._data = {}
        return self._data

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the outbound queue (cheaper than :meth:`statistics`)."""
        return self._queued_bytes

    @property
    def queued_frames(self) -> int:
        """Frames waiting in the outbound queue."""
        return self._queued_frames

    @property
    def close_code(self) -> int | None:
        return self._close_code

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    @property
    def transport(self) -> Transport:
        return self._transport

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            transport=self.transport_name,
            state=self.state.value,
            remote=self.remote,
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            messages_in=self._msgs_in,
            messages_out=self._msgs_out,
            queued_frames=self._queued_frames,
            queued_bytes=self._queued_bytes,
            dropped_frames=self._dropped,
            slow_consumer=self._slow,
            close_code=self._close_code,
            close_reason=self._close_reason,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.remote} {self.state.value}>"
