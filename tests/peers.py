"""The test suite's clients: one raw WebSocket client, one NDJSON client, one HTTP client.

They are written from RFC 6455 / HTTP/1.1 directly rather than with wsproto or
h11, which the server itself uses, so a bug shared by the server's parser and a
client library cannot hide itself, and so a test can send exactly the bytes it
means to (bad keys, unmasked or oversize frames, a client that stops reading).
For the same reason what they receive is checked against the RFC: a frame the
server must not send fails whichever test meets it.

They work over any trio stream: a socket (from a chosen source address, with a
small receive buffer, or under TLS), or the client end of an in-memory pair for
the unit tests, which run a connection without the HTTP handshake in front.
They log nothing, so everything a test finds in caplog came from the server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
from collections.abc import Iterable
from typing import Any

import attrs
import trio

HOST = "127.0.0.1"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


# --- streams ----------------------------------------------------------------------------------


async def open_socket(port: int, *, rcvbuf: int | None = None,
                      source: str | None = None) -> trio.SocketStream:
    """A TCP connection to the loopback *port*, from the address *source* if given."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            # Before connect(), or the window scale is already agreed on and the
            # kernel keeps advertising a big window.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def open_stream(port: int, *, tls: ssl.SSLContext | None = None, rcvbuf: int | None = None,
                      source: str | None = None) -> trio.abc.Stream:
    """:func:`open_socket`, under TLS with *tls* if given (handshake done)."""
    stream = await open_socket(port, rcvbuf=rcvbuf, source=source)
    if tls is None:
        return stream
    ssl_stream = trio.SSLStream(stream, tls, server_hostname=HOST, https_compatible=True)
    try:
        await ssl_stream.do_handshake()
    except BaseException:
        await stream.aclose()
        raise
    return ssl_stream


class EndOfStream(Exception):
    """The peer closed the connection where more data was expected."""


class ByteReader:
    """Buffered exact reads over a stream."""

    def __init__(self, stream: trio.abc.ReceiveStream, initial: bytes = b""):
        self.stream = stream
        self.buf = bytearray(initial)

    async def fill(self) -> bool:
        """Read once more; False at EOF."""
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

    async def read_to_eof(self) -> bytes:
        """Everything until the peer closes, including what is already buffered."""
        while await self.fill():
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data


# --- HTTP -------------------------------------------------------------------------------------


@attrs.frozen
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """A response head without its blank line: (status, reason, lower-cased headers)."""
    lines = head.decode("latin-1").split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    assert version.startswith("HTTP/1."), lines[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status), (reason[0] if reason else ""), headers


async def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    *,
    raw_head: bytes | None = None,
    tls: ssl.SSLContext | None = None,
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
    stream = await open_stream(port, tls=tls)
    async with stream:
        await stream.send_all(raw_head + body)
        data = await ByteReader(stream).read_to_eof()
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP response head in {data[:200]!r}"
    status, reason, hdrs = parse_head(head)
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


# --- WebSocket --------------------------------------------------------------------------------


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept that answers *key*."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


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


def apply_mask(payload: bytes, key: bytes) -> bytes:
    """*payload* XOR the 4-byte *key*, repeated (RFC 6455 5.3)."""
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    # Python-level XOR is fine at test sizes; int.from_bytes keeps it fast enough.
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


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
    return head + key + apply_mask(payload, key)


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


def _check_close(frame: Frame) -> None:
    """What RFC 6455 7.4 lets a close frame carry on the wire."""
    assert len(frame.payload) != 1, "a close payload of 1 byte"
    code = frame.close_code
    if code is not None:
        reserved = code in (1004, 1005, 1006, 1015) or 1016 <= code <= 2999
        assert 1000 <= code <= 4999 and not reserved, f"close code {code} may not be sent"
    assert isinstance(frame.close_reason, str)  # decoding raises if the reason is not UTF-8


class Closed(Exception):
    """The server's close frame came where a message was expected; ``code`` and ``reason`` are the frame's."""

    def __init__(self, code: int | None, reason: str):
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class Refused(AssertionError):
    """The upgrade got an HTTP status other than 101.

    An AssertionError: to a test that did not expect the refusal it is a
    failed expectation like any other, and code that catches one keeps working.
    """

    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body!r}")
        self.status = status
        self.body = body


class RawWebSocket:
    """A WebSocket client at frame level.

    :meth:`connect` opens a socket and upgrades it; the constructor takes a
    stream already past the handshake (a unit test's in-memory pair, or a
    test's own handshake, with what the reader already holds).
    """

    def __init__(self, stream: trio.abc.Stream, reader: ByteReader | None = None):
        self.stream = stream
        self.reader = reader or ByteReader(stream)
        #: We sent a close frame, so the server's close is the answer, not a request.
        self.close_sent = False

    @classmethod
    async def connect(cls, port: int, path: str = "/ws", rcvbuf: int | None = None, *,
                      source: str | None = None, tls: ssl.SSLContext | None = None,
                      headers: Iterable[tuple[str, str]] = ()) -> RawWebSocket:
        """Open and upgrade; raises :class:`Refused` for an answer other than 101."""
        stream = await open_stream(port, tls=tls, rcvbuf=rcvbuf, source=source)
        try:
            head, key = upgrade_head(port, path, extra=headers)
            await stream.send_all(head)
            reader = ByteReader(stream)
            resp_head = await reader.read_until(b"\r\n\r\n", limit=16384)
            assert resp_head is not None, "server closed the socket during the handshake"
            status, _, hdrs = parse_head(resp_head)
            if status != 101:
                if "content-length" in hdrs:
                    body = await reader.read_exactly(int(hdrs["content-length"]))
                else:
                    body = await reader.read_to_eof()
                raise Refused(status, body)
            assert hdrs.get("sec-websocket-accept") == accept_key(key), hdrs
            assert hdrs.get("upgrade", "").lower() == "websocket", hdrs
            assert "upgrade" in hdrs.get("connection", "").lower(), hdrs
        except BaseException:
            await stream.aclose()
            raise
        return cls(stream, reader)

    @property
    def local_port(self) -> int:
        assert isinstance(self.stream, trio.SocketStream), self.stream
        return int(self.stream.socket.getsockname()[1])

    # --- sending ---

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_frame(self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> None:
        await self.stream.send_all(encode_frame(opcode, payload, fin, mask))

    async def send_text(self, text: str) -> None:
        await self.send_frame(OP_TEXT, text.encode("utf-8"))

    async def send_json(self, obj: Any) -> None:
        await self.send_text(dumps(obj))

    async def send_many(self, objs: Iterable[Any]) -> None:
        """Several messages in one write, so the server reads them in one chunk."""
        await self.stream.send_all(b"".join(encode_frame(OP_TEXT, dumps(o).encode()) for o in objs))

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        self.close_sent = True
        await self.send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode())

    async def answer_close(self, frame: Frame) -> None:
        """Echo the server's close code, as a client library does, unless we started the close."""
        if self.close_sent:
            return
        try:
            await self.send_frame(OP_CLOSE, frame.payload[:2])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server may have closed already: after a protocol error it does not wait
        self.close_sent = True

    # --- receiving ---

    async def recv_frame(self) -> Frame:
        """The next frame, checked against what RFC 6455 lets a server send."""
        b0, b1 = await self.reader.read_exactly(2)
        assert not b1 & 0x80, "server frames must not be masked"
        assert not b0 & 0x70, "no extension was negotiated, so RSV bits must be 0"
        fin, opcode, n = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F
        assert opcode in _OPCODES, f"reserved opcode {opcode:#x}"
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.read_exactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.read_exactly(8))
        if opcode >= OP_CLOSE:
            assert fin and n <= 125, f"control frame {opcode:#x} with fin={fin} and {n} bytes"
        frame = Frame(fin, opcode, await self.reader.read_exactly(n))
        if opcode == OP_CLOSE:
            _check_close(frame)
        return frame

    async def recv_message(self) -> str | bytes:
        """The next data message, its fragments joined: text as str, binary as bytes.

        Any control frame before it fails the test; tests that expect one read it with :meth:`recv_frame`.
        """
        first = frame = await self.recv_frame()
        assert first.opcode in (OP_TEXT, OP_BINARY), first
        parts = [first.payload]
        while not frame.fin:
            frame = await self.recv_frame()
            assert frame.opcode == OP_CONT, frame
            parts.append(frame.payload)
        data = b"".join(parts)
        return data.decode("utf-8") if first.opcode == OP_TEXT else data

    async def recv_json(self) -> Any:
        """The next text message, decoded; pings before it are answered.

        At the server's close frame, answers it and raises :class:`Closed`.
        """
        while True:
            frame = await self.recv_frame()
            if frame.opcode == OP_PING:
                await self.send_frame(OP_PONG, frame.payload)
            elif frame.opcode == OP_CLOSE:
                await self.answer_close(frame)
                raise Closed(frame.close_code, frame.close_reason)
            else:
                # The server never fragments its messages.
                assert frame.opcode == OP_TEXT and frame.fin, frame
                return frame.json()

    async def request(self, obj: Any) -> Any:
        """Send *obj*; the next message is the answer."""
        await self.send_json(obj)
        return await self.recv_json()

    async def wait_closed(self) -> Closed:
        """Read (and drop) messages until the server's close frame, and answer it."""
        while True:
            try:
                await self.recv_json()
            except Closed as closed:
                return closed

    async def read_until_eof(self) -> list[Frame]:
        """Every frame up to the server's close frame (the last one), as they came.

        The close is answered if the server started it; then the socket is read
        to EOF, so the test sees the server close the transport, and closed.
        """
        frames: list[Frame] = []
        while not frames or frames[-1].opcode != OP_CLOSE:
            frames.append(await self.recv_frame())
        await self.answer_close(frames[-1])
        await self.reader.read_to_eof()
        await self.stream.aclose()
        return frames

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- NDJSON -----------------------------------------------------------------------------------


class NdjsonClient:
    """A client of the TCP port: one JSON object per line."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.reader = ByteReader(stream)

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None, source: str | None = None,
                      tls: ssl.SSLContext | None = None) -> NdjsonClient:
        return cls(await open_stream(port, tls=tls, rcvbuf=rcvbuf, source=source))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_line(self, line: bytes) -> None:
        await self.stream.send_all(line + b"\n")

    async def send(self, obj: Any) -> None:
        await self.send_line(dumps(obj).encode())

    async def send_eof(self) -> None:
        """Half-close: nothing more from us, while the server's answers still arrive."""
        assert isinstance(self.stream, trio.abc.HalfCloseableStream), self.stream
        await self.stream.send_eof()

    async def recv_line(self) -> bytes | None:
        """The next line without its newline; None at EOF.

        At EOF the client closes its end too, as clients do: after its close
        line the server half-closes and waits for the peer's EOF.
        """
        line = await self.reader.read_until(b"\n")
        if line is None:
            await self.stream.aclose()
        return line

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

    async def request(self, obj: Any) -> Any:
        """Send *obj*; the next line is the answer."""
        await self.send(obj)
        return await self.recv()

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- Server-Sent Events -----------------------------------------------------------------------


@attrs.frozen
class SseEvent:
    """One block of a ``text/event-stream``, ended by a blank line (WHATWG HTML 9.2.6)."""

    event: str | None = None
    data: str | None = None
    id: str | None = None
    retry: int | None = None
    #: The block held only comment lines (a heartbeat).
    comment: bool = False

    def json(self) -> Any:
        assert self.data is not None, self
        return json.loads(self.data)


class SseStream:
    """A raw ``GET /sse`` reader (what ``curl -N`` shows), parsed from the spec:
    lines end with LF, CRLF or CR; a line starting with ``:`` is a comment; a
    blank line ends a block. Fields are kept as sent, so a test sees exactly
    which block carried an ``id:`` or a ``retry:``."""

    def __init__(self, stream: trio.abc.Stream, status: int, headers: dict[str, str], rest: bytes):
        self.stream = stream
        self.status = status
        self.headers = headers
        self.reader = ByteReader(stream, rest)

    @classmethod
    async def open(cls, port: int, query: str, headers: Iterable[tuple[str, str]] = (), *,
                   path: str = "/sse", rcvbuf: int | None = None) -> SseStream:
        stream: trio.abc.Stream = await open_socket(port, rcvbuf=rcvbuf)
        lines = [f"GET {path}?{query} HTTP/1.1", f"Host: {HOST}:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in headers]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        reader = ByteReader(stream)
        head = await reader.read_until(b"\r\n\r\n", limit=65536)
        assert head is not None, "EOF before a response head"
        status, _, hdrs = parse_head(head)
        return cls(stream, status, hdrs, bytes(reader.buf))

    async def body(self) -> bytes:
        """The rest of the response (an error's JSON body), to EOF."""
        return await self.reader.read_to_eof()

    async def _line(self) -> str | None:
        buf = self.reader.buf
        while True:
            for i, byte in enumerate(buf):
                if byte in (0x0A, 0x0D):
                    if byte == 0x0D and i + 1 == len(buf):
                        break  # a CR at the end: a LF may follow
                    line = bytes(buf[:i]).decode()
                    del buf[: i + (2 if byte == 0x0D and buf[i + 1] == 0x0A else 1)]
                    return line
            if not await self.reader.fill():
                if buf:
                    raise EndOfStream(f"EOF inside a line: {bytes(buf[:100])!r}")
                return None

    async def next_block(self) -> SseEvent | None:
        """The next block, comments included; None at a clean EOF."""
        fields: dict[str, str] = {}
        data: list[str] = []
        comment = False
        while True:
            line = await self._line()
            if line is None:
                assert not fields and not data and not comment, "EOF inside an event"
                return None
            if not line:
                if fields or data or comment:
                    retry = fields.get("retry")
                    return SseEvent(fields.get("event"), "\n".join(data) if data else None,
                                    fields.get("id"), int(retry) if retry is not None else None,
                                    comment and not fields and not data)
                continue
            if line.startswith(":"):
                comment = True
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                assert name not in fields, f"field {name} twice in one event"
                fields[name] = value

    async def next_event(self) -> SseEvent:
        """The next block that is not a heartbeat nor a bare ``retry:``."""
        while True:
            block = await self.next_block()
            if block is None:
                raise EndOfStream("the stream ended")
            if not block.comment and (block.data is not None or block.event is not None):
                return block

    async def aclose(self) -> None:
        await self.stream.aclose()
