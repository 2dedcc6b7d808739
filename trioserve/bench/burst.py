"""The benchmark's publisher and warm-up helpers over a :class:`PushClient`:
subscribe and wait for the reply, or write a burst of publishes back to back.

Apart from :mod:`trioserve.bench.wsclient` (the connection and its parsers),
which holds what every load-client process runs per delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from .payloads import publication_data
from .wsclient import ProtocolError, PushClient

__all__ = ["publish_burst", "subscribe"]


async def subscribe(client: PushClient, topic: str, timeout: float) -> None:
    reply = await client.request({"op": "subscribe", "topic": topic}, timeout)
    if reply.get("ok") is not True:
        raise ProtocolError(f"subscribe refused: {reply!r}")


def publish_burst(
    client: PushClient, topic: str | Sequence[str], count: int, size: int, payload: str = "pad",
) -> tuple[float, list[asyncio.Future[dict[str, Any]]]]:
    """Write ``count`` publish frames back to back; don't wait for replies.

    *topic* is one topic, or a list that publication *i* takes entry ``i % len``
    of (the rooms scenario spreads a burst over all its topics). Each data
    object carries its own send time, padded to ``size`` bytes of JSON.
    Returns the time taken just before the first frame and the futures of
    the replies.
    """
    topics = (topic,) if isinstance(topic, str) else topic
    futures = []
    first = 0.0
    for i in range(count):
        data = publication_data(size, payload)
        if i == 0:
            first = data["t"]
        futures.append(client.request_nowait({"op": "publish", "topic": topics[i % len(topics)],
                                              "data": data}))
    return first, futures
