"""RSS per idle connection: SSE streams next to WebSocket subscribers, in one run.

    flock /tmp/trioserve-bench.lock .venv/bin/python benchmarks/sse_idle.py [N]

Starts ``trioserve serve`` as its own process, then for each transport opens N
connections that each subscribe to one topic of their own (an SSE stream is
``GET /sse?topic=...``, a WebSocket sends ``subscribe``), waits until every one
has its answer, lets the server settle, and reports (RSS after - RSS before) / N
from psutil, as ``trioserve bench idle`` does. Each measurement has a fresh
server process; the pair runs twice, to see the noise.

2026-12-06, N=3000, 2 shared cores: WebSocket 8.12 / 8.15 KB, SSE 7.42 / 7.48 KB
(a topic of its own per connection, so the hub's per-topic entry is included).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import trio

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CONCURRENCY = 200
SETTLE = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def read_until(stream: trio.SocketStream, marker: bytes, status: bytes) -> None:
    """Read until *marker* arrives; the response must start with *status*."""
    buf = b""
    while marker not in buf:
        data = await stream.receive_some(4096)
        assert data, f"EOF before {marker!r}"
        buf += data
    assert buf.startswith(status), buf[:100]


async def sse_one(port: int, i: int, held: list[trio.SocketStream]) -> None:
    stream = await trio.open_tcp_stream(HOST, port)
    await stream.send_all(f"GET /sse?topic=idle.sse.{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await read_until(stream, b"event: subscribed", b"HTTP/1.1 200")
    held.append(stream)


async def ws_one(port: int, i: int, held: list[trio.SocketStream]) -> None:
    # A bare-bones client (one handshake, one masked frame): nothing on this
    # side needs to stay alive but the socket.
    stream = await trio.open_tcp_stream(HOST, port)
    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    payload = f'{{"op":"subscribe","topic":"idle.ws.{i}","id":1}}'.encode()
    assert len(payload) < 126
    await stream.send_all(bytes([0x81, 0x80 | len(payload), 0, 0, 0, 0]) + payload)  # zero mask
    await read_until(stream, b'"ok":true', b"HTTP/1.1 101")
    held.append(stream)


async def phase(port: int, n: int, one: object, proc: psutil.Process) -> float:
    await trio.sleep(SETTLE)
    before = proc.memory_info().rss
    held: list[trio.SocketStream] = []
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def run(i: int) -> None:
        async with limiter:
            await one(port, i, held)  # type: ignore[operator]

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(run, i)
    await trio.sleep(SETTLE)
    after = proc.memory_info().rss
    assert len(held) == n
    return (after - before) / n / 1024


async def main(n: int) -> None:
    for name, one in (("WebSocket", ws_one), ("SSE", sse_one), ("WebSocket", ws_one), ("SSE", sse_one)):
        kb = await measure(n, one)
        print(f"{name:10} {kb:6.2f} KB RSS per idle subscribed connection ({n})")


async def measure(n: int, one: object) -> float:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "trioserve", "serve", "--port", str(port), "--log-level", "warning",
         "--max-subscriptions", "10"], cwd=REPO)
    try:
        proc = psutil.Process(server.pid)
        for _ in range(200):
            try:
                await (await trio.open_tcp_stream(HOST, port)).aclose()
                break
            except OSError:
                await trio.sleep(0.05)
        return await phase(port, n, one, proc)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    t0 = time.monotonic()
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
    print(f"({time.monotonic() - t0:.1f}s)")
