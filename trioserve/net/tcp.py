"""Raw TCP connections carrying newline-delimited JSON."""

from __future__ import annotations

import trio

from ..config import Config
from ..protocol import ndjson
from ..protocol.codes import CloseCode
from .connection import Connection
from .heartbeat import Heartbeats
from .outbound import CLOSE_FAILED, ConnectionState, Framing, QueueTotal
from .transport import Transport

__all__ = ["NDJSON", "TcpConnection"]

NDJSON = Framing("ndjson", ndjson.frame_batch)


class TcpConnection(Connection):
    """A raw TCP connection carrying newline-delimited JSON."""

    framing = NDJSON
    transport_name = "tcp"

    __slots__ = ("_lines",)

    def __init__(
        self,
        transport: Transport,
        config: Config,
        nursery: trio.Nursery,
        remote: str | None = None,
        *,
        queue_total: QueueTotal | None = None,
        heartbeats: Heartbeats | None = None,
    ):
        super().__init__(transport, config, nursery, remote, queue_total=queue_total,
                         heartbeats=heartbeats)
        self._lines = ndjson.LineSplitter(config.max_message_size)

    def frame(self, message: str | bytes) -> bytes:
        return (message.encode() if isinstance(message, str) else message) + b"\n"

    def _close_frame(self, code: int, reason: str) -> bytes:
        return ndjson.close_line(code, reason)

    def _ping_frame(self) -> bytes:
        return ndjson.PING_LINE

    def _on_close_sent(self) -> None:
        # TCP has no close frame to wait for: send EOF and let the reader wait for the peer's.
        self._transport.shutdown_write()

    def _feed(self, data: bytes) -> None:
        if self._close_mode is CLOSE_FAILED:
            return
        too_long = False
        try:
            lines = self._lines.feed(data)
        except ndjson.LineTooLong as exc:
            # The complete lines before the over-long one are valid messages:
            # deliver them first, as WebSocket does with messages before an
            # oversized one.
            lines, too_long = exc.lines, True
        for raw in lines:
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                self._start_close(CloseCode.INVALID_DATA, "invalid UTF-8", failed=True)
                return
            control = ndjson.control_op(text)
            if control is None:
                self._deliver_in(text)
            elif control[0] == "ping" and self.state is ConnectionState.OPEN:
                # Pings count against the rate limit like any message; over it, no pong.
                if self.check_rate():
                    self._write(ndjson.pong_reply(control[1]), 0, limited=False)
        if too_long:
            self._start_close(CloseCode.MESSAGE_TOO_BIG, "line too long", failed=True)
