"""Cheap load-client connections on a raw ``asyncio.BufferedProtocol``.

The load client shares the cores with the server under test, so every
microsecond it spends per delivery is taken from the server. Hence no
WebSocket library here: the upgrade is written by hand, server frames are
parsed straight out of the byte stream, and each delivery costs one
``orjson.loads`` plus a few integer operations.

Two framings speak the same push protocol (docs/protocol.md):

- :class:`WsClient`: WebSocket text frames (fragmented or not), ping/pong and
  close. Server frames may arrive several per ``recv`` (trioserve batches
  writes), or split across reads; both are handled. With ``deflate=True`` it
  offers permessage-deflate with no context takeover either way (as trioserve
  answers every offer) and inflates compressed messages, each with a
  decompressor of its own: nothing is kept between messages.
- :class:`TcpClient`: newline-delimited JSON; the server's ``{"op":"ping"}``
  line is answered with ``{"op":"pong"}``.

``benchmarks/fanout.py``, ``trioserve bench`` and the fault tests all use it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import time
import zlib
from array import array
from collections.abc import Callable
from typing import Any, cast

import orjson

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# RFC 6455 wants an unpredictable mask per frame to protect proxies; on
# loopback against our own servers a fixed non-zero key is fine.
MASK = b"\x37\xfa\x21\x3d"
IP_BIND_ADDRESS_NO_PORT = 24  # Linux; not exported by the socket module
MAX_HEADER = 16384
MAX_LINE = 16 * 1024 * 1024

#: The client's permessage-deflate offer: no context takeover either way, so
#: each compressed message inflates on its own.
DEFLATE_OFFER = b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"
_DEFLATE_TAIL = b"\x00\x00\xff\xff"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_PONG_LINE = b'{"op":"pong"}\n'


class ProtocolError(Exception):
    """The server broke the WebSocket protocol or the benchmark contract.

    ``status`` is the HTTP status of a refused upgrade (a flood counts 503s), else 0.
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def mask_payload(payload: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    key = (MASK * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + MASK + mask_payload(payload)


class Deliveries:
    """Delivery accounting shared by all subscribers of one process.

    Kept separate from the connections so the hot path touches one object
    and the completion check is a single counter. ``benchmarks/fanout.py``
    arms it per burst; ``trioserve bench`` never arms it and drains ``lat``
    into a histogram from time to time.
    """

    __slots__ = (
        "armed",
        "done",
        "expected",
        "last_recv",
        "lat",
        "per_conn",
        "plain",
        "received",
        "remaining",
        "stamped",
        "wire",
    )

    def __init__(self, stamped: bool = True) -> None:
        # False when the publications carry no ``{"t": <monotonic>}`` stamp (the
        # fault tests publish their own data): deliveries are counted, not timed.
        self.stamped = stamped
        self.lat = array("d")  # seconds from the publisher's stamp to the read
        self.remaining = 0
        self.received = 0
        self.last_recv = 0.0
        self.per_conn = 0
        self.expected = 0
        self.done = asyncio.Event()
        self.armed = False
        # Bytes read from the sockets, and what the same data messages would
        # have taken uncompressed (frame headers included): their ratio is what
        # permessage-deflate saved on the wire.
        self.wire = 0
        self.plain = 0

    def arm(self, per_conn: int, open_conns: int) -> None:
        self.lat = array("d")
        self.per_conn = per_conn
        self.remaining = self.expected = per_conn * open_conns
        self.received = 0
        self.last_recv = 0.0
        self.wire = self.plain = 0
        self.done = asyncio.Event()
        self.armed = True
        if self.remaining <= 0:
            self.done.set()

    def written_off(self, count: int) -> None:
        """A subscriber closed mid-burst: stop waiting for what it will never get."""
        if self.armed and count > 0:
            self.remaining -= count
            if self.remaining <= 0:
                self.done.set()


# One receive buffer for every connection of the process: asyncio reads with
# recv_into() and each read is fully parsed (or its tail copied) before the
# next, so sharing is safe. Plain Protocol would allocate a 256 KiB bytes
# object per recv(), which profiling showed to be ~40% of the client's time.
RECV_VIEW = memoryview(bytearray(65536))


class PushClient(asyncio.BufferedProtocol):
    """One client connection: request/reply by id, pub accounting. Framing is the subclass's."""

    transport_name = "?"

    def __init__(self, deliveries: Deliveries | None) -> None:
        self.deliveries = deliveries
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.reply_hooks: dict[Any, Callable[[dict[str, Any]], None]] = {}
        self.next_id = 1
        self.buf = b""
        # Per-connection ordering checks; offsets must be exactly consecutive.
        self.last_offset = 0
        self.burst_count = 0  # pubs accounted on this connection (per burst for fanout.py)
        self.gaps = 0
        self.dups = 0
        # A connection subscribed to several topics (``trioserve bench rooms``)
        # checks offsets per topic: topic -> [last offset, received, gaps, dups].
        # None (the usual case) keeps the per-connection fields above.
        self.per_topic: dict[str, list[int]] | None = None
        self.unexpected = 0
        self.close_reason = ""
        # The server's close code (WebSocket close frame or NDJSON close line);
        # None while open, or when the connection ended without one.
        self.close_code: int | None = None

    # -- asyncio callbacks -------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.close_reason:
            self.close_reason = repr(exc) if exc else "closed by peer"
        err = ConnectionError(f"connection lost: {self.close_reason}")
        if not self.handshake.done():
            self.handshake.set_exception(err)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        if self.deliveries is not None and self.deliveries.armed:
            self.deliveries.written_off(self.deliveries.per_conn - self.burst_count)
        if not self.closed.done():
            self.closed.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return RECV_VIEW

    # -- messages ----------------------------------------------------------

    def _on_text(self, payload: bytes | memoryview, now: float) -> None:
        try:
            msg = orjson.loads(payload)
            if msg.get("op") == "pub":
                d = self.deliveries
                off = msg["offset"]
                per = self.per_topic
                if per is not None:
                    self._on_topic_pub(per, msg, off, now)
                    return
                last = self.last_offset
                if off != last + 1:
                    if off <= last:
                        self.dups += 1  # not a delivery: it would hide a loss
                        return
                    self.gaps += off - last - 1
                self.last_offset = off
                if d is None:
                    self.unexpected += 1
                    return
                self.burst_count += 1
                if d.stamped:
                    d.lat.append(now - msg["data"]["t"])
                d.received += 1
                d.last_recv = now
                d.remaining -= 1
                if d.remaining == 0:
                    d.done.set()
                return
            rid = msg.get("id")
            fut = self.pending.pop(rid, None)
            if fut is None or fut.done():
                self._on_unsolicited(msg)
                return
            hook = self.reply_hooks.pop(rid, None)
            if hook is not None:
                try:
                    hook(msg)
                except Exception as exc:
                    fut.set_exception(exc)
                    return
            fut.set_result(msg)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            self.unexpected += 1

    def _on_topic_pub(self, per: dict[str, list[int]], msg: dict[str, Any], off: int, now: float) -> None:
        """A publication on a connection with several topics: offsets checked per topic.

        Its counting repeats the single-topic branch of the reader on purpose:
        that branch is the load client's per-delivery path, kept inline (no
        call per delivery), and at 100k the client's CPU bounds the run."""
        entry = per.get(msg["topic"])
        d = self.deliveries
        if entry is None or d is None:
            self.unexpected += 1
            return
        last = entry[0]
        if off != last + 1:
            if off <= last:
                entry[3] += 1
                return
            entry[2] += off - last - 1
        entry[0] = off
        entry[1] += 1
        self.burst_count += 1
        if d.stamped:
            d.lat.append(now - msg["data"]["t"])
        d.received += 1
        d.last_recv = now
        d.remaining -= 1
        if d.remaining == 0:
            d.done.set()

    def account(self, pub: dict[str, Any], now: float) -> None:
        """A publication that came another way (a recovering subscribe's reply)."""
        self._on_text(orjson.dumps(pub), now)

    def _on_unsolicited(self, msg: dict[str, Any]) -> None:
        self.unexpected += 1

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, reason: str, status: int = 0) -> None:
        self.close_reason = reason
        if not self.handshake.done():
            self.handshake.set_exception(ProtocolError(reason, status))
        if self.transport is not None:
            self.transport.abort()

    # -- public API ----------------------------------------------------------

    def send_json(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def request_nowait(self, obj: dict[str, Any],
                       on_reply: Callable[[dict[str, Any]], None] | None = None,
                       ) -> asyncio.Future[dict[str, Any]]:
        """Send ``obj`` with a fresh id; the future resolves with the reply.

        ``on_reply`` runs as the reply is parsed, before any frame after it,
        which matters when those frames depend on it: a subscribe reply's
        offset is the base for the publications that follow in the same read,
        and the awaiting task only runs after the whole read is parsed.
        """
        rid = self.next_id
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self.closed.done():
            fut.set_exception(ConnectionError(f"connection lost: {self.close_reason}"))
            return fut
        self.pending[rid] = fut
        if on_reply is not None:
            self.reply_hooks[rid] = on_reply
        self.send_json({**obj, "id": rid})
        return fut

    async def request(self, obj: dict[str, Any], timeout: float,
                      on_reply: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return await self.request_nowait(obj, on_reply)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, as a network failure would."""
        self.close_reason = "dropped by the load client"
        if self.transport is not None:
            self.transport.abort()


class WsClient(PushClient):
    """The push protocol over a hand-parsed WebSocket."""

    transport_name = "websocket"

    def __init__(self, host: str, port: int, path: str, deliveries: Deliveries | None,
                 deflate: bool = False) -> None:
        super().__init__(deliveries)
        self.host_header = f"{host}:{port}"
        self.path = path
        self.upgraded = False
        self.fragments: list[bytes] | None = None
        self.fragments_compressed = False
        self.key = base64.b64encode(os.urandom(16))
        self.offer_deflate = deflate
        #: The server accepted permessage-deflate.
        self.deflate = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
            % (self.path.encode(), self.host_header.encode(), self.key,
               b"Sec-WebSocket-Extensions: %s\r\n" % DEFLATE_OFFER if self.offer_deflate else b"")
        )

    def buffer_updated(self, nbytes: int) -> None:
        data: bytes | memoryview = RECV_VIEW[:nbytes]
        if not self.upgraded:
            data = self._read_upgrade(bytes(data))
            if not data:
                return
        now = time.monotonic()  # one clock read per read(), shared by its frames
        d = self.deliveries
        if d is not None:
            d.wire += len(data)
        if self.buf:
            data = self.buf + bytes(data)
            self.buf = b""
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length, hdr = b1 & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, hdr = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, hdr = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:
                self._fail("server frame is masked")
                return
            stop = pos + hdr + length
            if stop > end:
                break
            payload = data[pos + hdr : stop]
            pos_start, pos = pos, stop
            if b0 == 0x81:  # the hot path: a whole text frame
                if d is not None:
                    d.plain += stop - pos_start
                self._on_text(payload, now)
            elif b0 == 0xC1 and self.deflate:  # a whole compressed text frame
                text = self._inflate(payload)
                if text is None:
                    return
                if d is not None:
                    n = len(text)
                    d.plain += n + (2 if n < 126 else 4 if n < 65536 else 10)
                self._on_text(text, now)
            else:
                self._on_other_frame(b0, bytes(payload), now)
        if pos < end:
            # The shared receive buffer is reused by the next read: keep a copy.
            self.buf = bytes(data[pos:])

    def _read_upgrade(self, data: bytes) -> bytes:
        """Buffer until the end of the 101 response; return bytes after it."""
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self.buf) > MAX_HEADER:
                self._fail("upgrade response too long")
            return b""
        head, rest = self.buf[:head_end], self.buf[head_end + 4 :]
        self.buf = b""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[1] != b"101":
            status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
            self._fail(f"upgrade refused: {lines[0].decode(errors='replace')}", status)
            return b""
        expected = base64.b64encode(hashlib.sha1(self.key + GUID).digest())
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"sec-websocket-accept") != expected:
            self._fail("bad Sec-WebSocket-Accept")
            return b""
        extensions = headers.get(b"sec-websocket-extensions")
        if extensions is not None:
            if not self.offer_deflate or not extensions.startswith(b"permessage-deflate"):
                self._fail(f"unexpected extension {extensions!r}")
                return b""
            self.deflate = True
        self.upgraded = True
        self.handshake.set_result(None)
        return rest

    def _inflate(self, payload: bytes | memoryview) -> bytes | None:
        try:
            return zlib.decompressobj(-15).decompress(bytes(payload) + _DEFLATE_TAIL)
        except zlib.error as exc:
            self._fail(f"bad compressed message: {exc}")
            return None

    def _on_other_frame(self, b0: int, payload: bytes, now: float) -> None:
        fin, opcode = b0 & 0x80, b0 & 0x0F
        if b0 & 0x70 and not (b0 & 0x40 and self.deflate and opcode == OP_TEXT):
            self._fail(f"unexpected RSV bits in {b0:#x}")
            return
        if opcode == OP_PING:
            self._write(encode_frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_code = code
            self.close_reason = f"close {code} {payload[2:64].decode(errors='replace')}".rstrip()
            self._write(encode_frame(payload[:2], OP_CLOSE))
            if self.transport is not None:
                self.transport.close()
        elif opcode == OP_PONG:
            pass
        elif opcode == OP_TEXT:  # first fragment of a fragmented message
            self.fragments = [payload]
            self.fragments_compressed = bool(b0 & 0x40)
            if fin:  # a compressed message in one frame (the hot path handles 0xC1)
                self._on_other_frame(0x80 | OP_CONT, b"", now)
        elif opcode == OP_CONT and self.fragments is not None:
            self.fragments.append(payload)
            if fin:
                whole: bytes | None = b"".join(self.fragments)
                self.fragments = None
                if self.fragments_compressed:
                    whole = self._inflate(whole)  # type: ignore[arg-type]
                if whole is not None:
                    self._on_text(whole, now)
        else:
            self._fail(f"unexpected frame opcode {opcode}")

    def send_json(self, obj: dict[str, Any]) -> None:
        self._write(encode_frame(orjson.dumps(obj)))


class TcpClient(PushClient):
    """The push protocol as newline-delimited JSON over raw TCP."""

    transport_name = "tcp"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.handshake.set_result(None)

    def buffer_updated(self, nbytes: int) -> None:
        now = time.monotonic()
        data = RECV_VIEW[:nbytes].tobytes()
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        while (nl := data.find(b"\n", pos)) >= 0:
            line = data[pos:nl]
            pos = nl + 1
            if line.strip():
                self._on_text(line, now)
        if pos < len(data):
            if len(data) - pos > MAX_LINE:
                self._fail("line too long")
                return
            self.buf = data[pos:]

    def _on_unsolicited(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "ping":
            self._write(_PONG_LINE)
        elif op == "close":
            code = msg.get("code")
            self.close_code = code if isinstance(code, int) else None
            self.close_reason = f"close {code} {msg.get('reason', '')}".rstrip()
        else:
            self.unexpected += 1

    def send_json(self, obj: dict[str, Any]) -> None:
        self._write(orjson.dumps(obj) + b"\n")


def bound_socket(src_ip: str | None) -> socket.socket:
    """A non-blocking TCP socket that will connect from ``src_ip`` (any address if None)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if src_ip:
            # Defer the port choice to connect() so uniqueness is per 4-tuple;
            # otherwise bind() needs a port free on this IP for *any* peer,
            # and TIME_WAIT sockets from earlier servers exhaust the range.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src_ip, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_client(
    scheme: str, host: str, port: int, src_ip: str | None, deliveries: Deliveries | None,
    timeout: float, path: str = "/ws", deflate: bool = False,
) -> PushClient:
    """Connect from ``src_ip`` and, for WebSocket, complete the upgrade within ``timeout``."""
    loop = asyncio.get_running_loop()
    sock = bound_socket(src_ip)
    proto: PushClient | None = None
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            if scheme == "tcp":
                _, proto = await loop.create_connection(lambda: TcpClient(deliveries), sock=sock)
            else:
                _, proto = await loop.create_connection(
                    lambda: WsClient(host, port, path, deliveries, deflate), sock=sock)
            await proto.handshake
        return proto
    except BaseException:
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        else:
            sock.close()
        raise


async def open_ws(
    host: str, port: int, src_ip: str | None, deliveries: Deliveries | None,
    timeout: float, path: str = "/ws", deflate: bool = False,
) -> WsClient:
    """Connect from ``src_ip`` and complete the upgrade within ``timeout``
    (offering permessage-deflate when *deflate*)."""
    client = await open_client("ws", host, port, src_ip, deliveries, timeout, path, deflate)
    assert isinstance(client, WsClient)
    return client

