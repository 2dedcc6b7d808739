"""Small clients for the security tests, over any trio stream (plain or TLS).

They log nothing, so everything a test finds in caplog came from the server.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections import deque
from typing import Any

import trio
import wsproto
import wsproto.events as wse

HOST = "127.0.0.1"


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def open_stream(port: int, *, source: str | None = None, tls: ssl.SSLContext | None = None,
                      host: str = HOST) -> trio.abc.Stream:
    """A TCP connection to *host*:*port*, from the address *source* if given, TLS with *tls*."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if tls is not None:
        ssl_stream = trio.SSLStream(stream, tls, server_hostname=host, https_compatible=True)
        await ssl_stream.do_handshake()
        stream = ssl_stream
    return stream


class Closed(Exception):
    """The server closed the WebSocket; ``code`` and ``reason`` are its close frame's."""

    def __init__(self, code: int | None, reason: str | None):
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class Refused(Exception):
    """The upgrade got an HTTP status other than 101."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body!r}")
        self.status = status
        self.body = body


class Ws:
    """A WebSocket client (wsproto) over a stream."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self._events: deque[wse.Event] = deque()

    @classmethod
    async def connect(cls, port: int, *, path: str = "/ws", source: str | None = None,
                      tls: ssl.SSLContext | None = None,
                      headers: list[tuple[bytes, bytes]] | None = None) -> Ws:
        """Open and upgrade; raises :class:`Refused` for a non-101 answer."""
        stream = await open_stream(port, source=source, tls=tls)
        client = cls(stream)
        try:
            await client._send(wse.Request(host=f"{HOST}:{port}", target=path,
                                           extra_headers=headers or []))
            event = await client.next_event()
            if isinstance(event, wse.RejectConnection):
                body = b""
                if event.has_body:
                    while True:
                        data = await client.next_event()
                        assert isinstance(data, wse.RejectData)
                        body += data.data
                        if data.body_finished:
                            break
                raise Refused(event.status_code, body)
            assert isinstance(event, wse.AcceptConnection), event
        except BaseException:
            await stream.aclose()
            raise
        return client

    async def _send(self, event: wse.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> wse.Event:
        while not self._events:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.ws.receive_data(data or None)
            self._events.extend(self.ws.events())
            if not data and not self._events:
                raise Closed(None, "EOF")
        return self._events.popleft()

    async def send_text(self, text: str) -> None:
        await self._send(wse.TextMessage(text))

    async def send_json(self, obj: Any) -> None:
        await self.send_text(dumps(obj))

    async def send_many(self, objs: list[Any]) -> None:
        """Several messages in one write, so the server reads them in one chunk."""
        await self.stream.send_all(b"".join(self.ws.send(wse.TextMessage(dumps(o))) for o in objs))

    async def recv_json(self) -> Any:
        """The next text message; raises :class:`Closed` at the server's close frame."""
        parts: list[str] = []
        while True:
            event = await self.next_event()
            if isinstance(event, wse.Ping):
                await self._send(event.response())
            elif isinstance(event, wse.TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return json.loads("".join(parts))
            elif isinstance(event, wse.CloseConnection):
                try:
                    await self._send(event.response())
                except (trio.BrokenResourceError, trio.ClosedResourceError,
                        wsproto.utilities.LocalProtocolError):
                    pass
                raise Closed(event.code, event.reason)

    async def request(self, obj: Any) -> Any:
        await self.send_json(obj)
        return await self.recv_json()

    async def wait_closed(self) -> Closed:
        """Read (and drop) messages until the server's close frame."""
        while True:
            try:
                await self.recv_json()
            except Closed as closed:
                return closed

    async def aclose(self) -> None:
        await self.stream.aclose()


class Lines:
    """An NDJSON client over a stream."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._buf = b""

    @classmethod
    async def connect(cls, port: int, *, source: str | None = None,
                      tls: ssl.SSLContext | None = None) -> Lines:
        return cls(await open_stream(port, source=source, tls=tls))

    async def send(self, obj: Any) -> None:
        await self.stream.send_all(dumps(obj).encode() + b"\n")

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv_line(self) -> bytes | None:
        """The next line without its newline; None at EOF."""
        while b"\n" not in self._buf:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    async def recv(self) -> Any:
        line = await self.recv_line()
        assert line is not None, "EOF while waiting for a line"
        return json.loads(line)

    async def request(self, obj: Any) -> Any:
        await self.send(obj)
        return await self.recv()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def http(port: int, method: str, path: str, body: bytes = b"",
               headers: list[tuple[str, str]] | None = None,
               tls: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request with ``Connection: close``: (status, body)."""
    stream = await open_stream(port, tls=tls)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    response = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            break
        if not chunk:
            break
        response += chunk
    await stream.aclose()
    head, _, rest = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest
