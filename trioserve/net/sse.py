"""Server-Sent Events connections: a ``text/event-stream`` response that stays open.

After ``GET /sse`` the HTTP driver (:mod:`.httpd`) hands the socket over, as it
does after a WebSocket upgrade, and the stream is a :class:`Connection` like
any other: admission, the outbound queue and its slow-consumer policy, the
heartbeat sweep, drain and metrics apply unchanged. Only the framing differs:

* the 200 head is written by :meth:`SseConnection.accept`, so a refusal
  before it (a bad token, a forbidden topic) is an ordinary HTTP error answer;
* publications are framed once per batch for every stream, with the last
  event left open (``frame_open``); each stream ends it with its own ``id:``
  (its cursor, made by a :class:`Resumable` the push layer attaches), in the
  same ``send()``;
* a heartbeat is a comment line. The peer sends nothing after its request, so
  a ping the kernel takes counts as an answer; one that stays queued for
  ``ping_timeout`` closes the stream (a dead peer);
* a close is a last ``event: close`` (code, reason) and a jittered ``retry:``,
  then EOF: the response is delimited by the connection's close, which every
  HTTP/1.1 client and EventSource reads.

This layer knows no topics: to it a topic is the opaque key of ``send_at``.
"""

from __future__ import annotations

import random
from typing import Protocol

import orjson
import trio

from ..config import Config
from ..protocol import sse
from ..protocol.codes import CloseCode, ErrorCode
from .connection import Connection
from .heartbeat import Heartbeats
from .httpd import Request
from .outbound import CLOSE_FAILED, ConnectionState, Framing, QueueTotal
from .transport import Transport

__all__ = ["SSE", "Resumable", "SseConnection", "http_error", "retry_jitter"]

SSE = Framing("sse", sse.frame_batch, sse.frame_open)

#: ``retry:`` at the start of a stream, in milliseconds.
START_RETRY_MS = 2000
#: A closed stream's ``retry:`` is drawn from this range (ms), so that a drain's
#: or a restart's clients do not all come back at the same instant.
CLOSE_RETRY_MS = (1000, 5000)

_STATUS_TEXT = {200: b"OK", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
                403: b"Forbidden", 405: b"Method Not Allowed", 500: b"Internal Server Error",
                503: b"Service Unavailable"}
#: The HTTP answer of a stream closed before its head went out, by close code.
_HTTP_FOR_CLOSE: dict[int, tuple[int, ErrorCode]] = {
    CloseCode.UNAUTHORIZED: (401, ErrorCode.UNAUTHORIZED),
    CloseCode.POLICY_VIOLATION: (403, ErrorCode.FORBIDDEN),
    CloseCode.GOING_AWAY: (503, ErrorCode.UNAVAILABLE),
    CloseCode.TRY_AGAIN_LATER: (503, ErrorCode.UNAVAILABLE),
    CloseCode.INTERNAL_ERROR: (500, ErrorCode.INTERNAL),
}
_STREAM_HEADERS = (
    (b"server", b"trioserve"),
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-store"),
    # nginx buffers responses unless told not to; a stream must not wait there.
    (b"x-accel-buffering", b"no"),
    (b"connection", b"close"),
)


def retry_jitter() -> int:
    return random.randint(*CLOSE_RETRY_MS)


def _head(status: int, headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _STATUS_TEXT.get(status, b"Error"))]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def http_error(status: int, code: str, message: str,
               headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A whole HTTP error answer, in the shape of every other error answer."""
    body = orjson.dumps({"ok": False, "error": {"code": code, "message": message}})
    return _head(status, [(b"server", b"trioserve"), (b"content-type", b"application/json"),
                          (b"content-length", b"%d" % len(body)), (b"connection", b"close"),
                          *headers]) + body


class Resumable(Protocol):
    """A stream's position over its topics (the push layer's cursor)."""

    def id_line(self, key: str, offset: int) -> bytes:
        """Advance *key* to *offset*; the ``id:`` line that ends the event."""
        ...


class SseConnection(Connection):
    """One ``GET /sse`` response, open until either side ends it."""

    framing = SSE
    transport_name = "sse"

    __slots__ = ("_cors", "_head_sent", "_refusal", "cursor", "request")

    def __init__(
        self,
        transport: Transport,
        config: Config,
        nursery: trio.Nursery,
        remote: str | None,
        request: Request,
        cors: list[tuple[bytes, bytes]],
        *,
        queue_total: QueueTotal | None = None,
        heartbeats: Heartbeats | None = None,
        conn_id: int | None = None,
    ):
        super().__init__(transport, config, nursery, remote, queue_total=queue_total,
                         heartbeats=heartbeats, conn_id=conn_id)
        #: The request that opened the stream, until the handler takes it.
        self.request: Request | None = request
        #: Set by the handler before the first publication.
        self.cursor: Resumable | None = None
        self._cors = cors
        self._head_sent = False
        self._refusal: tuple[int, str] | None = None

    def take_request(self) -> Request:
        request = self.request
        assert request is not None, "the request was taken already"
        self.request = None
        return request

    def accept(self, first: bytes = b"") -> bool:
        """Send the 200 head, the ``retry:`` field and *first* (recovered events) at once."""
        if self.state is not ConnectionState.OPEN or self._head_sent:
            return False
        self._head_sent = True
        head = _head(200, (*_STREAM_HEADERS, *self._cors))
        self._cors = []
        self._write(head + sse.retry_field(START_RETRY_MS) + first, 0, limited=False)
        return True

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer an HTTP error instead of the stream (before :meth:`accept`)."""
        self._refusal = (status, code)
        self._start_close(CloseCode.UNAUTHORIZED if status == 401 else CloseCode.POLICY_VIOLATION,
                          message)

    # --- the hub's call ---------------------------------------------------------------

    def send_at(self, data: bytes, count: int, key: str, offset: int) -> bool:
        """Send publications framed by ``frame_open``, ended with this stream's id."""
        if self.state is not ConnectionState.OPEN:
            return False
        cursor = self.cursor
        # One buffer, one send(): the copy of a batch costs less than a system call.
        self._write(data + (b"\n" if cursor is None else cursor.id_line(key, offset)), count,
                    limited=True)
        return True

    # --- framing hooks -----------------------------------------------------------------

    def frame(self, message: str | bytes) -> bytes:
        return sse.frame_batch((message.encode() if isinstance(message, str) else message,))

    def _close_frame(self, code: int, reason: str) -> bytes:
        if not self._head_sent:
            self._head_sent = True
            status, error = self._refusal or _HTTP_FOR_CLOSE.get(code, (400, ErrorCode.BAD_REQUEST))
            cors, self._cors = self._cors, []
            return http_error(status, str(error), reason, cors)
        return sse.close_event(code, reason, retry_jitter())

    def _ping_frame(self) -> bytes:
        return sse.COMMENT

    def _ping(self, now: float) -> None:
        if self._head_sent:
            self._write(sse.COMMENT, 0, limited=False)
        if self._queue is None:
            # The kernel took it: the peer's window is open, which is all a
            # stream's peer can tell us (it sends nothing).
            self._last_rx = now
        else:
            self._ping_sent_at = now
        if self._scope is not None:
            self._scope.deadline = self._next_deadline()

    def _flushed(self) -> None:
        if self._ping_sent_at is not None and self.state is ConnectionState.OPEN:
            self._ping_sent_at = None
            self._last_rx = trio.current_time()
            if self._scope is not None:
                self._scope.deadline = self._next_deadline()
        super()._flushed()

    def _on_close_sent(self) -> None:
        # The response ends with the connection: send EOF and wait for the peer's.
        self._transport.shutdown_write()

    def _feed(self, data: bytes) -> None:
        # A stream's client has nothing to say after its request; whatever it
        # sends (a pipelined request) is read and dropped, and EOF ends the stream.
        if self._close_mode is CLOSE_FAILED:
            return
