"""The servers under test: how to start them, probe them, sample and stop them.

Each server runs as its own subprocess so that its RSS and CPU time can be
read from its pid with psutil, apart from the load client and the harness.
``trioserve-redis`` also gets a redis-server of its own on a free loopback port
(no persistence), whose CPU time is read the same way and reported beside the
server's as the broker's.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from trioserve.bench.pool import PhaseError
from trioserve.bench.wsclient import open_ws

__all__ = ["HOST", "SERVERS", "PhaseError", "RedisProcess", "ServerProcess", "ServerSpec", "free_port",
           "http_get", "probe_available", "report_exc", "wait_ready"]

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PY = sys.executable


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: tuple[str, ...]  # "{port}" (and "{redis_port}") are substituted
    healthz: bool  # ready when GET /healthz (or ready_path) is 200; else when /ws upgrades
    probe: tuple[str, ...] | None = None  # must exit 0 for the server to be available
    # --workers: /healthz is 200 while the worker that answers is alive; /readyz only
    # once every worker is, so no share of the subscribers lands on one alone.
    ready_path: str = "/healthz"
    redis: bool = False  # start a redis-server for it first (its broker)
    #: The load clients offer permessage-deflate (and inflate what comes compressed).
    deflate: bool = False


# --rate-limit 0: the one publisher connection stands in for many publishers (the
# rooms burst sends 20,000 publications), and the other servers have no limit.
TRIOSERVE_ARGV = (PY, "-m", "trioserve", "serve", "--host", HOST, "--port", "{port}",
                  "--client-publish", "--log-level", "warning", "--rate-limit", "0")


SERVERS = {
    "trioserve": ServerSpec(
        "trioserve",
        TRIOSERVE_ARGV,
        healthz=True,
        probe=(PY, "-m", "trioserve", "serve", "--help"),
    ),
    # The embedded broker: a supervisor (the sequencer) and two workers. CPU is
    # read over the whole process tree (ServerProcess.cpu), every process counted.
    "trioserve-workers2": ServerSpec(
        "trioserve-workers2",
        (*TRIOSERVE_ARGV, "--workers", "2"),
        healthz=True,
        probe=(PY, "-m", "trioserve", "serve", "--help"),
        ready_path="/readyz",
    ),
    # The same server with the Redis broker (--broker redis://), against a
    # redis-server the harness starts for it.
    "trioserve-redis": ServerSpec(
        "trioserve-redis",
        (*TRIOSERVE_ARGV, "--broker", f"redis://{HOST}:{{redis_port}}/0"),
        healthz=True,
        probe=(PY, "-c", "import trioserve.push.brokers.redis"),
        redis=True,
    ),
    # The same server, its subscribers negotiating permessage-deflate: each
    # publication is compressed once and shared by all of them.
    "trioserve-deflate": ServerSpec(
        "trioserve-deflate",
        TRIOSERVE_ARGV,
        healthz=True,
        probe=(PY, "-m", "trioserve", "serve", "--help"),
        deflate=True,
    ),
    # The websockets library compresses per connection (a zlib context each).
    "websockets-deflate": ServerSpec(
        "websockets-deflate",
        (PY, str(REPO / "benchmarks/servers/ws_asyncio.py"), "--host", HOST, "--port", "{port}",
         "--deflate"),
        healthz=True,
        deflate=True,
    ),
    "websockets": ServerSpec(
        "websockets",
        (PY, str(REPO / "benchmarks/servers/ws_asyncio.py"), "--host", HOST, "--port", "{port}"),
        healthz=True,
    ),
    # The rooms scenario's second anchor: a Go gorilla/websocket hub, built on
    # first use; skipped with the reason when go or gorilla is missing.
    "go-hub": ServerSpec(
        "go-hub",
        (PY, str(REPO / "benchmarks/servers/go_hub.py"), "--host", HOST, "--port", "{port}"),
        healthz=True,
        probe=(PY, str(REPO / "benchmarks/servers/go_hub.py"), "--check"),
    ),
    "trio-websocket": ServerSpec(
        "trio-websocket",
        (PY, str(REPO / "benchmarks/servers/trio_websocket_naive.py"), "--host", HOST,
         "--port", "{port}"),
        healthz=False,
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- the broker of trioserve-redis ----------------------------------------------------

class RedisProcess:
    """A redis-server on a free loopback port, with no persistence, as the tests start it."""

    def __init__(self, log_path: Path, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise PhaseError("redis-server is not installed")
        self.port = free_port()
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.ps = psutil.Process(self.popen.pid)
        deadline = time.monotonic() + timeout
        while not self._pong():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PhaseError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def cpu(self) -> float:
        """User+system CPU seconds of the redis-server process."""
        try:
            t = self.ps.cpu_times()
        except psutil.Error:
            return math.nan
        return process_cpu_clock(self.ps.pid, t.user + t.system)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(5)


# -- the server under test -------------------------------------------------------

class ServerProcess:
    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.log_path = log_path
        self.redis = RedisProcess(log_path.with_suffix(".redis.log")) if spec.redis else None
        redis_port = str(self.redis.port) if self.redis else ""
        argv = [a.replace("{port}", str(port)).replace("{redis_port}", redis_port) for a in spec.argv]
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        self.ps = psutil.Process(self.popen.pid)

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise PhaseError(f"server exited with code {code}; log: {self.log_tail()}")
        if self.redis is not None and self.redis.popen.poll() is not None:
            raise PhaseError(f"its redis-server exited with code {self.redis.popen.returncode}")

    def broker_cpu(self) -> float | None:
        """CPU seconds of the server's own redis-server, None if it has none."""
        return self.redis.cpu() if self.redis is not None else None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.Error:
            return [self.ps]

    def rss(self) -> int:
        try:
            return sum(p.memory_info().rss for p in self._tree())
        except psutil.Error as exc:
            raise PhaseError(f"cannot read server RSS: {exc}; log: {self.log_tail()}") from None

    def cpu(self) -> tuple[float, float, float]:
        """(total, user, system) CPU seconds of the server and its children.

        ``total`` is user+system from the kernel's per-process CPU clock (ns
        resolution); psutil's user/system split comes in 10 ms ticks, too
        coarse for a fast server's burst, so it is kept only as the split.
        """
        total = user = system = 0.0
        for n, p in enumerate(self._tree()):
            try:
                t = p.cpu_times()
            except psutil.Error:  # exited: its time is gone with it
                return math.nan, math.nan, math.nan
            reaped = t.children_user + t.children_system if n == 0 else 0.0
            user += t.user + (t.children_user if n == 0 else 0.0)
            system += t.system + (t.children_system if n == 0 else 0.0)
            total += process_cpu_clock(p.pid, t.user + t.system) + reaped
        return total, user, system

    async def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while self.popen.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        if self.redis is not None:
            self.redis.stop()


def process_cpu_clock(pid: int, fallback: float) -> float:
    """User+system seconds of ``pid`` (all threads) from its POSIX CPU clock.

    Python has no clock_getcpuclockid(); this is the kernel's encoding of it
    (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)), Linux only.
    """
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return fallback


async def http_status(port: int, path: str) -> int:
    return (await http_get(port, path, body=False))[0]


async def http_get(port: int, path: str, body: bool = True) -> tuple[int, bytes]:
    """Status and body of ``GET path`` (the connection is closed after it)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
                     .encode())
        line = await reader.readline()
        return int(line.split()[1]), (await reader.read() if body else b"")
    finally:
        writer.close()


async def wait_ready(server: ServerProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            async with asyncio.timeout(2):
                if server.spec.healthz:
                    path = server.spec.ready_path
                    status = await http_status(server.port, path)
                    if status == 200:
                        return
                    last_error = f"{path} answered {status}"
                else:
                    (await open_ws(HOST, server.port, None, None, 2)).close()
                    return
        except (OSError, TimeoutError, ValueError, IndexError, ConnectionError) as exc:
            last_error = report_exc(exc)
        await asyncio.sleep(0.2)
    raise PhaseError(f"not ready after {timeout:.0f}s ({last_error}); log: {server.log_tail()}")


def report_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def probe_available(spec: ServerSpec) -> str | None:
    """None if the server can be started, else why not."""
    if spec.redis and shutil.which("redis-server") is None:
        return "redis-server is not installed"
    if spec.probe is None:
        return None
    try:
        done = subprocess.run(spec.probe, cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return report_exc(exc)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"`{' '.join(spec.probe[1:])}` failed: {lines[-1] if lines else done.returncode}"
    return None


