"""The fault tests' load-client handler, run in ``trioserve.bench`` worker processes.

:class:`tests.faults.helpers.LoadProcs` starts the processes with
``trioserve.bench.pool.worker_main`` and this handler, so the command loop,
the connections (``trioserve.bench.wsclient``) and the reconnecting,
recovering subscribers (``trioserve.bench.subscriber``) are the ones
``trioserve bench`` uses. Here are only the load modes that are the fault
tests' own. Commands (``op``):

- ``subscribe``: one subscriber per entry of ``src_ips`` on ``topic``. With
  ``reconnect``, a subscriber whose connection ends (any close code, a
  reset, a refused reconnect, a 503) reconnects after a random wait and
  resubscribes with ``since``. Every subscriber checks that the offsets it
  sees, live or recovered, are exactly consecutive.
- ``stats``: the subscribers' counters, summed (see :meth:`FaultWorker.op_stats`).
- ``caught_up``: wait until every subscriber is subscribed and has seen
  ``offset``; returns when that happened (``time.monotonic``, which is
  system-wide on Linux) or ``timeout``.
- ``close``: close every subscriber (no more reconnects) and every held socket.
- ``slowloris`` / ``slowloris_stats``: sockets that send a partial request head, a
  header line every ``interval`` seconds, and never finish it.
- ``cycles``: ``count`` connect + upgrade + subscribe + disconnect cycles.
- ``flood`` / ``tcp_flood``: ``count`` WebSocket upgrades / NDJSON connections
  at once; counts 101s, 503s, close lines and errors.

Every wait has a deadline given by the test.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import time
from typing import Any

from trioserve.bench.burst import subscribe
from trioserve.bench.pool import describe
from trioserve.bench.subscriber import Followers
from trioserve.bench.wsclient import (
    OP_CLOSE,
    Deliveries,
    ProtocolError,
    PushClient,
    bound_socket,
    encode_frame,
    open_client,
    open_ws,
)


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
        sock = bound_socket(src_ip)
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
            try:
                client = await open_ws(host, port, ips[i % len(ips)], None, 10)
                try:
                    async with asyncio.timeout(10):
                        await subscribe(client, f"leak.{i % topics}", 10)
                        assert client.transport is not None
                        how = i % 4
                        if how in (0, 1):   # a clean close handshake; the server closes TCP
                            client.transport.write(encode_frame(struct.pack("!H", 1000), OP_CLOSE))
                            await client.closed
                        elif how == 2:      # a reset, as from a crashed client
                            client.transport.get_extra_info("socket").setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            client.abort()
                        else:               # TCP FIN with no close frame
                            client.close()
                            await client.closed
                    ok += 1
                finally:
                    client.abort()
            except Exception as exc:
                errors[describe(exc)] += 1

    await asyncio.gather(*(worker() for _ in range(cmd.get("concurrency", 50))))
    return {"ok": ok, "failed": sum(errors.values()), "errors": dict(errors.most_common(5)),
            "elapsed": time.monotonic() - t0}


async def flood(cmd: dict[str, Any], held: list[PushClient]) -> dict[str, Any]:
    """``count`` upgrade attempts, ``concurrency`` at a time; a 101 is held open when ``hold``."""
    host, port, count = cmd["host"], cmd["port"], cmd["count"]
    ips: list[str] = cmd["src_ips"]
    sem = asyncio.Semaphore(cmd.get("concurrency", 200))
    result: collections.Counter[str] = collections.Counter()

    async def one(i: int) -> None:
        async with sem:
            try:
                client = await open_ws(host, port, ips[i % len(ips)], None, 10)
            except Exception as exc:
                status = exc.status if isinstance(exc, ProtocolError) else 0
                result[str(status) if status else describe(exc)] += 1
                return
            result["101"] += 1
            if cmd.get("hold"):
                held.append(client)
            else:
                client.abort()

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    return {"results": dict(result), "elapsed": time.monotonic() - t0}


async def tcp_flood(cmd: dict[str, Any]) -> dict[str, Any]:
    """``count`` TCP (NDJSON) connections at once; each sends a ping and waits for its
    reply or the server's close line."""
    host, port, count = cmd["host"], cmd["port"], cmd["count"]
    ips: list[str] = cmd["src_ips"]
    sem = asyncio.Semaphore(cmd.get("concurrency", 200))
    result: collections.Counter[str] = collections.Counter()
    clients: list[PushClient] = []

    async def one(i: int) -> None:
        async with sem:
            try:
                client = await open_client("tcp", host, port, ips[i % len(ips)], None, 10)
            except Exception as exc:
                result[describe(exc)] += 1
                return
            clients.append(client)
            try:
                reply = await client.request({"op": "ping"}, 10)
            except Exception as exc:
                if client.close_code is None:
                    result[describe(exc)] += 1
                    return
                reply = {}
            if client.close_code is not None:
                result[f"close {client.close_code}"] += 1
            elif reply.get("ok"):
                result["accepted"] += 1
            else:
                result[f"other {str(reply)[:40]}"] += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    for client in clients:
        client.close()
    return {"results": dict(result)}


class FaultWorker:
    """The handler of one load-client process (``trioserve.bench.pool`` calls ``op_<name>``)."""

    def __init__(self, index: int) -> None:
        self.index = index
        # The tests publish their own data, with no send-time stamp to take latency from.
        self.deliveries = Deliveries(stamped=False)
        self.followers: Followers | None = None
        self.planned = 0
        self.slow = Slowloris()
        self.held: list[PushClient] = []

    def op_ping(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"pong": self.index}

    async def op_subscribe(self, cmd: dict[str, Any]) -> dict[str, Any]:
        host, port = cmd["host"], cmd["port"]

        async def opener(src_ip: str | None, timeout: float) -> PushClient:
            return await open_ws(host, port, src_ip, self.deliveries, timeout)

        f = self.followers = Followers(opener, cmd.get("timeout", 10.0), cmd.get("reconnect", True),
                                       cmd.get("backoff", 0.2), cmd.get("backoff_max", 1.0))
        ips: list[str] = cmd["src_ips"]
        self.planned = len(ips)
        sem = asyncio.Semaphore(cmd.get("concurrency", 100))
        t0 = time.monotonic()

        async def one(src_ip: str) -> None:
            async with sem:
                await f.start(src_ip, cmd["topic"])

        waits = [asyncio.create_task(one(ip)) for ip in ips]
        done, pending = await asyncio.wait(waits, timeout=cmd.get("phase_timeout", 60))
        for task in pending:
            task.cancel()
        errors = collections.Counter(describe(exc) for t in done if (exc := t.exception()) is not None)
        return {"subscribed": self.subscribed(), "pending": len(pending),
                "errors": dict(errors.most_common(5)), "elapsed": time.monotonic() - t0}

    def subscribed(self) -> int:
        return sum(1 for s in self.followers.subs if s.subscribed) if self.followers else 0

    def op_stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        f = self.followers
        assert f is not None
        subs = f.subs
        first = {str(k): v for k, v in f.first_close.items()}
        if self.planned > len(f.seen_at_first_close):
            first["None"] = self.planned - len(f.seen_at_first_close)
        lasts = [s.client.last_offset for s in subs] or [0]
        # -1 while a subscriber's first connection is still open, as for one never connected.
        at_close = f.seen_at_first_close if len(f.seen_at_first_close) == self.planned else [-1]
        return {
            "conns": self.planned,
            "subscribed": self.subscribed(),
            "received": sum(s.received for s in subs),
            "last_min": min(lasts), "last_max": max(lasts),
            "start_min": min((s.start_offset for s in subs), default=0),
            "start_max": max((s.start_offset for s in subs), default=0),
            "gaps": sum(s.gaps for s in subs),
            "subs_with_gaps": sum(1 for s in subs if s.gaps),
            "dups": sum(s.dups for s in subs),
            "early": sum(s.early for s in subs),
            "lost_known": sum(s.unrecovered for s in subs),
            "recovered_true": sum(s.recoveries for s in subs),
            "recovered_false": sum(s.gaps_told for s in subs),
            "subs_recovered_false": sum(1 for s in subs if s.gaps_told),
            "reconnects": sum(s.reconnects for s in subs),
            "refused": f.refused,
            "first_close": first,
            "close_codes": {str(k): v for k, v in f.close_codes.items()},
            "errors": dict(f.errors.most_common(6)),
            # The last offset each subscriber had seen when its first connection closed.
            "before_close_min": min(at_close, default=-1),
            "before_close_max": max(at_close, default=-1),
            "epochs": sorted({s.epoch or "" for s in subs}),
        }

    async def op_caught_up(self, cmd: dict[str, Any]) -> dict[str, Any]:
        f = self.followers
        assert f is not None
        offset = cmd["offset"]
        deadline = time.monotonic() + cmd["timeout"]
        while True:
            done = (len(f.subs) == self.planned
                    and all(s.subscribed and s.client.last_offset >= offset for s in f.subs))
            if done or time.monotonic() > deadline:
                return {"ok": done, "at": time.monotonic(), **self.op_stats(cmd)}
            await asyncio.sleep(0.02)

    async def op_close(self, cmd: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.followers is not None:
            await self.followers.close()
        for client in self.held:
            client.abort()
        self.held.clear()
        for sock in self.slow.socks:
            sock.close()
        for task in self.slow.tasks:
            task.cancel()
        return {"closed": True}

    async def close(self) -> None:
        await self.op_close()

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

    def op_slowloris_stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return self.slow.stats()

    async def op_cycles(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return await cycles(cmd)

    async def op_flood(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return await flood(cmd, self.held)

    async def op_tcp_flood(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return await tcp_flood(cmd)
