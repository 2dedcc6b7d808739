"""The in-process broker: the zero-config default."""

from __future__ import annotations

import secrets
from typing import Any

import trio

from ...protocol.messages import encode_publication
from .base import Broker

__all__ = ["MemoryBroker"]


class MemoryBroker(Broker):
    """Offsets counted in this process; history dies with it, so each process
    has a new epoch, and a client that presents the old one learns that its gap
    cannot be known."""

    synchronous = True

    def __init__(self) -> None:
        self._epoch = secrets.token_hex(8)
        self._offsets: dict[str, int] = {}

    def epoch(self, topic: str) -> str:
        return self._epoch

    def publish_nowait(self, topic: str, data: Any) -> int:
        offset = self._offsets.get(topic, 0) + 1
        payload = encode_publication(topic, offset, data)
        self._offsets[topic] = offset
        self.hub.deliver_nowait(topic, offset, payload)
        return offset

    async def publish(self, topic: str, data: Any) -> int:
        # trio's rule: an operation that raises Cancelled did not happen. So the
        # cancellation is checked before publishing, and the checkpoint after is shielded.
        await trio.lowlevel.checkpoint_if_cancelled()
        offset = self.publish_nowait(topic, data)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return offset
