"""Newline-delimited JSON framing for the raw TCP transport, without I/O.

One message per ``\\n``-terminated line. The splitter enforces a maximum line
length *while* buffering, so a peer that never sends a newline cannot make the
server hold more than one line's worth of bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

__all__ = [
    "LineSplitter",
    "LineTooLong",
    "close_line",
    "control_op",
    "frame_batch",
    "line",
    "pong_reply",
    "PING_LINE",
    "PONG_LINE",
]

PING_LINE = b'{"op":"ping"}\n'
# What a client sends back when the server pings it.
PONG_LINE = b'{"op":"pong"}\n'
# A heartbeat line is tiny; anything longer is an application message, and
# checking the length first keeps the JSON parse off the path of real traffic.
_CONTROL_MAX = 64


class LineTooLong(Exception):
    """A line (or the unterminated tail of the stream) is over the limit.

    ``lines`` holds the complete lines that came before it in the same data:
    they are valid messages and must still be handled.
    """

    def __init__(self, message: str, lines: list[bytes] | None = None):
        super().__init__(message)
        self.lines = lines or []


class LineSplitter:
    """Cuts a byte stream into lines, each without its newline (and optional ``\\r``)."""

    __slots__ = ("_buf", "max_length")

    def __init__(self, max_length: int):
        self.max_length = max_length
        # bytes, not bytearray: an idle connection then holds the shared b"".
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a complete line."""
        return len(self._buf)

    def _check_tail(self, tail: bytes) -> bytes:
        # A held tail may end in the \r of a CRLF whose \n is in the next chunk;
        # that \r is not part of the line, so it must not count against the limit.
        size = len(tail) - 1 if tail.endswith(b"\r") else len(tail)
        if size > self.max_length:
            raise LineTooLong(f"line longer than {self.max_length} bytes")
        return tail

    def feed(self, data: bytes) -> list[bytes]:
        """Add *data*; return the complete lines it finished, in order.

        Raises :class:`LineTooLong` when a line exceeds ``max_length`` bytes.
        """
        buf = self._buf + data if self._buf else data
        if b"\n" not in data:
            self._buf = self._check_tail(buf)
            return []
        parts = buf.split(b"\n")
        tail = parts.pop()
        lines: list[bytes] = []
        for p in parts:
            if p.endswith(b"\r"):
                p = p[:-1]
            if len(p) > self.max_length:
                raise LineTooLong(f"line longer than {self.max_length} bytes", lines)
            if p:
                lines.append(p)
        try:
            self._buf = self._check_tail(tail)
        except LineTooLong as exc:
            exc.lines = lines
            raise
        return lines


def line(payload: bytes) -> bytes:
    """One NDJSON line for a JSON payload (which never contains a raw newline)."""
    return payload + b"\n"


def frame_batch(payloads: Sequence[bytes]) -> bytes:
    """Lines for *payloads*, joined into one buffer for one ``send()``."""
    if not payloads:
        return b""
    if len(payloads) == 1:
        return payloads[0] + b"\n"
    return b"\n".join(payloads) + b"\n"


def pong_reply(id: object = None) -> bytes:
    """The server's answer to a client's ping line.

    The same shape as the push protocol's reply to ``{"op":"ping"}`` on
    WebSocket, so one client can handle both transports alike.
    """
    body: dict[str, object] = {} if id is None else {"id": id}
    body["ok"] = True
    body["op"] = "pong"
    return orjson.dumps(body) + b"\n"


def close_line(code: int, reason: str) -> bytes:
    """The last line the server sends before it closes a TCP connection."""
    return orjson.dumps({"op": "close", "code": code, "reason": reason}) + b"\n"


def control_op(text: str) -> tuple[str, object] | None:
    """``("ping", id)`` or ``("pong", id)`` for heartbeat lines, else None.

    Heartbeats are handled by the connection, so application handlers on TCP
    see only their own messages, exactly as on WebSocket.
    """
    if len(text) > _CONTROL_MAX or "p" not in text:
        return None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and obj.get("op") in ("ping", "pong") and len(obj) <= 2:
        if len(obj) == 1 or "id" in obj:
            return obj["op"], obj.get("id")
    return None
