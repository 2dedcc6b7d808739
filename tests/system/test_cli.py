"""The CLI as a real process: start on port 0, drain on SIGTERM, exit at once on a second one."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from ..peers import OP_CLOSE, RawWebSocket, dumps
from ..serverproc import LISTENING, REPO, STARTUP_TIMEOUT, ServerProcess, trioserve_process
from .helpers import close_code

pytestmark = pytest.mark.system

@asynccontextmanager
async def run_cli(*args: str) -> AsyncIterator[ServerProcess]:
    """``python -m trioserve serve --port 0 ARGS``, its stderr collected as it comes."""
    async with trioserve_process("serve", "--port", "0", "--log-level", "info", *args) as sp:
        with trio.fail_after(STARTUP_TIMEOUT):
            sp.port = int((await sp.wait_for_log(LISTENING)).group(1))
        yield sp


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
