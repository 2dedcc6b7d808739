"""The CLI as a real process: start on port 0, drain on SIGTERM, exit at once on a second one."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from .helpers import OP_CLOSE, RawWebSocket, close_code, dumps

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+) ")
# Starting Python and importing trio takes a moment on a loaded CI machine.
STARTUP_TIMEOUT = 15.0


@attrs.define
class ServerProcess:
    proc: trio.Process
    port: int = 0
    log: bytearray = attrs.Factory(bytearray)
    eof: bool = False
    _log_changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def feed(self, data: bytes) -> None:
        self.log += data
        self.eof = not data
        self._log_changed.set()
        self._log_changed = trio.Event()

    async def wait_for_log(self, pattern: bytes | re.Pattern[bytes]) -> re.Match[bytes]:
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, bytes) else pattern
        while (match := regex.search(self.log)) is None:
            if self.eof:
                raise AssertionError(f"{regex.pattern!r} not in the server's log:\n{self.text}")
            await self._log_changed.wait()
        return match

    @property
    def text(self) -> str:
        return self.log.decode(errors="replace")


@asynccontextmanager
async def run_cli(*args: str) -> AsyncIterator[ServerProcess]:
    """``python -m trioserve serve --port 0 ARGS``, its stderr collected as it comes."""
    cmd = [sys.executable, "-m", "trioserve", "serve", "--port", "0", "--log-level", "info", *args]
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
            with trio.fail_after(STARTUP_TIMEOUT):
                sp.port = int((await sp.wait_for_log(_LISTENING)).group(1))
            yield sp
        finally:
            if proc.returncode is None:
                proc.kill()
            with trio.move_on_after(5):
                await proc.wait()


async def _subscriber(url: str, codes: list[int | None], *, task_status: trio.TaskStatus[None]) -> None:
    """Subscribe, report ready, then read until the server closes; record its close code."""
    async with open_websocket_url(url) as ws:
        await ws.send_message(dumps({"op": "subscribe", "topic": "t", "id": 1}))
        assert json.loads(await ws.get_message())["ok"] is True
        task_status.started()
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            codes.append(close_code(exc))


async def test_sigterm_drains_clients_with_1001_and_exits_0() -> None:
    codes: list[int | None] = []
    drain_timeout = 10.0
    with trio.fail_after(STARTUP_TIMEOUT + drain_timeout + 10):
        async with run_cli("--drain-timeout", str(drain_timeout)) as sp:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    await nursery.start(_subscriber, sp.ws_url, codes)
                sp.proc.send_signal(signal.SIGTERM)
                with trio.fail_after(drain_timeout):
                    returncode = await sp.proc.wait()
            # The stderr pipe may still hold the last lines after the exit.
            await sp.wait_for_log(b"drained ")
    assert returncode == 0, sp.text
    assert codes == [1001, 1001, 1001], sp.text
    assert "SIGTERM: draining" in sp.text
    assert "drained 3, forced 0" in sp.text, sp.text


async def test_second_sigterm_exits_at_once_nonzero() -> None:
    with trio.fail_after(STARTUP_TIMEOUT + 15):
        async with run_cli("--drain-timeout", "30") as sp:
            # A client that never answers the close keeps the drain waiting.
            held = await RawWebSocket.connect(sp.port)
            async with held.stream:
                await held.send_json({"op": "subscribe", "topic": "t", "id": 1})
                assert (await held.recv_json())["ok"] is True

                sp.proc.send_signal(signal.SIGTERM)
                await sp.wait_for_log(b"SIGTERM: draining")
                # The close frame is out: the drain is now waiting on this client.
                frame = await held.recv_frame()
                assert frame.opcode == OP_CLOSE and frame.close_code == 1001, frame

                sp.proc.send_signal(signal.SIGTERM)
                # Well under the 5 s close timeout and the 30 s drain: only the
                # second signal can end the process this soon.
                with trio.fail_after(3):
                    returncode = await sp.proc.wait()
                await sp.wait_for_log(b"SIGTERM again")
    assert returncode != 0, sp.text
    assert returncode == 128 + signal.SIGTERM, returncode


async def test_cli_rejects_bad_config() -> None:
    # Config validation runs before anything is bound, and says what is wrong.
    with trio.fail_after(STARTUP_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-m", "trioserve", "serve", "--port", "0", "--tcp-port", "0",
             "--max-message-size", "0"],
            cwd=REPO, capture_stdout=True, capture_stderr=True, check=False,
        )
    assert result.returncode == 2, result
    assert b"max-message-size" in result.stderr
