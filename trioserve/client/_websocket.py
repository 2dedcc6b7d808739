"""A small WebSocket client connection: wsproto over a trio stream. Internal.

The client needs less than a general WebSocket library and a little more
control: one reader task, text messages only, the upgrade's HTTP status (401
means "stop reconnecting"), the close code, and a heartbeat of its own.
wsproto is already a dependency of the server, so the client adds none.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from urllib.parse import quote, urlsplit

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState as WsState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from ._errors import ConnectError, Unauthorized

__all__ = ["Closed", "WebSocket", "WsUrl"]

log = logging.getLogger("trioserve.client")

#: Close code for "the connection ended without a close frame" (never sent on the wire).
ABNORMAL = 1006
_RECV_SIZE = 65536
_MAX_REJECT_BODY = 4096


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

    def with_query(self, name: str, value: str) -> str:
        """The target with ``name=value`` appended to the query string."""
        sep = "&" if "?" in self.target else "?"
        return f"{self.target}{sep}{name}={quote(value, safe='')}"


class WebSocket:
    """One client WebSocket connection.

    One task calls :meth:`receive`; any task may call :meth:`send_text`. Pings
    from the server are answered inside :meth:`receive`; when the server has
    been silent for *ping_interval* seconds, :meth:`receive` pings it and gives
    up (code 1006) if nothing arrives within *ping_timeout* more.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: WSConnection,
        events: deque[Event],
        *,
        max_message_size: int,
        ping_interval: float | None,
        ping_timeout: float,
    ):
        self._stream = stream
        self._ws = ws
        self._events = events
        self._send_lock = trio.StrictFIFOLock()
        self._max_message_size = max_message_size
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._parts: list[str] = []
        self._size = 0
        self._closed: Closed | None = None

    @classmethod
    async def open(
        cls,
        url: WsUrl,
        *,
        target: str,
        headers: list[tuple[str, str]],
        ssl_context: ssl.SSLContext | None,
        max_message_size: int,
        ping_interval: float | None,
        ping_timeout: float,
    ) -> WebSocket:
        """Connect and upgrade. Raises :class:`ConnectError` or :class:`Unauthorized`.

        No timeout here: the caller bounds the whole handshake.
        """
        try:
            stream: trio.abc.Stream
            if url.secure:
                stream = await trio.open_ssl_over_tcp_stream(
                    url.host, url.port, ssl_context=ssl_context or ssl.create_default_context()
                )
            else:
                stream = await trio.open_tcp_stream(url.host, url.port)
        except OSError as exc:
            raise ConnectError(f"cannot connect to {url.host_header}: {exc}") from exc
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            request = Request(
                host=url.host_header,
                target=target,
                extra_headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            )
            await stream.send_all(ws.send(request))
            events: deque[Event] = deque()
            while True:
                data = bytes(await stream.receive_some(_RECV_SIZE))
                if not data:
                    raise ConnectError("the server closed the connection during the WebSocket upgrade")
                ws.receive_data(data)
                events.extend(ws.events())
                while events:
                    event = events.popleft()
                    if isinstance(event, AcceptConnection):
                        return cls(
                            stream, ws, events,
                            max_message_size=max_message_size,
                            ping_interval=ping_interval,
                            ping_timeout=ping_timeout,
                        )
                    if isinstance(event, RejectConnection):
                        await cls._rejected(stream, ws, events, event.status_code)
        except (OSError, trio.BrokenResourceError) as exc:
            await trio.aclose_forcefully(stream)
            raise ConnectError(f"WebSocket upgrade failed: {exc}") from exc
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    @staticmethod
    async def _rejected(stream: trio.abc.Stream, ws: WSConnection, events: deque[Event], status: int) -> None:
        body = b""
        with trio.move_on_after(1):
            while len(body) < _MAX_REJECT_BODY:
                while events:
                    event = events.popleft()
                    if isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            raise _reject_error(status, body)
                data = bytes(await stream.receive_some(_RECV_SIZE))
                if not data:
                    break
                ws.receive_data(data)
                events.extend(ws.events())
        raise _reject_error(status, body)

    # --- sending ---------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send one text message. Raises :class:`Closed` if the connection is gone."""
        await self._send_event(TextMessage(data=text))

    async def _send_event(self, event: Event) -> None:
        # The lock is the first thing awaited, so senders go out in call order.
        async with self._send_lock:
            if self._closed is not None or self._ws.state is not WsState.OPEN:
                raise self._closed or Closed(ABNORMAL, "connection closing")
            data = self._ws.send(event)
            try:
                await self._stream.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Closed(ABNORMAL, f"send failed: {exc}") from None

    async def _send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # --- receiving -------------------------------------------------------------------

    async def receive(self) -> str:
        """The next text message. Raises :class:`Closed` when the connection ends."""
        while True:
            while self._events:
                text = await self._handle(self._events.popleft())
                if text is not None:
                    return text
            if self._closed is not None:
                raise self._closed
            data = await self._receive_some()
            if not data:
                self._end(ABNORMAL, "connection lost")
                continue
            try:
                self._ws.receive_data(data)
            except Exception as exc:  # wsproto refuses data after a close
                self._end(ABNORMAL, f"protocol error: {exc}")
                continue
            self._events.extend(self._ws.events())

    async def _receive_some(self) -> bytes:
        pinged = False
        while True:
            timeout = self._ping_timeout if pinged else self._ping_interval
            with trio.move_on_after(float("inf") if timeout is None else timeout):
                try:
                    return bytes(await self._stream.receive_some(_RECV_SIZE))
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    return b""
            if pinged:
                self._end(ABNORMAL, "heartbeat timeout: the server stopped answering")
                return b""
            pinged = True
            try:
                await self._send_event(Ping(payload=b"trioserve-client"))
            except Closed:
                return b""

    async def _handle(self, event: Event) -> str | None:
        if isinstance(event, TextMessage):
            self._size += len(event.data)
            if self._size > self._max_message_size:
                await self.close(1009, "message too big")
                self._end(1009, f"a message from the server is over {self._max_message_size} bytes")
                return None
            self._parts.append(event.data)
            if not event.message_finished:
                return None
            text = "".join(self._parts)
            self._parts.clear()
            self._size = 0
            return text
        if isinstance(event, Ping):
            await self._send_bytes(self._ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self._ws.state is WsState.REMOTE_CLOSING:
                await self._send_bytes(self._ws.send(event.response()))
            self._end(event.code, event.reason or "")
        elif isinstance(event, BytesMessage):
            log.debug("ignoring a binary message from the server")
        return None

    def _end(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = Closed(code, reason)
        self._stream_close()

    def _stream_close(self) -> None:
        # Synchronous close: SocketStream and SSLStream both close their socket
        # at once; aclose_forcefully would need a checkpoint.
        stream = self._stream
        sock_stream = getattr(stream, "transport_stream", stream)
        if isinstance(sock_stream, trio.SocketStream):
            sock_stream.socket.close()

    # --- closing ---------------------------------------------------------------------

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (if the connection is still open); the reader sees the echo."""
        async with self._send_lock:
            if self._closed is not None or self._ws.state is not WsState.OPEN:
                return
            data = self._ws.send(CloseConnection(code=code, reason=reason))
            try:
                await self._stream.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                self._end(ABNORMAL, "connection lost")

    def abort(self) -> None:
        """Close the socket now, without a handshake."""
        self._end(ABNORMAL, "aborted")


def _reject_error(status: int, body: bytes) -> Exception:
    text = body.decode("utf-8", "replace").strip()[:500]
    if status == 401:
        return Unauthorized(f"the server refused the WebSocket upgrade with HTTP 401: {text}")
    return ConnectError(f"the server refused the WebSocket upgrade with HTTP {status}: {text}", status=status)
