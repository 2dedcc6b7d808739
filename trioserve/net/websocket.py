"""WebSocket connections after the 101: wsproto parses, the base class sends."""

from __future__ import annotations

import logging

import trio
import wsproto.events as wse
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState as WSState
from wsproto.connection import ConnectionType
from wsproto.extensions import Extension

from ..config import Config
from ..protocol import deflate, websocket
from ..protocol.codes import CloseCode
from .connection import Connection
from .heartbeat import Heartbeats
from .outbound import CLOSE_FAILED, CLOSE_REPLIED, ConnectionState, Framing, QueueTotal
from .transport import Transport

__all__ = ["WEBSOCKET", "WEBSOCKET_DEFLATE", "DeflateWebSocketConnection", "WebSocketConnection"]

log = logging.getLogger("trioserve.connection")

_PING_FRAME = b"\x89\x00"
_EXTENSION_ERROR = "error in extension"

WEBSOCKET = Framing("websocket", websocket.frame_batch)
#: Connections that negotiated permessage-deflate: the hub compresses each batch
#: once for all of them (see trioserve/protocol/deflate.py).
WEBSOCKET_DEFLATE = Framing("websocket-deflate", deflate.frame_batch)


class WebSocketConnection(Connection):
    """A WebSocket connection after the 101 response, parsed by wsproto."""

    framing = WEBSOCKET
    transport_name = "websocket"

    __slots__ = ("_parts", "_parts_size", "_ws")

    def __init__(
        self,
        transport: Transport,
        config: Config,
        nursery: trio.Nursery,
        remote: str | None = None,
        trailing_data: bytes = b"",
        *,
        queue_total: QueueTotal | None = None,
        heartbeats: Heartbeats | None = None,
        conn_id: int | None = None,
    ):
        super().__init__(transport, config, nursery, remote, queue_total=queue_total,
                         heartbeats=heartbeats, conn_id=conn_id)
        self._ws = WSConnection(ConnectionType.SERVER, self._extensions())
        self._parts: list[str | bytes] | None = None
        self._parts_size = 0
        if trailing_data:
            self._bytes_in += len(trailing_data)
            self._feed(trailing_data)

    def _extensions(self) -> list[Extension] | None:
        return None

    def frame(self, message: str | bytes) -> bytes:
        if isinstance(message, str):
            return websocket.text_frame(message.encode())
        return self._ws.send(wse.BytesMessage(data=message))

    def _close_frame(self, code: int, reason: str) -> bytes:
        if self._ws.state in (WSState.OPEN, WSState.REMOTE_CLOSING):
            return self._ws.send(wse.CloseConnection(code=code, reason=reason))
        return websocket.close_frame(code, reason)

    def _ping_frame(self) -> bytes:
        return _PING_FRAME

    def _too_big(self, data: str | bytes) -> bool:
        limit = self._config.max_message_size
        size = self._parts_size + len(data)
        # A str's UTF-8 size is between len and 4*len; encode only when in doubt.
        if size > limit or isinstance(data, bytes) or (size + 3 * len(data)) <= limit:
            return size > limit
        return self._parts_size + len(data.encode()) > limit

    def _feed(self, data: bytes) -> None:
        if self._close_mode is CLOSE_FAILED:
            return
        ws = self._ws
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, (wse.TextMessage, wse.BytesMessage)):
                self._on_message_part(event)
            elif isinstance(event, wse.Ping):
                # Ping frames count against the rate limit like messages; over it, no pong.
                if self.state is ConnectionState.OPEN and self.check_rate():
                    self._write(ws.send(event.response()), 0, limited=False)
            elif isinstance(event, wse.CloseConnection):
                self._on_close_event(event)
                return
            if self._close_mode is CLOSE_FAILED:
                return
        # A message whose frame header already announces more than the limit is
        # refused now, not after max_message_size bytes of it have been read.
        # (_parts_size counts a text message's characters: never more than its bytes.)
        remainder = websocket.announced_remainder(ws, self._parts is not None)
        if remainder and self._parts_size + remainder > self._config.max_message_size \
                and self.state is ConnectionState.OPEN:
            self._start_close(CloseCode.MESSAGE_TOO_BIG, failed=True)

    def _on_message_part(self, event: wse.TextMessage | wse.BytesMessage) -> None:
        data = event.data if isinstance(event.data, str) else bytes(event.data)
        if self._too_big(data):
            self._start_close(CloseCode.MESSAGE_TOO_BIG, failed=True)
            return
        if event.message_finished and self._parts is None:
            self._deliver_in(data)
            return
        if self._parts is None:
            self._parts = []
        self._parts.append(data)
        self._parts_size += len(data)
        if event.message_finished:
            parts, self._parts, self._parts_size = self._parts, None, 0
            self._deliver_in("".join(parts) if isinstance(data, str) else b"".join(parts))  # type: ignore[arg-type]

    def _on_close_event(self, event: wse.CloseConnection) -> None:
        ws_state = self._ws.state
        if ws_state is WSState.CLOSED:
            # The peer answered our close: RFC 6455 lets the server close TCP first.
            self._finish()
        elif ws_state is WSState.REMOTE_CLOSING:
            if self.state is ConnectionState.OPEN:
                self.state = ConnectionState.CLOSING
                self._close_code = event.code
                self._close_reason = event.reason
                self._close_deadline = trio.current_time() + self._config.close_timeout
            self._close_mode = CLOSE_REPLIED
            self._write(self._ws.send(event.response()), 0, limited=False)
        else:
            # wsproto reports a malformed frame as a close event while still OPEN.
            log.debug("protocol error from %s: %s %s", self.remote, event.code, event.reason)
            # wsproto names every extension failure "error in extension": the
            # code's own reason ("message too big", "invalid data") says more.
            reason = None if event.reason == _EXTENSION_ERROR else event.reason
            self._start_close(event.code, reason, failed=True)


class DeflateWebSocketConnection(WebSocketConnection):
    """A WebSocket connection that negotiated permessage-deflate with
    ``server_no_context_takeover`` and ``client_no_context_takeover``.

    It holds no zlib object of its own: the hub frames publications for it with
    :data:`WEBSOCKET_DEFLATE`, compressed once per batch for every such
    subscriber, and a compressed client message is inflated by a decompressor
    that lives for that message only.
    """

    framing = WEBSOCKET_DEFLATE

    __slots__ = ()

    def _extensions(self) -> list[Extension] | None:
        return [deflate.InboundDeflate(self._config.max_message_size)]

    def frame(self, message: str | bytes) -> bytes:
        if isinstance(message, str):
            return deflate.compressed_text_frame(message.encode())
        return super().frame(message)
