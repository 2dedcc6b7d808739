"""Running ``trioserve bench`` as a real process, and a lossy server double."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_websocket

REPO = Path(__file__).resolve().parents[2]
BENCH_TIMEOUT = 60.0


@attrs.frozen
class BenchResult:
    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any] | None


async def run_bench(tmp_path: Path, *args: str, timeout: float = BENCH_TIMEOUT) -> BenchResult:
    """``python -m trioserve bench ARGS --json FILE``; the report is read back from FILE."""
    out = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    cmd = [sys.executable, "-m", "trioserve", "bench", *args, "--no-progress", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
    with trio.fail_after(timeout):
        done = await trio.run_process(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                      capture_stdout=True, capture_stderr=True, check=False)
    report = json.loads(out.read_text()) if out.exists() else None
    return BenchResult(done.returncode, done.stdout.decode(errors="replace"),
                       done.stderr.decode(errors="replace"), report)


def fast(*args: str) -> tuple[str, ...]:
    """Options that keep a small run short: no ramp, no settling, short waits."""
    return ("--connect-rate", "0", "--settle", "0", "--drain-timeout", "3", *args)


@attrs.define
class LossyServer:
    """A tiny push server (trio-websocket) that never delivers offsets divisible by *skip_every*.

    Enough of the protocol for ``trioserve bench fanout``: subscribe (with
    offsets), publish (with replies), ping. No ``/metrics``.
    """

    skip_every: int
    port: int = 0
    offsets: defaultdict[str, int] = attrs.Factory(lambda: defaultdict(int))
    subscribers: defaultdict[str, list[trio_websocket.WebSocketConnection]] = attrs.Factory(
        lambda: defaultdict(list))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                msg = json.loads(await ws.get_message())
                reply: dict[str, Any] = {"id": msg.get("id"), "ok": True}
                topic = msg.get("topic", "")
                if msg["op"] == "subscribe":
                    self.subscribers[topic].append(ws)
                    reply.update(topic=topic, epoch="lossy", offset=self.offsets[topic])
                elif msg["op"] == "publish":
                    self.offsets[topic] += 1
                    offset = self.offsets[topic]
                    reply.update(offset=offset, subscribers=len(self.subscribers[topic]))
                    if offset % self.skip_every:
                        pub = json.dumps({"op": "pub", "topic": topic, "offset": offset,
                                          "data": msg["data"]})
                        for sub in list(self.subscribers[topic]):
                            try:
                                await sub.send_message(pub)
                            except trio_websocket.ConnectionClosed:
                                self.subscribers[topic].remove(sub)
                else:
                    reply["op"] = "pong"
                await ws.send_message(json.dumps(reply))
        except trio_websocket.ConnectionClosed:
            pass

    async def serve(self, *, task_status: trio.TaskStatus[LossyServer] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, self.handler, "127.0.0.1", 0, None)
            self.port = server.port
            task_status.started(self)
