"""A load-client process for the fault-injection tests: ``python -m tests.faults.loadclient``.

One asyncio loop per process, raw sockets, no WebSocket library (the load
client shares the two cores with the server, so it must be cheap per
delivery). The test drives it over stdin/stdout: one JSON command per line in,
one JSON reply per line out, matched by ``rid``; every command runs as a task
of its own, so ``stats`` answers while ``subscribe`` is still connecting.

Commands (``op``):

- ``subscribe``: open one subscriber per entry of ``src_ips`` on ``topic``.
  With ``reconnect``, a subscriber whose connection ends (any close code, a
  reset, a refused reconnect, a 503) reconnects after a random wait and
  resubscribes with ``since`` = its epoch and last offset, as
  docs/protocol.md describes. Every subscriber checks that the offsets it
  sees, live or recovered, are exactly consecutive.
- ``stats``: the subscribers' counters, summed (see :meth:`Subs.stats`).
- ``caught_up``: wait until every subscriber is subscribed and has seen
  ``offset``; returns when that happened (``time.monotonic``, which is
  system-wide on Linux) or ``timeout``.
- ``close``: close every subscriber (no more reconnects).
- ``slowloris`` / ``slowloris_stats``: sockets that send a partial request head, a
  header line every ``interval`` seconds, and never finish it.
- ``cycles``: ``count`` connect + upgrade + subscribe + disconnect cycles.
- ``flood``: ``count`` upgrade attempts at once; counts 101s, 503s and errors.

Every wait has a deadline given by the test.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import errno
import hashlib
import os
import random
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MASK = b"\x37\xfa\x21\x3d"
IP_BIND_ADDRESS_NO_PORT = 24  # Linux; not exported by the socket module
OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA
RECV = memoryview(bytearray(1 << 16))


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    return f"{type(exc).__name__}: {exc}"[:120]


def frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked client frame (fixed mask: loopback only)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 | opcode, 0xFF)) + struct.pack("!Q", n)
    key = (MASK * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
    return head + MASK + masked


def upgrade_request(host: str, port: int) -> tuple[bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    head = (b"GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), port, key))
    return head, base64.b64encode(hashlib.sha1(key + GUID).digest())


def new_socket(src_ip: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if src_ip:
        # The port is chosen at connect(), unique per 4-tuple, so TIME_WAIT
        # sockets of earlier connections do not exhaust the range.
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((src_ip, 0))
    return sock


class WsProtocol(asyncio.BufferedProtocol):
    """One WebSocket connection: the upgrade, then frames to ``on_text``/``on_close``."""

    def __init__(self, host: str, port: int, on_text: Callable[[bytes], None]) -> None:
        self.request, self.accept = upgrade_request(host, port)
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int] = loop.create_future()
        self.close_code = 1006  # no close frame (yet)
        self.status = 0  # the HTTP status of the upgrade answer
        self.buf = b""
        self.is_upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def get_buffer(self, sizehint: int) -> memoryview:
        return RECV

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or ConnectionError(f"closed before the upgrade ({self.status})"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def send(self, obj: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(orjson.dumps(obj)))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def buffer_updated(self, nbytes: int) -> None:
        data = self.buf + bytes(RECV[:nbytes]) if self.buf else bytes(RECV[:nbytes])
        self.buf = b""
        if not self.is_upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            head, data = data[:end], data[end + 4:]
            first = head.split(b"\r\n", 1)[0].split(b" ")
            self.status = int(first[1]) if len(first) > 1 and first[1].isdigit() else -1
            if self.status != 101 or self.accept not in head:
                self.upgraded.set_exception(ConnectionError(f"upgrade refused: {self.status}"))
                assert self.transport is not None
                self.transport.abort()
                return
            self.is_upgraded = True
            self.upgraded.set_result(None)
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            n, hdr = b1 & 0x7F, 2
            if n == 126:
                if end - pos < 4:
                    break
                n, hdr = struct.unpack_from("!H", data, pos + 2)[0], 4
            elif n == 127:
                if end - pos < 10:
                    break
                n, hdr = struct.unpack_from("!Q", data, pos + 2)[0], 10
            if pos + hdr + n > end:
                break
            payload = data[pos + hdr:pos + hdr + n]
            pos += hdr + n
            opcode = b0 & 0x0F
            if opcode == OP_TEXT:
                self.on_text(payload)
            elif opcode == OP_PING:
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                assert self.transport is not None
                if not self.transport.is_closing():
                    self.transport.write(frame(payload[:2], OP_CLOSE))
                    self.transport.close()
                return
        self.buf = data[pos:]


async def open_ws(host: str, port: int, src_ip: str | None, on_text: Callable[[bytes], None],
                  timeout: float) -> WsProtocol:
    loop = asyncio.get_running_loop()
    sock = new_socket(src_ip)
    proto: WsProtocol | None = None
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            _, proto = await loop.create_connection(lambda: WsProtocol(host, port, on_text), sock=sock)
            await proto.upgraded
        return proto
    except BaseException:
        if proto is not None:
            proto.abort()
        else:
            sock.close()
        raise


# --- subscribers with recovery ------------------------------------------------------------


class Sub:
    """One subscriber that keeps its place in the topic across reconnects."""

    __slots__ = (
        "close_codes",
        "dups",
        "early",
        "epoch",
        "errors",
        "first_close",
        "gaps",
        "last",
        "last_at_first_close",
        "lost_known",
        "owner",
        "proto",
        "received",
        "reconnects",
        "recovered_false",
        "recovered_true",
        "refused",
        "src_ip",
        "start",
        "subscribed",
        "subscribed_at",
    )

    def __init__(self, owner: Subs, src_ip: str) -> None:
        self.owner = owner
        self.src_ip = src_ip
        self.proto: WsProtocol | None = None
        self.epoch: str | None = None
        self.start = -1   # the offset of the first subscribe reply
        self.last = -1    # the last offset seen
        self.received = 0
        self.gaps = 0
        self.dups = 0
        self.early = 0
        self.lost_known = 0
        self.recovered_true = 0
        self.recovered_false = 0
        self.reconnects = 0
        self.refused = 0   # failed (re)connect attempts
        self.first_close: int | None = None
        self.last_at_first_close = -1
        self.close_codes: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.subscribed = False
        self.subscribed_at = 0.0

    def on_pub(self, off: int) -> None:
        last = self.last
        if off <= last:
            self.dups += 1
            return
        if off != last + 1:
            self.gaps += off - last - 1
        self.last = off
        self.received += 1

    def on_text(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        op = msg.get("op")
        if op == "pub":
            if not self.subscribed:
                self.early += 1
                return
            self.on_pub(msg["offset"])
            return
        if msg.get("id") != "s":
            return
        if msg.get("ok") is not True:
            self.errors[f"subscribe: {msg.get('error')}"[:120]] += 1
            return
        if self.epoch is None:
            self.start = self.last = msg["offset"]
        elif msg.get("recovered") is False:
            self.recovered_false += 1
            self.lost_known += max(0, msg["offset"] - self.last)
            self.last = msg["offset"]
        else:
            self.recovered_true += 1
            for pub in msg.get("publications", ()):
                self.on_pub(pub["offset"])
        self.epoch = msg["epoch"]
        self.subscribed = True
        self.subscribed_at = time.monotonic()
        self.owner.on_subscribed(self)

    async def run(self, first: asyncio.Future[None]) -> None:
        o = self.owner
        backoff = o.backoff
        while True:
            try:
                proto = await open_ws(o.host, o.port, self.src_ip, self.on_text, o.timeout)
            except Exception as exc:
                self.refused += 1
                self.errors[describe(exc)] += 1
                if not o.reconnect and not first.done():
                    first.set_exception(exc)
                    return
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, o.backoff_max)
                continue
            self.proto = proto
            cmd: dict[str, Any] = {"op": "subscribe", "topic": o.topic, "id": "s"}
            if self.epoch is not None:
                cmd["since"] = {"epoch": self.epoch, "offset": self.last}
            proto.send(cmd)
            code = await proto.closed
            self.proto = None
            if self.subscribed:
                self.subscribed = False
                o.subscribed -= 1
            if self.first_close is None:
                self.first_close = code
                self.last_at_first_close = self.last
            self.close_codes[code] += 1
            if not first.done():
                first.set_exception(ConnectionError(f"closed {code} before subscribing"))
            if not o.reconnect or o.stopping:
                return
            self.reconnects += 1
            backoff = o.backoff
            await asyncio.sleep(random.uniform(0, backoff))


class Subs:
    def __init__(self, cmd: dict[str, Any]) -> None:
        self.host: str = cmd["host"]
        self.port: int = cmd["port"]
        self.topic: str = cmd["topic"]
        self.timeout: float = cmd.get("timeout", 10.0)
        self.reconnect: bool = cmd.get("reconnect", True)
        self.backoff: float = cmd.get("backoff", 0.2)
        self.backoff_max: float = cmd.get("backoff_max", 1.0)
        self.stopping = False
        self.subs = [Sub(self, ip) for ip in cmd["src_ips"]]
        self.subscribed = 0
        self.first_subscribed: dict[int, asyncio.Future[None]] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def on_subscribed(self, sub: Sub) -> None:
        self.subscribed += 1
        fut = self.first_subscribed.get(id(sub))
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def start(self, concurrency: int, phase_timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        t0 = time.monotonic()

        async def one(sub: Sub) -> None:
            async with sem:
                fut: asyncio.Future[None] = loop.create_future()
                self.first_subscribed[id(sub)] = fut
                self.tasks.append(asyncio.create_task(sub.run(fut)))
                await fut

        waits = [asyncio.create_task(one(s)) for s in self.subs]
        done, pending = await asyncio.wait(waits, timeout=phase_timeout)
        for task in pending:
            task.cancel()
        errors = collections.Counter(describe(t.exception()) for t in done  # type: ignore[arg-type]
                                     if t.exception() is not None)
        return {"subscribed": self.subscribed, "pending": len(pending), "errors": dict(errors.most_common(5)),
                "elapsed": time.monotonic() - t0}

    def stats(self) -> dict[str, Any]:
        subs = self.subs
        first: collections.Counter[str] = collections.Counter(str(s.first_close) for s in subs)
        codes: collections.Counter[str] = collections.Counter()
        errors: collections.Counter[str] = collections.Counter()
        for s in subs:
            codes.update({str(k): v for k, v in s.close_codes.items()})
            errors.update(s.errors)
        lasts = [s.last for s in subs] or [0]
        return {
            "conns": len(subs),
            "subscribed": self.subscribed,
            "received": sum(s.received for s in subs),
            "last_min": min(lasts), "last_max": max(lasts),
            "start_min": min((s.start for s in subs), default=0),
            "start_max": max((s.start for s in subs), default=0),
            "gaps": sum(s.gaps for s in subs),
            "subs_with_gaps": sum(1 for s in subs if s.gaps),
            "dups": sum(s.dups for s in subs),
            "early": sum(s.early for s in subs),
            "lost_known": sum(s.lost_known for s in subs),
            "recovered_true": sum(s.recovered_true for s in subs),
            "recovered_false": sum(s.recovered_false for s in subs),
            "subs_recovered_false": sum(1 for s in subs if s.recovered_false),
            "reconnects": sum(s.reconnects for s in subs),
            "refused": sum(s.refused for s in subs),
            "first_close": dict(first),
            "close_codes": dict(codes),
            "errors": dict(errors.most_common(6)),
            "subscribed_at_max": max((s.subscribed_at for s in subs), default=0.0),
            # The last offset each subscriber had seen when its first connection closed.
            "before_close_min": min((s.last_at_first_close for s in subs), default=-1),
            "before_close_max": max((s.last_at_first_close for s in subs), default=-1),
            "epochs": sorted({s.epoch or "" for s in subs}),
        }

    async def caught_up(self, offset: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            if self.subscribed == len(self.subs) and all(s.last >= offset for s in self.subs):
                return {"ok": True, "at": time.monotonic(), **self.stats()}
            if time.monotonic() > deadline:
                return {"ok": False, "at": time.monotonic(), **self.stats()}
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.stopping = True
        for s in self.subs:
            if s.proto is not None:
                s.proto.abort()
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)


# --- slowloris, cycles, flood ----------------------------------------------------------------


class Slowloris:
    def __init__(self) -> None:
        self.opened: list[float] = []
        self.closed: list[float] = []
        self.lifetimes: list[float] = []
        self.failed: collections.Counter[str] = collections.Counter()
        self.tasks: list[asyncio.Task[None]] = []
        self.socks: list[socket.socket] = []

    async def one(self, host: str, port: int, src_ip: str, interval: float, limit: float,
                  sem: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        sock = new_socket(src_ip)
        self.socks.append(sock)
        try:
            async with sem:
                async with asyncio.timeout(10):
                    await loop.sock_connect(sock, (host, port))
                    await loop.sock_sendall(sock, b"GET /ws HTTP/1.1\r\nHost: %s:%d\r\n"
                                            % (host.encode(), port))
        except Exception as exc:
            self.failed[describe(exc)] += 1
            sock.close()
            return
        opened = time.monotonic()
        self.opened.append(opened)
        i = 0
        try:
            async with asyncio.timeout(limit):
                while True:
                    # A header line now and then; the blank line never comes.
                    try:
                        async with asyncio.timeout(interval):
                            data = await loop.sock_recv(sock, 4096)
                            if not data:
                                break
                            continue  # an answer (408?) before the close: keep reading to EOF
                    except TimeoutError:
                        pass
                    await loop.sock_sendall(sock, b"X-Slow-%d: y\r\n" % i)
                    i += 1
        except TimeoutError:
            sock.close()
            return  # still open at the limit: not counted as closed
        except OSError:
            pass  # reset by the server: closed as well
        now = time.monotonic()
        self.closed.append(now)
        self.lifetimes.append(now - opened)
        sock.close()

    def stats(self) -> dict[str, Any]:
        lt = sorted(self.lifetimes)
        return {
            "opened": len(self.opened), "closed": len(self.closed), "failed": dict(self.failed),
            "first_open": min(self.opened, default=0.0), "last_open": max(self.opened, default=0.0),
            "last_close": max(self.closed, default=0.0),
            "lifetime_min": lt[0] if lt else 0.0, "lifetime_max": lt[-1] if lt else 0.0,
            "lifetime_p50": lt[len(lt) // 2] if lt else 0.0,
        }


async def cycles(cmd: dict[str, Any]) -> dict[str, Any]:
    """``count`` cycles: connect, upgrade, subscribe (ack awaited), then leave one of three ways:
    a close handshake, an abort (RST), or a TCP close without a close frame."""
    host, port, count = cmd["host"], cmd["port"], cmd["count"]
    ips: list[str] = cmd["src_ips"]
    topics: int = cmd.get("topics", 50)
    errors: collections.Counter[str] = collections.Counter()
    ok = 0
    next_i = 0
    t0 = time.monotonic()

    async def worker() -> None:
        nonlocal ok, next_i
        while next_i < count:
            i = next_i
            next_i += 1
            acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_text(payload: bytes, acked: asyncio.Future[None] = acked) -> None:
                if not acked.done():
                    acked.set_result(None)

            try:
                proto = await open_ws(host, port, ips[i % len(ips)], on_text, 10)
                try:
                    proto.send({"op": "subscribe", "topic": f"leak.{i % topics}", "id": 1})
                    async with asyncio.timeout(10):
                        await acked
                        how = i % 4
                        if how in (0, 1):   # a clean close handshake; the server closes TCP
                            assert proto.transport is not None
                            proto.transport.write(frame(struct.pack("!H", 1000), OP_CLOSE))
                            await proto.closed
                        elif how == 2:      # a reset, as from a crashed client
                            assert proto.transport is not None
                            proto.transport.get_extra_info("socket").setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            proto.abort()
                        else:               # TCP FIN with no close frame
                            assert proto.transport is not None
                            proto.transport.close()
                            await proto.closed
                    ok += 1
                finally:
                    proto.abort()
            except Exception as exc:
                errors[describe(exc)] += 1

    await asyncio.gather(*(worker() for _ in range(cmd.get("concurrency", 50))))
    return {"ok": ok, "failed": sum(errors.values()), "errors": dict(errors.most_common(5)),
            "elapsed": time.monotonic() - t0}


async def flood(cmd: dict[str, Any], held: list[WsProtocol]) -> dict[str, Any]:
    """``count`` upgrade attempts, ``concurrency`` at a time; a 101 is held open when ``hold``."""
    host, port, count = cmd["host"], cmd["port"], cmd["count"]
    ips: list[str] = cmd["src_ips"]
    sem = asyncio.Semaphore(cmd.get("concurrency", 200))
    result: collections.Counter[str] = collections.Counter()

    async def one(i: int) -> None:
        async with sem:
            proto: WsProtocol | None = None
            loop = asyncio.get_running_loop()
            sock = new_socket(ips[i % len(ips)])
            try:
                async with asyncio.timeout(10):
                    await loop.sock_connect(sock, (host, port))
                    _, proto = await loop.create_connection(lambda: WsProtocol(host, port, lambda b: None),
                                                            sock=sock)
                    await proto.upgraded
                result["101"] += 1
                if cmd.get("hold"):
                    held.append(proto)
                else:
                    proto.abort()
            except Exception as exc:
                status = proto.status if proto is not None else 0
                result[str(status) if status else describe(exc)] += 1
                if proto is not None:
                    proto.abort()
                else:
                    sock.close()

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    return {"results": dict(result), "elapsed": time.monotonic() - t0}


async def tcp_flood(cmd: dict[str, Any]) -> dict[str, Any]:
    """``count`` TCP (NDJSON) connections at once; each reads its first line or EOF."""
    host, port, count = cmd["host"], cmd["port"], cmd["count"]
    ips: list[str] = cmd["src_ips"]
    sem = asyncio.Semaphore(cmd.get("concurrency", 200))
    result: collections.Counter[str] = collections.Counter()
    socks: list[socket.socket] = []

    async def one(i: int) -> None:
        loop = asyncio.get_running_loop()
        async with sem:
            sock = new_socket(ips[i % len(ips)])
            socks.append(sock)
            try:
                async with asyncio.timeout(10):
                    await loop.sock_connect(sock, (host, port))
                    await loop.sock_sendall(sock, b'{"op":"ping","id":1}\n')
                    line = await loop.sock_recv(sock, 4096)
                msg = orjson.loads(line.split(b"\n")[0]) if line else {}
                if msg.get("op") == "close":
                    result[f"close {msg.get('code')}"] += 1
                elif msg.get("ok"):
                    result["accepted"] += 1
                else:
                    result[f"other {line[:40]!r}"] += 1
            except Exception as exc:
                result[describe(exc)] += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    for sock in socks:
        sock.close()
    return {"results": dict(result)}


# --- the command loop --------------------------------------------------------------------------


class Handler:
    def __init__(self) -> None:
        self.subs: Subs | None = None
        self.slow = Slowloris()
        self.held: list[WsProtocol] = []

    async def op_ping(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"pong": os.getpid()}

    async def op_subscribe(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.subs = Subs(cmd)
        return await self.subs.start(cmd.get("concurrency", 100), cmd.get("phase_timeout", 60))

    async def op_stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.subs is not None
        return self.subs.stats()

    async def op_caught_up(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.subs is not None
        return await self.subs.caught_up(cmd["offset"], cmd["timeout"])

    async def op_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.subs is not None:
            await self.subs.close()
        for proto in self.held:
            proto.abort()
        self.held.clear()
        for sock in self.slow.socks:
            sock.close()
        for task in self.slow.tasks:
            task.cancel()
        return {"closed": True}

    async def op_slowloris(self, cmd: dict[str, Any]) -> dict[str, Any]:
        sem = asyncio.Semaphore(cmd.get("concurrency", 200))
        ips: list[str] = cmd["src_ips"]
        for i in range(cmd["count"]):
            self.slow.tasks.append(asyncio.create_task(self.slow.one(
                cmd["host"], cmd["port"], ips[i % len(ips)], cmd.get("interval", 0.5), cmd.get("limit", 60),
                sem)))
        deadline = time.monotonic() + cmd.get("phase_timeout", 60)
        while (len(self.slow.opened) + sum(self.slow.failed.values()) < cmd["count"]
               and time.monotonic() < deadline):
            await asyncio.sleep(0.02)
        return self.slow.stats()

    async def op_slowloris_stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return self.slow.stats()

    async def op_cycles(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return await cycles(cmd)

    async def op_flood(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return await flood(cmd, self.held)

    async def op_tcp_flood(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return await tcp_flood(cmd)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    handler = Handler()
    tasks: set[asyncio.Task[None]] = set()
    out = sys.stdout.buffer

    async def run(cmd: dict[str, Any]) -> None:
        try:
            reply = await getattr(handler, f"op_{cmd['op']}")(cmd)
        except Exception as exc:
            reply = {"error": f"{cmd['op']}: {describe(exc)}"}
        out.write(orjson.dumps({**reply, "rid": cmd["rid"]}) + b"\n")
        out.flush()

    while line := await reader.readline():
        cmd = orjson.loads(line)
        if cmd["op"] == "exit":
            break
        task = asyncio.create_task(run(cmd))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await handler.op_close({})


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve())


if __name__ == "__main__":
    main()
