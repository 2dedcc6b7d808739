"""Small real-socket clients for the system tests.

They are written from RFC 6455 / HTTP/1.1 directly rather than with wsproto or
h11, so a bug shared by the server's parser and a client library cannot hide
itself, and so a test can send exactly the bytes it means to (bad keys,
unmasked or oversize frames, a client that stops reading).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio
import trio_websocket

HOST = "127.0.0.1"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll *predicate* until it holds.

    Only for server-internal state that has no event a test could await (a
    connection leaving ``server.connections``); network replies are awaited.
    """
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def close_code(exc: trio_websocket.ConnectionClosed) -> int | None:
    """The close code trio-websocket recorded (the one the server sent)."""
    return None if exc.reason is None else exc.reason.code


async def open_socket(port: int, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Before connect(), or the window scale is already agreed on and the
        # kernel keeps advertising a big window.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


# --- HTTP ---------------------------------------------------------------------------------


@attrs.frozen
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    assert version.startswith("HTTP/1."), lines[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status), (reason[0] if reason else ""), headers


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some(65536):
        chunks.append(data)
    return b"".join(chunks)


async def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    raw_head: bytes | None = None,
) -> HttpResponse:
    """One request with ``Connection: close``; the response is read to EOF.

    *raw_head* replaces the generated request head (request line + headers +
    blank line) for requests a well-behaved client would not send.
    """
    if raw_head is None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        raw_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    stream = await open_socket(port)
    async with stream:
        await stream.send_all(raw_head + body)
        data = await read_until_eof(stream)
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP response head in {data[:200]!r}"
    status, reason, hdrs = _parse_head(head)
    if "content-length" in hdrs:
        length = int(hdrs["content-length"])
        assert len(rest) == length, f"body is {len(rest)} bytes, Content-Length says {length}"
    return HttpResponse(status, reason, hdrs, rest)


async def http_publish(port: int, topic: str, data: Any, api_key: str | None = None) -> HttpResponse:
    headers = [("Content-Type", "application/json")]
    if api_key is not None:
        headers.append(("Authorization", f"Bearer {api_key}"))
    body = dumps({"topic": topic, "data": data}).encode()
    return await http_request(port, "POST", "/api/publish", body, headers)


def upgrade_head(port: int, path: str = "/ws", key: str | None = None, version: str = "13",
                 extra: Iterable[tuple[str, str]] = ()) -> tuple[bytes, str]:
    """A client upgrade request head and the key it carries."""
    key = base64.b64encode(os.urandom(16)).decode() if key is None else key
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        f"Sec-WebSocket-Version: {version}",
        *(f"{k}: {v}" for k, v in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), key


# --- WebSocket, by hand ------------------------------------------------------------------------


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    # Python-level XOR is fine at test sizes; int.from_bytes keeps it fast enough.
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return head + key + masked


@attrs.frozen
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def close_code(self) -> int | None:
        assert self.opcode == OP_CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8")


class EndOfStream(Exception):
    """The peer closed the TCP connection."""


class ByteReader:
    """Buffered exact reads over a stream."""

    def __init__(self, stream: trio.abc.ReceiveStream, initial: bytes = b""):
        self.stream = stream
        self.buf = bytearray(initial)

    async def fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        self.buf += data
        return True

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self.fill():
                raise EndOfStream(f"EOF with {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_until(self, sep: bytes, limit: int = 1 << 20) -> bytes | None:
        """Up to and without *sep*; None on a clean EOF at a boundary."""
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(sep)]
                return out
            assert len(self.buf) <= limit, "line too long"
            if not await self.fill():
                if self.buf:
                    raise EndOfStream(f"EOF inside a line: {bytes(self.buf[:100])!r}")
                return None


class RawWebSocket:
    """A WebSocket client at frame level over a real socket."""

    def __init__(self, stream: trio.SocketStream, reader: ByteReader):
        self.stream = stream
        self.reader = reader

    @classmethod
    async def connect(cls, port: int, path: str = "/ws", rcvbuf: int | None = None) -> RawWebSocket:
        stream = await open_socket(port, rcvbuf)
        try:
            head, key = upgrade_head(port, path)
            await stream.send_all(head)
            reader = ByteReader(stream)
            resp_head = await reader.read_until(b"\r\n\r\n", limit=16384)
            assert resp_head is not None, "server closed the socket during the handshake"
            status, _, headers = _parse_head(resp_head)
            assert status == 101, f"upgrade refused: {resp_head!r} {bytes(reader.buf)!r}"
            expected = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
            assert headers.get("sec-websocket-accept") == expected, headers
            assert headers.get("upgrade", "").lower() == "websocket", headers
        except BaseException:
            await stream.aclose()
            raise
        return cls(stream, reader)

    @property
    def local_port(self) -> int:
        return int(self.stream.socket.getsockname()[1])

    async def send_frame(self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> None:
        await self.stream.send_all(encode_frame(opcode, payload, fin, mask))

    async def send_text(self, text: str) -> None:
        await self.send_frame(OP_TEXT, text.encode("utf-8"))

    async def send_json(self, obj: Any) -> None:
        await self.send_text(dumps(obj))

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        await self.send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode())

    async def recv_frame(self) -> Frame:
        b0, b1 = await self.reader.read_exactly(2)
        assert not b1 & 0x80, "server frames must not be masked"
        assert not b0 & 0x70, "no extension was negotiated, so RSV bits must be 0"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.read_exactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.read_exactly(8))
        payload = await self.reader.read_exactly(n)
        return Frame(bool(b0 & 0x80), b0 & 0x0F, payload)

    async def recv_json(self) -> Any:
        """The next text message; control frames before it are answered or skipped."""
        while True:
            frame = await self.recv_frame()
            if frame.opcode == OP_PING:
                await self.send_frame(OP_PONG, frame.payload)
                continue
            assert frame.opcode == OP_TEXT and frame.fin, frame
            return frame.json()

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- NDJSON over TCP --------------------------------------------------------------------------------


class NdjsonClient:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.reader = ByteReader(stream)

    @classmethod
    async def connect(cls, port: int) -> NdjsonClient:
        return cls(await open_socket(port))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, obj: Any) -> None:
        await self.stream.send_all(dumps(obj).encode() + b"\n")

    async def recv_line(self) -> bytes | None:
        """The next line without its newline; None at EOF."""
        return await self.reader.read_until(b"\n")

    async def recv(self) -> Any:
        """The next JSON line; server heartbeats are answered and skipped."""
        while True:
            line = await self.recv_line()
            if line is None:
                raise EndOfStream("EOF while waiting for a line")
            obj = json.loads(line)
            if obj == {"op": "ping"}:
                await self.stream.send_all(b'{"op":"pong"}\n')
                continue
            return obj

    async def aclose(self) -> None:
        await self.stream.aclose()


async def subscribe_reply(
    ws: RawWebSocket, topic: str, since: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Subscribe (with ``since`` for recovery) and return the reply, skipping anything before it."""
    cmd: dict[str, Any] = {"op": "subscribe", "topic": topic, "id": "sub"}
    if since is not None:
        cmd["since"] = since
    await ws.send_json(cmd)
    while True:
        msg = await ws.recv_json()
        if msg.get("id") == "sub":
            return msg  # type: ignore[no-any-return]


async def next_pub(ws: RawWebSocket) -> dict[str, Any]:
    """The next publication, skipping replies and events."""
    while True:
        msg = await ws.recv_json()
        if msg.get("op") == "pub":
            return msg  # type: ignore[no-any-return]
