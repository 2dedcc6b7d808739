"""The client's WebSocket connection: a thin adapter over trio-websocket. Internal.

The client needs a few things trio-websocket leaves to its caller: the
upgrade's HTTP status as the client's own exceptions (401 means "stop
reconnecting"), the end of the connection as one exception carrying the close
code, a heartbeat of its own, and an abort that drops the connection at once.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import cast
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from ._errors import ClientError, ConnectError, Unauthorized

log = logging.getLogger("trioserve.client")

#: Close code for "the connection ended without a close frame" (never sent on the wire).
ABNORMAL = 1006
# Messages trio-websocket may read ahead of receive(). One, so that when the
# client stops receiving (a full subscription buffer), trio-websocket stops
# reading the socket too and the backpressure reaches the server.
_MESSAGE_QUEUE_SIZE = 1
_MAX_REJECT_TEXT = 500

_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class Closed(Exception):
    """The WebSocket ended: the peer's close code and reason, or 1006."""

    def __init__(self, code: int, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@attrs.frozen
class WsUrl:
    """A parsed ``ws://`` / ``wss://`` URL."""

    secure: bool
    host: str
    port: int
    target: str

    @classmethod
    def parse(cls, url: str) -> WsUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"no host in {url!r}")
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(secure, parts.hostname, port, target)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.secure else 80
        return host if self.port == default else f"{host}:{self.port}"


class _ReaderTask:
    """Stands in for the client's nursery when trio-websocket starts its reader task.

    trio-websocket performs the upgrade in that task: a refused upgrade is
    raised there (``ConnectionRejected``), and a server that hangs up during the
    upgrade just ends it, while ``wrap_client_stream()`` keeps waiting for a
    handshake that will never come. Wrapping the task lets :meth:`WebSocket.open`
    fail at once in both cases, keeps trio-websocket's exceptions out of the
    client's nursery (one bad connection must not end the client), and gives
    :meth:`WebSocket.abort` a scope to cancel.
    """

    def __init__(self, nursery: trio.Nursery):
        self._nursery = nursery
        self.scope = trio.CancelScope()
        #: Cancelled when the reader ends, so a wait for the handshake ends too.
        self.handshake = trio.CancelScope()
        self.error: Exception | None = None

    def start_soon(self, async_fn: Callable[[], Awaitable[object]], name: object = None) -> None:
        self._nursery.start_soon(self._run, async_fn, name=name)

    async def _run(self, async_fn: Callable[[], Awaitable[object]]) -> None:
        with self.scope:
            try:
                await async_fn()
            except Exception as exc:  # the connection is over; receive() reports it
                log.debug("the WebSocket reader failed: %r", exc)
                self.error = exc
        self.handshake.cancel()


class WebSocket:
    """One client WebSocket connection.

    One task calls :meth:`receive`; any task may call :meth:`send_text`.
    trio-websocket answers the server's pings. When the server has been silent
    for *ping_interval* seconds, :meth:`receive` pings it and gives up (code
    1006) if neither the pong nor a message arrives within *ping_timeout* more.
    """

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        stream: _Stream,
        reader: _ReaderTask,
        *,
        ping_interval: float | None,
        ping_timeout: float,
    ):
        self._ws = ws
        self._stream = stream
        self._reader = reader
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._closed: Closed | None = None
        self._closing = False
        self._close_done = trio.Event()

    @classmethod
    async def open(
        cls,
        nursery: trio.Nursery,
        url: WsUrl,
        *,
        headers: list[tuple[str, str]],
        ssl_context: ssl.SSLContext | None,
        max_message_size: int,
        ping_interval: float | None,
        ping_timeout: float,
    ) -> WebSocket:
        """Connect and upgrade. Raises :class:`ConnectError` or :class:`Unauthorized`.

        trio-websocket's reader task runs in *nursery*, which must outlive the
        connection. No timeout here: the caller bounds the whole attempt.
        """
        stream = await _open_stream(url, ssl_context)
        reader = _ReaderTask(nursery)
        try:
            with reader.handshake:
                # wrap_client_stream rather than connect_websocket_url: the
                # client keeps the stream, because trio-websocket does not close
                # it after the server closes the connection; and the Host header
                # brackets an IPv6 address.
                ws = await trio_websocket.wrap_client_stream(
                    cast(trio.Nursery, reader),
                    stream,
                    url.host_header,
                    url.target,
                    extra_headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                    message_queue_size=_MESSAGE_QUEUE_SIZE,
                    max_message_size=max_message_size,
                )
                return cls(ws, stream, reader, ping_interval=ping_interval, ping_timeout=ping_timeout)
            raise _upgrade_error(reader.error)
        except BaseException:
            reader.scope.cancel()
            _close_socket(stream)
            raise

    # --- sending ---------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send one text message. Raises :class:`Closed` if the connection is gone.

        Messages go out in call order (trio-websocket sends under a FIFO lock).
        """
        try:
            await self._ws.send_message(text)
        except trio_websocket.ConnectionClosed as exc:
            raise self._closed_by(exc) from None

    # --- receiving -------------------------------------------------------------------

    async def receive(self) -> str:
        """The next text message. Raises :class:`Closed` when the connection ends."""
        message = await self._receive()
        if isinstance(message, str):
            return message
        if self._closing:
            # Our own close: end once the closing handshake is over, so that
            # the caller's abort() does not cut it short.
            await self._close_done.wait()
        raise message

    async def _receive(self) -> str | Closed:
        if self._ping_interval is None:
            return await self._next()
        while True:
            with trio.move_on_after(self._ping_interval):
                return await self._next()
            message = await self._next_or_pong()
            if message is not None:
                return message

    async def _next_or_pong(self) -> str | Closed | None:
        """Ping the server: the next message if one comes first, None on the pong.

        Messages are taken while waiting because trio-websocket reads the pong
        only after the messages that came before it have been taken.
        """
        message: str | Closed | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ping, nursery.cancel_scope)
            message = await self._next()
            nursery.cancel_scope.cancel()
        return message

    async def _ping(self, on_pong: trio.CancelScope) -> None:
        with trio.move_on_after(self._ping_timeout):
            try:
                await self._ws.ping()
            except trio_websocket.ConnectionClosed:
                return  # receiving reports the close
            on_pong.cancel()
            return
        self._fail(ABNORMAL, "heartbeat timeout: the server stopped answering")

    async def _next(self) -> str | Closed:
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                return self._closed_by(exc)
            if isinstance(message, str):
                return message
            log.debug("ignoring a binary message from the server")

    def _closed_by(self, exc: trio_websocket.ConnectionClosed) -> Closed:
        if self._closed is None:
            reason = exc.reason
            if reason is not None and reason.code != ABNORMAL:
                self._closed = Closed(reason.code, reason.reason or "")
            elif self._reader.error is not None:
                self._closed = Closed(ABNORMAL, f"protocol error: {self._reader.error!r}")
            else:
                self._closed = Closed(ABNORMAL, "connection lost")
        return self._closed

    # --- closing ---------------------------------------------------------------------

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake: send a close frame and wait for the server's.

        :meth:`receive` raises :class:`Closed` once this returns.
        """
        self._closing = True
        try:
            await self._ws.aclose(code, reason or None)
        finally:
            self._close_done.set()

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake."""
        self._fail(ABNORMAL, "aborted")

    def _fail(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = Closed(code, reason)
        # Cancelled as well as the socket closed: the reader may be waiting to
        # hand over a message, which closing the socket does not interrupt.
        self._reader.scope.cancel()
        _close_socket(self._stream)


async def _open_stream(url: WsUrl, ssl_context: ssl.SSLContext | None) -> _Stream:
    try:
        if not url.secure:
            return await trio.open_tcp_stream(url.host, url.port)
        stream = await trio.open_ssl_over_tcp_stream(
            url.host, url.port, ssl_context=ssl_context or ssl.create_default_context()
        )
        try:
            # Here rather than in trio-websocket's reader, which would report a
            # refused certificate as the server hanging up.
            await stream.do_handshake()
        except BaseException:
            _close_socket(stream)
            raise
        return stream
    except (OSError, trio.BrokenResourceError) as exc:
        why = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
        raise ConnectError(f"cannot connect to {url.host_header}: {why}") from exc


def _close_socket(stream: _Stream) -> None:
    # Synchronous, so it also works while cancelled; trio wakes any task
    # waiting on the socket.
    sock_stream = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    sock_stream.socket.close()


def _upgrade_error(error: Exception | None) -> ClientError:
    if not isinstance(error, trio_websocket.ConnectionRejected):
        exc = ConnectError("the server closed the connection during the WebSocket upgrade")
        exc.__cause__ = error
        return exc
    status = error.status_code
    text = (error.body or b"").decode("utf-8", "replace").strip()[:_MAX_REJECT_TEXT]
    if status == 401:
        return Unauthorized(f"the server refused the WebSocket upgrade with HTTP 401: {text}")
    return ConnectError(f"the server refused the WebSocket upgrade with HTTP {status}: {text}", status=status)
