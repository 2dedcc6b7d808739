"""What every bad-input case shares: a server, a bystander and the checks after.

A case sends its bad input on a real socket. Afterwards :meth:`Ctx.finish`
checks that the server dropped every connection the case opened, that
``/healthz`` and a fresh WebSocket still work, and that the bystander (a
client subscribed before the case started, on its own socket) receives a
publication made after the case.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import jwt
import trio

from ..conftest import RunningServer, ServerFactory
from ..peers import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    EndOfStream,
    Frame,
    HttpResponse,
    RawWebSocket,
    http_publish,
    http_request,
    open_socket,
    parse_head,
)
from ..system.helpers import wait_until

SECRET = "hardening-secret-0123456789-0123456789-abcdef"
BYSTANDER_TOPIC = "bystander"
#: Real-time budget of a case that does not run on the autojump clock.
LIMIT = 15
_nonces = itertools.count(1)


# --- tokens -------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(claims: dict[str, Any], key: bytes, header: dict[str, Any] | None = None) -> str:
    """A JWT signed by hand, so a test can sign with any key (PyJWT refuses a PEM as HMAC key)."""
    head = b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def forged_token(claims: dict[str, Any], alg: str) -> str:
    """A token whose header names *alg* and whose signature is junk: no key needed."""
    head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{head}.{b64url(json.dumps(claims).encode())}.{b64url(b'not-a-signature' * 4)}"


def unsigned_token(claims: dict[str, Any]) -> str:
    """``alg: none``: no signature at all."""
    head = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{b64url(json.dumps(claims).encode())}."


@attrs.define
class RsaKeys:
    private_pem: bytes
    public_pem: str


_rsa: RsaKeys | None = None


def rsa_keys() -> RsaKeys:
    """One RSA key pair per test session (generating one takes a moment)."""
    global _rsa
    if _rsa is None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _rsa = RsaKeys(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        )
    return _rsa


# --- raw HTTP -----------------------------------------------------------------------------


def describe_response(resp: HttpResponse) -> str:
    """The status, and the error code and message if the body has them: for the matrix table."""
    try:
        err = resp.json().get("error") if resp.status >= 400 else None
    except ValueError:
        err = None
    if isinstance(err, dict):
        return f"HTTP {resp.status} {err.get('code')}: {err.get('message')!r}"
    return f"HTTP {resp.status} {resp.body[:60]!r}" if resp.body else f"HTTP {resp.status}"


def parse_responses(data: bytes, to_head: bool = False) -> tuple[list[HttpResponse], bytes]:
    """Complete HTTP responses at the start of *data*, and what is left over.

    *to_head*: they answer HEAD requests, so they have no body whatever their Content-Length.
    """
    out: list[HttpResponse] = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return out, data
        status, reason, headers = parse_head(head)
        length = 0 if status < 200 or to_head else int(headers.get("content-length", "0"))
        if len(rest) < length:
            return out, data
        out.append(HttpResponse(status, reason, headers, rest[:length]))
        data = rest[length:]


@attrs.frozen
class Exchange:
    responses: list[HttpResponse]
    #: The server closed the connection (EOF or reset) before the read ended.
    closed: bool
    leftover: bytes

    def describe(self) -> str:
        parts = [describe_response(r) for r in self.responses] or ["no response"]
        parts.append("then closed" if self.closed else "connection left open")
        return "; ".join(parts)


async def exchange(port: int, data: bytes, *, want: int = 1, wait: float = 5.0,
                   head: bool = False) -> Exchange:
    """Send *data* in one write and read the answers.

    Reading stops at EOF, or 0.3 s after *want* complete responses arrived (an
    extra response in that time is still seen), or after *wait* seconds.
    """
    stream = await open_socket(port)
    buf = b""
    closed = False
    async with stream:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        with trio.move_on_after(wait):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                buf += chunk
                if len(parse_responses(buf, head)[0]) >= want:
                    # Enough answers: give the server a short moment to close (or
                    # to send one answer too many) and stop.
                    with trio.move_on_after(0.3):
                        while chunk:
                            chunk = await stream.receive_some(65536)
                            buf += chunk
                        closed = True
                    break
    responses, leftover = parse_responses(buf, head)
    return Exchange(responses, closed, leftover)


# --- WebSocket ------------------------------------------------------------------------------


def describe_error(reply: Any) -> str:
    if isinstance(reply, dict) and reply.get("ok") is False:
        return f"error {reply['error']['code']}: {reply['error']['message']!r}"
    return f"reply {json.dumps(reply)[:100]}"


def reset_socket(stream: trio.abc.Stream) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN (a client that vanished)."""
    assert isinstance(stream, trio.SocketStream), stream
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


# --- the bystander ---------------------------------------------------------------------------


class Bystander:
    """A WebSocket subscribed to ``bystander`` before a case starts, read by its own task.

    It answers pings (so heartbeats on the autojump clock do not close it) and
    puts every text message into a channel for :meth:`expect_publication`.
    """

    def __init__(self, ws: RawWebSocket):
        self.ws = ws
        self.closed: Frame | None = None
        self.error: str | None = None
        self._send, self._recv = trio.open_memory_channel[Any](1000)

    async def run(self) -> None:
        try:
            while True:
                frame = await self.ws.recv_frame()
                if frame.opcode == OP_PING:
                    await self.ws.send_frame(OP_PONG, frame.payload)
                elif frame.opcode == OP_TEXT:
                    await self._send.send(frame.json())
                elif frame.opcode == OP_CLOSE:
                    self.closed = frame
                    return
        except (EndOfStream, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.error = repr(exc)

    async def expect_publication(self, nonce: int) -> None:
        while True:
            msg = await self._recv.receive()
            if msg.get("op") == "pub" and msg.get("topic") == BYSTANDER_TOPIC:
                if msg["data"] == {"nonce": nonce}:
                    return


# --- one case ----------------------------------------------------------------------------------


@attrs.define
class Ctx:
    rs: RunningServer
    row: dict[str, str]
    bystander: Bystander
    nursery: trio.Nursery
    config: dict[str, Any]
    #: Signs the tokens the harness itself needs (bystander, fresh client) when auth is on.
    private_key: bytes | None = None

    @property
    def port(self) -> int:
        return self.rs.port

    @property
    def tcp_port(self) -> int:
        return self.rs.tcp_port

    @property
    def auth(self) -> bool:
        return "token_secret" in self.config or "token_public_key" in self.config

    def token(self, sub: str = "alice", ttl: float = 3600, **claims: Any) -> str:
        """A valid token for this server (with its audience and issuer, if set)."""
        payload: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl)}
        if "token_audience" in self.config:
            payload["aud"] = self.config["token_audience"]
        if "token_issuer" in self.config:
            payload["iss"] = self.config["token_issuer"]
        payload.update(claims)
        if "token_public_key" in self.config:
            assert self.private_key is not None
            return jwt.encode(payload, self.private_key, algorithm="RS256")
        return jwt.encode(payload, self.config.get("token_secret", SECRET), algorithm="HS256")

    def ws_path(self, **claims: Any) -> str:
        if not self.auth:
            return "/ws"
        claims.setdefault("subscribe", ["*"])
        return "/ws?token=" + self.token(**claims)

    async def connect(self, path: str | None = None, rcvbuf: int | None = None) -> RawWebSocket:
        return await RawWebSocket.connect(self.port, path or self.ws_path(), rcvbuf)

    def observe(self, text: str) -> str:
        """Record what the server did, for the matrix table; returns *text*."""
        self.row["observed"] = text
        return text

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until the server holds no connection or socket but the bystander's."""
        server = self.rs.server

        def settled() -> bool:
            # The socket count includes sockets still in HTTP (never upgraded):
            # a slowloris or a refused request must not linger either.
            return len(server.connections) == 1 and server._admission.sockets == 1

        await wait_until(settled, timeout, what="the server to drop the case's connections and sockets")

    async def finish(self) -> None:
        """Every case ends here: connections cleaned up, server up, bystander served."""
        await self.settle()
        port = self.port
        health = await http_request(port, "GET", "/healthz")
        assert health.status == 200, health
        fresh = await self.connect()
        reply = await fresh.request({"op": "ping", "id": "fresh"})
        assert reply == {"id": "fresh", "ok": True, "op": "pong"}, reply
        await fresh.send_close(1000)
        while (await fresh.recv_frame()).opcode != OP_CLOSE:
            pass
        await fresh.aclose()

        nonce = next(_nonces)
        resp = await http_publish(port, BYSTANDER_TOPIC, {"nonce": nonce}, self.config.get("api_key"))
        assert resp.status == 200, resp
        assert resp.json()["subscribers"] == 1, resp.json()
        with trio.fail_after(10):
            await self.bystander.expect_publication(nonce)
        assert self.bystander.closed is None and self.bystander.error is None, (
            self.bystander.closed, self.bystander.error)
        self.row["after"] = "up; bystander got its publication"


@asynccontextmanager
async def case_context(start_server: ServerFactory, row: dict[str, str],
                       config: dict[str, Any]) -> AsyncIterator[Ctx]:
    config = dict(config)
    private_key = None
    if config.get("token_public_key") == "RSA":
        keys = rsa_keys()
        config["token_public_key"] = keys.public_pem
        private_key = keys.private_pem
    rs = await start_server(**config)
    ws = await RawWebSocket.connect(rs.port, _path_for(config, private_key))
    async with ws.stream:
        reply = await ws.request({"op": "subscribe", "topic": BYSTANDER_TOPIC, "id": "b"})
        assert reply["ok"] is True, reply
        async with trio.open_nursery() as nursery:
            ctx = Ctx(rs, row, Bystander(ws), nursery, config, private_key)
            nursery.start_soon(ctx.bystander.run)
            try:
                yield ctx
            finally:
                # Nothing may await in here: the cancelled scope would turn a
                # failing case's exception into a swallowed Cancelled.
                nursery.cancel_scope.cancel()


def _path_for(config: dict[str, Any], private_key: bytes | None) -> str:
    """The bystander's WebSocket path (with a token when the server needs one)."""
    probe = Ctx(None, {}, None, None, config, private_key)  # type: ignore[arg-type]
    return probe.ws_path(sub="bystander")
