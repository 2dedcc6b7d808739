"""Real processes for the fault-injection tests: servers, redis-servers, load clients, figures."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import attrs
import psutil  # type: ignore[import-untyped]
import trio
from prometheus_client.parser import text_string_to_metric_families

from trioserve.bench.pool import worker_main

from ..peers import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, http_request
from ..serverproc import LISTENING, STARTUP_TIMEOUT, ServerProcess, trioserve_process
from .loadclient import FaultWorker

#: Figures recorded by the tests, printed at the end of the run (conftest) and
#: written as JSON to $TRIOSERVE_FAULTS_RESULTS when it is set.
FIGURES: dict[str, dict[str, Any]] = {}


def record(name: str, **figures: Any) -> None:
    FIGURES[name] = figures
    out = os.environ.get("TRIOSERVE_FAULTS_RESULTS")
    if out:
        path = Path(out)
        existing = json.loads(path.read_text()) if path.exists() else {}
        existing[name] = figures
        path.write_text(json.dumps(existing, indent=1, sort_keys=True))


def env_int(name: str, default: int) -> int:
    """A size from the environment (to run the full experiment by hand), else *default*."""
    return int(os.environ.get(name, default))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def src_ips(count: int, per_ip: int = 2000, first: int = 0) -> list[str]:
    """One loopback source address per connection, *per_ip* connections each: 127.0.0.2, .3, …

    The whole of 127.0.0.0/8 is loopback on Linux; spreading the client side
    over several addresses keeps each under the ~28k ephemeral ports one
    address has towards one server port.
    """
    out = []
    for i in range(count):
        n = first + i // per_ip
        out.append(f"127.0.{n // 250}.{n % 250 + 2}")
    return out


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss / 2**20)


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak RSS since it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def machine() -> str:
    return (f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Linux {os.uname().release}, Python {sys.version.split()[0]}, "
            f"load average {os.getloadavg()[0]:.1f} at the start")


# --- servers ----------------------------------------------------------------------------------


@asynccontextmanager
async def run_server(*args: str, port: int = 0, level: str = "info",
                     ready: re.Pattern[bytes] = LISTENING) -> AsyncIterator[ServerProcess]:
    """``python -m trioserve serve --port PORT ARGS``; yields once it listens, stops it at the end."""
    async with trioserve_process("serve", "--port", str(port), "--log-level", level, *args) as sp:
        with trio.fail_after(STARTUP_TIMEOUT):
            if level in ("info", "debug"):
                sp.port = int((await sp.wait_for_log(ready)).group(ready.groups))
            else:
                # Quieter levels do not log the port: give one and poll it.
                assert port, "a fixed port is needed with log levels above info"
                sp.port = port
                while not await _healthy(port):
                    assert sp.proc.returncode is None, sp.text
                    await trio.sleep(0.05)
        yield sp


async def _healthy(port: int) -> bool:
    try:
        return (await http_request(port, "GET", "/healthz")).status == 200
    except OSError:
        return False


async def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {sample name + sorted labels: value}, summed over the ``worker`` label."""
    resp = await http_request(port, "GET", "/metrics")
    assert resp.status == 200, resp
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "worker")
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            out[key] = out.get(key, 0.0) + sample.value
    return out


# --- redis ------------------------------------------------------------------------------------


@attrs.define
class RedisProc:
    port: int
    directory: Path
    persistent: bool
    process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: run ./scripts/test, which installs it")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir",
                str(self.directory)]
        # With an append-only file fsynced on every write, a restart keeps every publication.
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.process = await trio.lowlevel.open_process(args, stdout=subprocess.DEVNULL)
        with trio.fail_after(10):
            while await self.command(b"PING") != b"+PONG\r\n":
                await trio.sleep(0.02)

    async def command(self, line: bytes) -> bytes:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            return b""
        async with stream:
            await stream.send_all(line + b"\r\n")
            return bytes(await stream.receive_some(65536))

    async def get_int(self, key: str) -> int:
        reply = await self.command(f"GET {key}".encode())
        # $N\r\n<value>\r\n, or $-1 for a missing key
        return 0 if reply.startswith(b"$-1") else int(reply.split(b"\r\n")[1])

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    def stop_signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)


@asynccontextmanager
async def redis_server(tmp: Path, persistent: bool = False) -> AsyncIterator[RedisProc]:
    r = RedisProc(free_port(), tmp, persistent)
    await r.start()
    try:
        yield r
    finally:
        if r.process is not None and r.process.returncode is None:
            r.process.send_signal(signal.SIGCONT)
            r.process.kill()
            await r.process.wait()


# --- load-client processes --------------------------------------------------------------------


class LoadProcs:
    """K load-client processes: ``trioserve.bench``'s worker loop with the fault tests'
    handler (:class:`~tests.faults.loadclient.FaultWorker`), driven from trio over
    their pipes. Each command carries an ``rid``; the reply carries it back."""

    def __init__(self, count: int, nursery: trio.Nursery) -> None:
        ctx = mp.get_context("spawn")  # fresh interpreters: nothing of the test's trio loop
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self._rids = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        self._dead: list[int] = []
        self._changed = trio.Event()
        for index in range(count):
            parent, child = ctx.Pipe()
            # The plain asyncio loop, which docs/reliability.md's figures were measured
            # with: how fast the client retries shapes the bursts a storm or flood makes.
            proc = ctx.Process(target=worker_main, args=(child, index, FaultWorker, "asyncio"),
                               daemon=True, name=f"fault-client-{index}")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
            nursery.start_soon(self._read, index)

    def __len__(self) -> int:
        return len(self.procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    async def _read(self, index: int) -> None:
        conn = self.conns[index]
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            try:
                # A reply is written whole once it starts: readable means it is coming.
                reply = conn.recv()
            except (EOFError, OSError):
                self._dead.append(index)
                self._changed.set()
                return
            self._replies[reply.pop("rid")] = reply
            self._changed.set()
            self._changed = trio.Event()

    async def ask(self, cmds: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        """Send cmds[i] to process i and wait for every reply (at most *timeout* s)."""
        rids = []
        for conn, cmd in zip(self.conns, cmds, strict=True):
            rid = next(self._rids)
            rids.append(rid)
            conn.send({**cmd, "rid": rid})
        with trio.fail_after(timeout):
            while not all(r in self._replies for r in rids):
                assert not self._dead, f"load client {self._dead[0]} exited"
                await self._changed.wait()
        out = [self._replies.pop(r) for r in rids]
        errors = [r["error"] for r in out if "error" in r]
        assert not errors, errors
        return out

    async def ask_all(self, cmd: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        return await self.ask([cmd] * len(self.procs), timeout)

    async def subscribe(self, port: int, topic: str, count: int, timeout: float = 90, **options: Any
                        ) -> list[dict[str, Any]]:
        """*count* subscribers split over the processes, each from its own source address."""
        ips = src_ips(count)
        k = len(self.procs)
        cmds = [{"op": "subscribe", "host": "127.0.0.1", "port": port, "topic": topic,
                 "src_ips": ips[i::k], "phase_timeout": timeout - 5, **options} for i in range(k)]
        return await self.ask(cmds, timeout)

    async def stats(self) -> dict[str, Any]:
        return merge_stats(await self.ask_all({"op": "stats"}, 30))

    async def caught_up(self, offset: int, timeout: float) -> dict[str, Any]:
        replies = await self.ask_all({"op": "caught_up", "offset": offset, "timeout": timeout}, timeout + 30)
        merged = merge_stats(replies)
        merged["ok"] = all(r["ok"] for r in replies)
        merged["at"] = max(r["at"] for r in replies)
        return merged

    async def stop(self) -> None:
        for conn in self.conns:
            try:
                conn.send({"op": "exit"})
            except OSError:
                pass
        with trio.move_on_after(10):
            while any(p.is_alive() for p in self.procs):
                await trio.sleep(0.05)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)


def merge_stats(replies: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for reply in replies:
        for key, value in reply.items():
            if key in ("ok", "at"):
                continue
            if key.endswith("_min"):
                out[key] = min(out.get(key, value), value)
            elif key.endswith("_max"):
                out[key] = max(out.get(key, value), value)
            elif key == "epochs":
                out[key] = sorted(set(out.get(key, [])) | set(value))
            elif isinstance(value, dict):
                merged = out.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            elif isinstance(value, (int, float)):
                out[key] = out.get(key, 0) + value
    return out


@asynccontextmanager
async def load_clients(count: int) -> AsyncIterator[LoadProcs]:
    conns: list[Connection] = []
    try:
        async with trio.open_nursery() as nursery:
            clients = LoadProcs(count, nursery)
            conns = clients.conns
            try:
                await clients.ask_all({"op": "ping"}, STARTUP_TIMEOUT)
                yield clients
            finally:
                with trio.CancelScope(shield=True):
                    await clients.stop()
                nursery.cancel_scope.cancel()
    finally:
        for conn in conns:
            conn.close()


# --- publishing ---------------------------------------------------------------------------------


@attrs.define
class Publisher:
    """A WebSocket publisher (``--client-publish``) that writes without waiting for replies.

    ``replies`` maps each publish id to its reply; ``close_code`` is the
    server's close code once it closed the connection.
    """

    ws: RawWebSocket
    replies: dict[int, dict[str, Any]] = attrs.Factory(dict)
    close_code: int | None = None
    closed: trio.Event = attrs.Factory(trio.Event)
    # The reader answers pings and the server's close while a test task is
    # publishing, and a trio stream takes one sender at a time: every send holds this.
    sending: trio.Lock = attrs.Factory(trio.Lock)

    async def publish(self, topic: str, i: int, data: Any) -> None:
        async with self.sending:
            await self.ws.send_json({"op": "publish", "topic": topic, "data": data, "id": i})

    async def read(self) -> None:
        try:
            while True:
                f = await self.ws.recv_frame()
                if f.opcode == OP_TEXT:
                    msg = f.json()
                    if isinstance(msg.get("id"), int):
                        self.replies[msg["id"]] = msg
                elif f.opcode == OP_PING:
                    async with self.sending:
                        await self.ws.send_frame(OP_PONG, f.payload)
                elif f.opcode == OP_CLOSE:
                    self.close_code = f.close_code
                    async with self.sending:
                        await self.ws.send_close(f.close_code or 1000)
                    break
        except Exception:
            pass
        finally:
            self.closed.set()

    def accepted(self) -> list[int]:
        return [i for i, r in self.replies.items() if r.get("ok") is True]

    def refused(self) -> list[int]:
        return [i for i, r in self.replies.items() if r.get("ok") is not True]


@asynccontextmanager
async def publisher(port: int) -> AsyncIterator[Publisher]:
    ws = await RawWebSocket.connect(port)
    pub = Publisher(ws)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pub.read)
            yield pub
            nursery.cancel_scope.cancel()
    finally:
        await ws.aclose()


async def http_publish_timed(port: int, topic: str, data: Any, timeout: float) -> tuple[int, float, Any]:
    """POST /api/publish: (status or 0 on a connection error / -1 on a timeout, seconds, body)."""
    t0 = time.monotonic()
    body = json.dumps({"topic": topic, "data": data}).encode()
    with trio.move_on_after(timeout):
        try:
            resp = await http_request(port, "POST", "/api/publish", body,
                                      [("Content-Type", "application/json")])
        except (OSError, trio.BrokenResourceError, AssertionError):
            return 0, time.monotonic() - t0, None
        return resp.status, time.monotonic() - t0, resp.json() if resp.body else None
    return -1, time.monotonic() - t0, None


@attrs.define
class PublishLog:
    """What each HTTP publish of :func:`steady_publisher` got: i -> (sent at, status, seconds, offset)."""

    results: dict[int, tuple[float, int, float, int | None]] = attrs.Factory(dict)
    sent: int = 0

    def count(self, status: int, since: float = 0.0, until: float = math.inf) -> int:
        return sum(1 for t, s, _, _ in self.results.values() if s == status and since <= t < until)

    def by_status(self, since: float = 0.0, until: float = math.inf) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, s, _, _ in self.results.values():
            if since <= t < until:
                out[str(s)] = out.get(str(s), 0) + 1
        return out

    def latencies(self, status: int, since: float = 0.0, until: float = math.inf) -> list[float]:
        return [d for t, s, d, _ in self.results.values() if s == status and since <= t < until]


async def steady_publisher(port: int, topic: str, rate: float, duration: float, log: PublishLog,
                           timeout: float = 30.0) -> None:
    """POST /api/publish *rate* times a second for *duration* s, each request in its own task
    (a stalled one does not hold up the next); data is ``{"i": i, "t": time.time()}``."""

    async def one(i: int) -> None:
        t = time.monotonic()
        status, seconds, body = await http_publish_timed(port, topic, {"i": i, "t": time.time()}, timeout)
        log.results[i] = (t, status, seconds, body.get("offset") if status == 200 and body else None)

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        i = 0
        while trio.current_time() < start + duration:
            i += 1
            nursery.start_soon(one, i)
            log.sent = i
            await trio.sleep_until(start + i / rate)


async def history(port: int, topic: str, upto: int) -> list[dict[str, Any]]:
    """Every publication of *topic* up to offset *upto*, paged from ``GET /api/history``."""
    out: list[dict[str, Any]] = []
    since = 0
    while since < upto:
        resp = await http_request(port, "GET", f"/api/history?topic={topic}&since={since}&limit=1000")
        assert resp.status == 200, resp
        page = resp.json()["publications"]
        if not page:
            break
        out += page
        since = page[-1]["offset"]
    return out
