"""A broker that publishes over the network, in-process: asynchronous like the
Redis broker, and able to be down. The push tests need one because the memory
broker is synchronous and never fails, and Redis is the system tests'."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from trioserve.protocol.messages import encode_publication
from trioserve.push.brokers import Broker, BrokerUnavailable


class RemoteBroker(Broker):
    synchronous = False

    def __init__(self, down: bool = False):
        self.down = down
        self.published: dict[str, list[tuple[int, bytes]]] = {}

    def _check(self) -> None:
        if self.down:
            raise BrokerUnavailable("connection refused")

    def epoch(self, topic: str) -> str:
        return "remote"

    async def publish(self, topic: str, data: Any) -> int:
        await trio.lowlevel.checkpoint()  # the round trip
        self._check()
        held = self.published.setdefault(topic, [])
        offset = len(held) + 1
        held.append((offset, encode_publication(topic, offset, data)))
        await self.hub.wait_for_space()
        self.hub.deliver_nowait(topic, offset, held[-1][1])
        return offset

    async def head(self, topic: str) -> tuple[str, int]:
        await trio.lowlevel.checkpoint()
        self._check()
        return "remote", len(self.published.get(topic, ()))

    async def fetch(self, topic: str, after: int, limit: int | None = None
                    ) -> tuple[list[tuple[int, bytes]], int]:
        await trio.lowlevel.checkpoint()
        self._check()
        run = [entry for entry in self.published.get(topic, ()) if entry[0] > after][:limit]
        return run, run[-1][0] if run else after


class PipelinedBroker(RemoteBroker):
    """A RemoteBroker that takes runs of publishes whole (as the embedded broker does)."""

    pipelined = True

    def __init__(self, down: bool = False):
        super().__init__(down)
        self.runs: list[int] = []

    async def publish_many(self, items: Sequence[tuple[str, Any]]) -> list[int | BrokerUnavailable]:
        self.runs.append(len(items))
        return await super().publish_many(items)


@attrs.frozen
class Lines:
    """A framing that writes each payload as a line (what NDJSON does)."""

    name: str = "lines"

    @property
    def frame_batch(self) -> Callable[[Any], bytes]:
        return lambda payloads: b"".join(p + b"\n" for p in payloads)

    @property
    def frame_open(self) -> None:
        return None


LINES = Lines()
