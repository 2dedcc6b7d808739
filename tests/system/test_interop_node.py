"""Interop with Node's ``ws`` package: a separate runtime and a third WebSocket implementation.

Needs ``npm ci --prefix tests/interop`` (the test script runs it); without it
this test fails rather than skips, so a CI run that forgot it cannot pass.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from ..peers import ByteReader

pytestmark = pytest.mark.system

INTEROP_DIR = Path(__file__).resolve().parents[1] / "interop"
CLIENT = INTEROP_DIR / "client.mjs"
INSTALL_HINT = "run `npm ci --prefix tests/interop` from the repository root"


@pytest.fixture
def node() -> str:
    """The node binary, once the interop client's dependencies are installed.

    A plain fixture so a missing install is reported at setup, outside Trio's
    exception groups, as one readable line.
    """
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not on PATH; install Node 20 and {INSTALL_HINT}")
    if not (INTEROP_DIR / "node_modules" / "ws" / "package.json").is_file():
        pytest.fail(f"tests/interop/node_modules/ws is missing; {INSTALL_HINT}")
    return node


async def test_node_ws_client_receives_publications(node: str, start_server: Any) -> None:
    rs = await start_server()
    count = 20
    events: list[dict[str, Any]] = []
    stderr = b""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(functools.partial(
                trio.run_process, [node, str(CLIENT), rs.ws_url, "feed", str(count), "15000"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
            ))
            assert proc.stdout is not None and proc.stderr is not None

            async def collect_stderr() -> None:
                nonlocal stderr
                assert proc.stderr is not None
                stderr = await ByteReader(proc.stderr).read_to_eof()

            nursery.start_soon(collect_stderr)
            lines = ByteReader(proc.stdout)

            async def next_event() -> dict[str, Any]:
                line = await lines.read_until(b"\n")
                assert line is not None, f"node exited early; stderr: {stderr.decode(errors='replace')}"
                event: dict[str, Any] = json.loads(line)
                events.append(event)
                return event

            # Publishing before the subscription is in place would lose messages.
            first = await next_event()
            assert first == {"event": "subscribed",
                             "reply": {"id": 1, "ok": True, "topic": "feed",
                                 "epoch": rs.server.hub.epoch_of("t"), "offset": 0}}, events

            # Bursts with a checkpoint between them, so both single-publication
            # frames and multi-publication batches reach the client.
            for i in range(1, count + 1):
                rs.server.hub.publish_nowait("feed", {"i": i, "text": "é✓" * i})
                if i % 5 == 0:
                    await trio.sleep(0)

            while (await next_event())["event"] != "close":
                pass
            assert await lines.read_until(b"\n") is None, "output after the close event"
            returncode = await proc.wait()

    assert returncode == 0, f"node exited {returncode}; events: {events}; stderr: {stderr!r}"
    pubs = [e["msg"] for e in events if e["event"] == "pub"]
    assert pubs == [
        {"op": "pub", "topic": "feed", "offset": i, "data": {"i": i, "text": "é✓" * i}}
        for i in range(1, count + 1)
    ]
    assert events[-2] == {"event": "pong", "reply": {"id": 2, "ok": True, "op": "pong"}}
    assert events[-1]["event"] == "close" and events[-1]["code"] == 1000, events[-1]
    assert len(events) == count + 3, events
