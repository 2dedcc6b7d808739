"""Shared fixtures: an in-process server on free ports, and small raw clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import trio

from trioserve import Config, Server


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
