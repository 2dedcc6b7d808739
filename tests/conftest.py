"""Shared fixtures: an in-process server on free ports, and small raw clients."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import trio
from hypothesis import settings

from trioserve import Config, Server

# CI machines are shared and noisy: a per-example deadline would turn load into
# failures. print_blob makes any real failure reproducible from the log.
settings.register_profile("trioserve", deadline=None, print_blob=True)
settings.load_profile("trioserve")


@attrs.define
class RunningServer:
    server: Server
    nursery: trio.Nursery

    @property
    def port(self) -> int:
        return self.server.addresses["ws+http"][0][1]

    @property
    def tcp_port(self) -> int:
        return self.server.addresses["tcp"][0][1]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


ServerFactory = Callable[..., Any]


@pytest.fixture
async def start_server() -> AsyncIterator[ServerFactory]:
    """``await start_server(**config)`` runs a Server on port 0 (and a TCP port 0).

    The server is cancelled when the test ends; tests that drain do so themselves.
    """
    async with trio.open_nursery() as nursery:

        async def start(server_kwargs: dict[str, Any] | None = None, **config: Any) -> RunningServer:
            config.setdefault("port", 0)
            config.setdefault("tcp_port", 0)
            server = Server(Config(**config), **(server_kwargs or {}))
            await nursery.start(server.serve)
            return RunningServer(server, nursery)

        yield start
        nursery.cancel_scope.cancel()


@attrs.define
class RedisServer:
    port: int
    process: trio.Process

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_redis(port: int | None = None) -> RedisServer:
    """A real redis-server on a free loopback port, with no persistence."""
    import shutil

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run ./scripts/test, which installs it")
    port = port or _free_port()
    process = await trio.lowlevel.open_process(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.send_all(b"PING\r\n")
            if (await stream.receive_some(100)).startswith(b"+PONG"):
                await stream.aclose()
                break
            await stream.aclose()
    return RedisServer(port, process)


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    """A fresh redis-server for one test; the test may stop and restart it."""
    server = await start_redis()
    try:
        yield server
    finally:
        for proc in (server.process,):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
