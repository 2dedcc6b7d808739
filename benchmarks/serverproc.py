"""The servers under test: how to start them, probe them, sample and stop them.

Each server runs as its own subprocess so that its RSS and CPU time can be
read from its pid with psutil, apart from the load client and the harness.
"""

from __future__ import annotations

import asyncio
import math
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

__all__ = ["HOST", "SERVERS", "PhaseError", "ServerProcess", "ServerSpec", "free_port",
           "probe_available", "report_exc", "wait_ready"]

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PY = sys.executable


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: tuple[str, ...]  # "{port}" is substituted
    healthz: bool  # ready when GET /healthz (or ready_path) is 200; else when /ws upgrades
    probe: tuple[str, ...] | None = None  # must exit 0 for the server to be available
    # --workers: /healthz is 200 while the worker that answers is alive; /readyz only
    # once every worker is, so no share of the subscribers lands on one alone.
    ready_path: str = "/healthz"


SERVERS = {
    "trioserve": ServerSpec(
        "trioserve",
        (PY, "-m", "trioserve", "serve", "--host", HOST, "--port", "{port}",
         "--client-publish", "--log-level", "warning"),
        healthz=True,
        probe=(PY, "-m", "trioserve", "serve", "--help"),
    ),
    # The embedded broker: a supervisor (the sequencer) and two workers. CPU is
    # read over the whole process tree (ServerProcess.cpu), every process counted.
    "trioserve-workers2": ServerSpec(
        "trioserve-workers2",
        (PY, "-m", "trioserve", "serve", "--host", HOST, "--port", "{port}", "--workers", "2",
         "--client-publish", "--log-level", "warning"),
        healthz=True,
        probe=(PY, "-m", "trioserve", "serve", "--help"),
        ready_path="/readyz",
    ),
    "websockets": ServerSpec(
        "websockets",
        (PY, str(REPO / "benchmarks/servers/ws_asyncio.py"), "--host", HOST, "--port", "{port}"),
        healthz=True,
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


# -- the server under test -------------------------------------------------------

class ServerProcess:
    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.log_path = log_path
        argv = [a.replace("{port}", str(port)) for a in spec.argv]
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        self.ps = psutil.Process(self.popen.pid)

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise PhaseError(f"server exited with code {code}; log: {self.log_tail()}")

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
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
                     .encode())
        line = await reader.readline()
        return int(line.split()[1])
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


