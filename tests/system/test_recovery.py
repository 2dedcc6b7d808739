"""History and recovery: a subscriber that reconnects with `since` misses nothing."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from ..peers import RawWebSocket, http_request
from .helpers import subscribe_reply

pytestmark = pytest.mark.system

LIMIT = 20


async def test_reconnect_recovers_exactly_the_missed_publications(start_server: Any) -> None:
    rs = await start_server()
    hub = rs.server.hub
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port)
        first = await subscribe_reply(ws, "news")
        assert first["epoch"] == hub.epoch_of("t") and first["offset"] == 0 and "recovered" not in first
        for i in range(3):
            hub.publish_nowait("news", i)
        seen = [(await ws.recv_json())["offset"] for _ in range(3)]
        assert seen == [1, 2, 3]
        await ws.aclose()  # the client's connection dies mid-stream
        for i in range(3, 8):
            hub.publish_nowait("news", i)
        await hub.flush()
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            reply = await subscribe_reply(ws, "news", {"epoch": first["epoch"], "offset": seen[-1]})
            assert reply["recovered"] is True and reply["offset"] == 8
            assert [p["offset"] for p in reply["publications"]] == [4, 5, 6, 7, 8]
            assert [p["data"] for p in reply["publications"]] == [3, 4, 5, 6, 7]
            hub.publish_nowait("news", 8)
            assert (await ws.recv_json())["offset"] == 9


async def test_publications_racing_the_recovery_arrive_once(start_server: Any) -> None:
    """Publications keep coming while the client resubscribes: none lost, none twice."""
    rs = await start_server()
    hub = rs.server.hub
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port)
        epoch = (await subscribe_reply(ws, "t"))["epoch"]
        await ws.aclose()
        for i in range(50):
            hub.publish_nowait("t", i)

        async def keep_publishing() -> None:
            for i in range(50, 400):
                hub.publish_nowait("t", i)
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_publishing)
            ws = await RawWebSocket.connect(rs.port)
            async with ws.stream:
                reply = await subscribe_reply(ws, "t", {"epoch": epoch, "offset": 0})
                assert reply["recovered"] is True
                offsets = [p["offset"] for p in reply["publications"]]
                while not offsets or offsets[-1] < 400:
                    offsets.append((await ws.recv_json())["offset"])
    assert offsets == list(range(1, 401))


async def test_gap_older_than_history_is_not_recovered(start_server: Any) -> None:
    rs = await start_server(history_size=5)
    hub = rs.server.hub
    for i in range(20):
        hub.publish_nowait("t", i)
    await hub.flush()
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            reply = await subscribe_reply(ws, "t", {"epoch": hub.epoch_of("t"), "offset": 3})
            assert reply["recovered"] is False and reply["publications"] == []
            assert reply["offset"] == 20 and reply["epoch"] == hub.epoch_of("t")
            reply = await subscribe_reply(ws, "t", {"epoch": hub.epoch_of("t"), "offset": 15})
            assert reply["recovered"] is True
            assert [p["offset"] for p in reply["publications"]] == [16, 17, 18, 19, 20]


async def test_a_restarted_server_has_a_new_epoch(start_server: Any) -> None:
    before = await start_server()
    before.server.hub.publish_nowait("t", 1)
    await before.server.hub.flush()
    old_epoch = before.server.hub.epoch_of("t")
    await before.server.drain(1)
    after = await start_server()  # a restart: the memory broker's history is gone
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(after.port)
        async with ws.stream:
            reply = await subscribe_reply(ws, "t", {"epoch": old_epoch, "offset": 1})
    assert reply["recovered"] is False and reply["epoch"] != old_epoch and reply["offset"] == 0


async def test_history_api(start_server: Any) -> None:
    rs = await start_server(history_size=10)
    hub = rs.server.hub
    for i in range(15):
        hub.publish_nowait("t", i)
    await hub.flush()
    with trio.fail_after(LIMIT):
        page = (await http_request(rs.port, "GET", "/api/history?topic=t&since=8&limit=3")).json()
        assert page["complete"] is True and page["offset"] == 15 and page["epoch"] == hub.epoch_of("t")
        assert [p["offset"] for p in page["publications"]] == [9, 10, 11]
        old = (await http_request(rs.port, "GET", "/api/history?topic=t&since=0")).json()
        assert old["complete"] is False and [p["offset"] for p in old["publications"]] == list(range(6, 16))
        bad = await http_request(rs.port, "GET", "/api/history?topic=t&since=-1")
        assert bad.status == 400 and bad.json()["error"]["code"] == "bad_request"
        bad = await http_request(rs.port, "GET", "/api/history?since=1")
        assert bad.status == 400


async def test_recovery_too_big_for_one_reply_is_reported_as_a_gap(start_server: Any) -> None:
    rs = await start_server(history_size=100)
    hub = rs.server.hub
    blob = "x" * 20_000
    for i in range(80):  # ~1.6 MB of history: over what one reply may carry
        hub.publish_nowait("big", [i, blob])
    await hub.flush()
    with trio.fail_after(LIMIT):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            epoch = hub.epoch_of("big")
            reply = await subscribe_reply(ws, "big", {"epoch": epoch, "offset": 0})
            assert reply["recovered"] is False and reply["publications"] == [] and reply["offset"] == 80
            reply = await subscribe_reply(ws, "big", {"epoch": epoch, "offset": 50})  # 30 x 20 KB fits
            assert reply["recovered"] is True and len(reply["publications"]) == 30
