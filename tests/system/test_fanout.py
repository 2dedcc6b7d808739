"""Many subscribers on one topic: every one gets every publication, in offset order.

The hub batches publications per topic and hands one buffer to all
subscribers; this checks that batching never reorders, drops or repeats.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from ..peers import NdjsonClient, dumps, http_publish

pytestmark = pytest.mark.system

WS_SUBSCRIBERS = 200
TCP_SUBSCRIBERS = 50
PUBLICATIONS = 50
TOPIC = "fan"


def _check_sequence(name: str, received: list[dict[str, Any]]) -> None:
    offsets = [m["offset"] for m in received]
    assert offsets == list(range(1, PUBLICATIONS + 1)), f"{name}: offsets {offsets}"
    for m in received:
        assert m == {"op": "pub", "topic": TOPIC, "offset": m["offset"], "data": {"seq": m["offset"]}}, m


async def test_250_subscribers_get_every_publication_in_order(start_server: Any) -> None:
    rs = await start_server()
    results: dict[str, list[dict[str, Any]]] = {}
    ready = trio.Event()
    pending_ready = WS_SUBSCRIBERS + TCP_SUBSCRIBERS

    def mark_ready() -> None:
        nonlocal pending_ready
        pending_ready -= 1
        if pending_ready == 0:
            ready.set()

    async def ws_subscriber(i: int) -> None:
        async with open_websocket_url(rs.ws_url) as ws:
            # Half also subscribe to a noise topic, so batches mix topics.
            topics = [TOPIC, "noise"] if i % 2 else [TOPIC]
            for t in topics:
                await ws.send_message(dumps({"op": "subscribe", "topic": t, "id": t}))
                assert json.loads(await ws.get_message())["ok"] is True
            mark_ready()
            got: list[dict[str, Any]] = []
            while len(got) < PUBLICATIONS:
                msg = json.loads(await ws.get_message())
                if msg["topic"] == TOPIC:
                    got.append(msg)
            results[f"ws{i}"] = got

    async def tcp_subscriber(i: int) -> None:
        client = await NdjsonClient.connect(rs.tcp_port)
        async with client.stream:
            await client.send({"op": "subscribe", "topic": TOPIC, "id": 1})
            assert (await client.recv())["ok"] is True
            mark_ready()
            got: list[dict[str, Any]] = []
            while len(got) < PUBLICATIONS:
                got.append(await client.recv())
            results[f"tcp{i}"] = got

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(WS_SUBSCRIBERS):
                nursery.start_soon(ws_subscriber, i)
            for i in range(TCP_SUBSCRIBERS):
                nursery.start_soon(tcp_subscriber, i)
            await ready.wait()
            assert rs.server.hub.subscriber_count(TOPIC) == WS_SUBSCRIBERS + TCP_SUBSCRIBERS

            seq = 0
            batches_before = rs.server.hub.statistics().batches

            def publish() -> None:
                nonlocal seq
                seq += 1
                assert rs.server.hub.publish_nowait(TOPIC, {"seq": seq}).offset == seq
                rs.server.hub.publish_nowait("noise", {"seq": -seq})

            # A burst with no checkpoint: the hub sends it as one batch.
            for _ in range(20):
                publish()
            await trio.sleep(0)
            # One at a time, with fan-out free to run in between.
            for _ in range(20):
                publish()
                await trio.sleep(0)
            # Through the HTTP API, interleaved with in-process publications.
            while seq < PUBLICATIONS:
                seq += 1
                resp = await http_publish(rs.port, TOPIC, {"seq": seq})
                assert resp.json() == {"ok": True, "offset": seq,
                                       "subscribers": WS_SUBSCRIBERS + TCP_SUBSCRIBERS}
                rs.server.hub.publish_nowait("noise", {"seq": -seq})

    assert len(results) == WS_SUBSCRIBERS + TCP_SUBSCRIBERS
    for name, received in results.items():
        _check_sequence(name, received)
    stats = rs.server.hub.statistics()
    # Fewer batches than publications shows the burst really was batched.
    assert stats.batches - batches_before < 2 * PUBLICATIONS
