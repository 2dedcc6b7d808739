"""``python -m trioserve ...`` as a real process, for tests that need one.

One piece for every such test (the CLI, workers, fault injection): start the
process, collect its stderr as it comes so a test can wait for a log line, and
make sure it is gone afterwards. Each caller decides what "ready" means.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

REPO = Path(__file__).resolve().parents[1]
#: "listening on http://127.0.0.1:PORT": group 1 is the port.
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+) ")
#: Starting Python and importing trio takes a moment on a loaded CI machine.
STARTUP_TIMEOUT = 20.0


@attrs.define
class ServerProcess:
    proc: trio.Process
    port: int = 0
    log: bytearray = attrs.Factory(bytearray)
    eof: bool = False
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def text(self) -> str:
        return self.log.decode(errors="replace")

    def feed(self, data: bytes) -> None:
        self.log += data
        self.eof = not data
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_eof(self) -> None:
        """Wait until every process holding the log pipe (workers too) has closed it."""
        while not self.eof:
            await self._changed.wait()

    async def wait_for_log(self, pattern: bytes | re.Pattern[bytes], start: int = 0) -> re.Match[bytes]:
        """The first match of *pattern* in the log after offset *start*, waiting for it."""
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, bytes) else pattern
        while (match := regex.search(self.log, start)) is None:
            if self.eof:
                raise AssertionError(f"{regex.pattern!r} not in the server's log:\n{self.text[-5000:]}")
            await self._changed.wait()
        return match


@asynccontextmanager
async def trioserve_process(*args: str) -> AsyncIterator[ServerProcess]:
    """``python -m trioserve ARGS``, with no ``TRIOSERVE_*`` variables inherited.

    At the end a process still running gets two SIGTERMs (a server exits at
    once, a supervisor kills its workers), then SIGKILL if it lingers.
    """
    cmd = [sys.executable, "-m", "trioserve", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(functools.partial(
            trio.run_process, cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
        ))
        sp = ServerProcess(proc)

        async def pump() -> None:
            assert proc.stderr is not None
            while data := await proc.stderr.receive_some(65536):
                sp.feed(bytes(data))
            sp.feed(b"")

        nursery.start_soon(pump)
        try:
            yield sp
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(5):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
            with trio.move_on_after(5):
                await proc.wait()
