"""``trioserve serve --workers 2`` with no ``--broker``: the supervisor is the embedded broker.

Real processes: a supervisor that sequences every topic, and two workers that
share them through it. The protocol's promises must hold across workers:
gapless offsets, recovery with ``since`` on either worker, a drain that
delivers everything accepted before its 1001, a killed worker's clients
recovering, and workers that exit when their supervisor is gone.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import attrs
import pytest
import trio

import trioserve.client

from ..peers import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, http_publish
from ..serverproc import STARTUP_TIMEOUT
from .helpers import subscribe_reply
from .test_workers import (
    CLIENTS,
    LIMIT,
    close_all,
    connections_by_worker,
    next_pubs,
    run_workers,
    subscribed,
    worker_pids,
)

pytestmark = pytest.mark.system


async def pubs(ws: RawWebSocket, count: int) -> list[int]:
    """The offsets of the next *count* publications."""
    offsets = []
    while len(offsets) < count:
        msg = await ws.recv_json()
        if msg.get("op") == "pub":
            offsets.append(msg["offset"])
    return offsets


async def total_connections(port: int, total: int) -> None:
    """Wait until the workers together hold *total* client connections (a closed
    one leaves its worker a moment after the client's side is gone)."""
    while sum((await connections_by_worker(port)).values()) != total:
        await trio.sleep(0.02)


async def subscribed_on(port: int, worker: str | None, since: dict[str, Any] | None = None,
                        ) -> tuple[RawWebSocket, str, dict[str, Any]]:
    """A client subscribed to "t" on *worker* (any when None): which worker the
    kernel picked is read from the per-worker connection counts."""
    extra: list[RawWebSocket] = []
    try:
        while True:
            before = await connections_by_worker(port)
            ws = await RawWebSocket.connect(port)
            reply = await subscribe_reply(ws, "t", since)
            after = await connections_by_worker(port)
            (landed,) = [w for w, n in after.items() if n > before.get(w, 0)]
            if worker is None or landed == worker:
                return ws, landed, reply
            extra.append(ws)
    finally:
        await close_all(extra)


async def test_no_broker_means_the_embedded_one_and_publications_span_workers() -> None:
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--client-publish") as sp:
            assert b"broker embedded (this supervisor is the sequencer)" in sp.log
            clients = [await subscribed(sp.port) for _ in range(CLIENTS)]
            try:
                by_worker = await connections_by_worker(sp.port)
                assert min(by_worker.values()) > 0, f"one worker got every client: {by_worker}"
                for n in range(3):
                    resp = await http_publish(sp.port, "t", {"n": n})
                    assert resp.status == 200, resp.body
                    assert resp.json()["offset"] == n + 1
                    assert await next_pubs(clients) == [{"n": n}] * CLIENTS
                # A burst from one client: in flight together, answered in order,
                # and every subscriber on either worker gets it gapless.
                publisher = await RawWebSocket.connect(sp.port)
                try:
                    await publisher.send_many({"op": "publish", "topic": "t", "data": i, "id": i}
                                              for i in range(300))
                    replies = [await publisher.recv_json() for _ in range(300)]
                finally:
                    await publisher.aclose()
                assert [(r["id"], r["offset"]) for r in replies] == [(i, i + 4) for i in range(300)]
                for ws in clients:
                    assert await pubs(ws, 300) == list(range(4, 304))
                history = await _history(sp.port, 300)
                assert history["publications"][-1] == {"op": "pub", "topic": "t", "offset": 303,
                                                       "data": 299}
            finally:
                await close_all(clients)


async def _history(port: int, since: int) -> Any:
    from ..peers import http_request

    resp = await http_request(port, "GET", f"/api/history?topic=t&since={since}&limit=10")
    assert resp.status == 200, resp
    return resp.json()


async def test_recovery_with_since_on_the_other_worker() -> None:
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers() as sp:
            first, worker, reply = await subscribed_on(sp.port, None)
            epoch = reply["epoch"]
            for n in range(1, 4):
                assert (await http_publish(sp.port, "t", n)).status == 200
            assert await pubs(first, 3) == [1, 2, 3]
            await first.aclose()
            await total_connections(sp.port, 0)
            # Missed while away: the worker it comes back to never had the topic.
            for n in range(4, 11):
                assert (await http_publish(sp.port, "t", n)).status == 200
            other = "2" if worker == "1" else "1"
            back, landed, reply = await subscribed_on(sp.port, other, {"epoch": epoch, "offset": 3})
            try:
                assert landed == other
                assert reply["recovered"] is True, reply
                assert (reply["epoch"], reply["offset"]) == (epoch, 10)
                assert [p["offset"] for p in reply["publications"]] == list(range(4, 11))
                assert [p["data"] for p in reply["publications"]] == list(range(4, 11))
                assert (await http_publish(sp.port, "t", 11)).status == 200
                assert await pubs(back, 1) == [11]
                # An epoch from elsewhere (another supervisor's) cannot be recovered.
                await back.send_json({"op": "subscribe", "topic": "u", "id": "u",
                                      "since": {"epoch": "0" * 16, "offset": 1}})
                gap = await back.recv_json()
                assert (gap["recovered"], gap["epoch"]) == (False, epoch)
            finally:
                await back.aclose()


@attrs.define
class Seen:
    offsets: list[int] = attrs.Factory(list)
    reconnects: int = 0
    error: str | None = None
    changed: trio.Event = attrs.Factory(trio.Event)


async def follow(url: str, seen: Seen, ready: trio.Semaphore, last: list[int]) -> None:
    """A reconnecting client (trioserve.client): records every offset until *last*."""
    try:
        async with trioserve.client.connect(url, backoff_initial=0.05, backoff_max=0.5,
                                            request_timeout=30) as client:
            async with client.subscribe("t") as sub:
                ready.release()
                async for pub in sub:
                    seen.offsets.append(pub.offset)
                    seen.changed.set()
                    seen.changed = trio.Event()
                    if last and pub.offset >= last[0]:
                        break
            seen.reconnects = client.statistics().reconnects
    except Exception as exc:
        seen.error = repr(exc)


async def test_a_killed_workers_clients_reconnect_and_recover_everything() -> None:
    seen = [Seen() for _ in range(CLIENTS)]
    last: list[int] = []
    with trio.fail_after(STARTUP_TIMEOUT + 2 * LIMIT):
        async with run_workers() as sp:
            url = f"ws://127.0.0.1:{sp.port}/ws"
            async with trio.open_nursery() as nursery:
                ready = trio.Semaphore(0)
                for s in seen:
                    nursery.start_soon(follow, url, s, ready, last)
                for _ in seen:
                    await ready.acquire()
                by_worker = await connections_by_worker(sp.port)
                assert min(by_worker.values()) > 0, by_worker
                offset = 0
                for _ in range(5):
                    offset = (await http_publish(sp.port, "t", offset)).json()["offset"]
                victim = worker_pids(sp)[1]
                os.kill(victim, signal.SIGKILL)
                # Once it is reaped its listener is gone, so no publish meets a reset.
                await sp.wait_for_log(re.compile(rb"worker 1 \(pid %d\) killed by signal SIGKILL" % victim))
                # Published while worker 1 is dead and while it restarts.
                for _ in range(5):
                    offset = (await http_publish(sp.port, "t", offset)).json()["offset"]
                await sp.wait_for_log(re.compile(rb"worker 1 \(pid \d+\) ready again"))
                for _ in range(4):
                    offset = (await http_publish(sp.port, "t", offset)).json()["offset"]
                # Known before it is published, so no client can read it first and miss it.
                last.append(offset + 1)
                assert (await http_publish(sp.port, "t", offset)).json()["offset"] == last[0]
    assert [s.error for s in seen if s.error] == []
    assert all(s.offsets == list(range(1, last[0] + 1)) for s in seen), [s.offsets for s in seen][:3]
    noticed = sum(1 for s in seen if s.reconnects)
    assert noticed == by_worker["1"], (noticed, by_worker)


async def test_when_the_supervisor_is_killed_the_workers_drain_and_exit() -> None:
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers() as sp:
            clients = [await subscribed(sp.port) for _ in range(10)]
            by_worker = await connections_by_worker(sp.port)
            assert min(by_worker.values()) > 0, by_worker
            pids = worker_pids(sp)
            sp.proc.kill()
            for ws in clients:
                closed = await ws.wait_closed()
                assert closed.code == 1001
            await close_all(clients)
            # Every process holding the log pipe has exited when it reaches EOF.
            await sp.wait_for_eof()
    for w in ("1", "2"):
        assert re.search(rf" w{w} trioserve\.worker: lost the supervisor's broker".encode(), sp.log), sp.text
    for pid in pids.values():
        assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@attrs.define
class Received:
    offsets: list[int] = attrs.Factory(list)
    close_code: int | None = None
    changed: trio.Event = attrs.Factory(trio.Event)


async def _read_until_close(ws: RawWebSocket, got: Received) -> None:
    while True:
        frame = await ws.recv_frame()
        if frame.opcode == OP_TEXT:
            msg = frame.json()
            if msg.get("op") == "pub":
                got.offsets.append(msg["offset"])
                got.changed.set()
                got.changed = trio.Event()
        elif frame.opcode == OP_PING:
            await ws.send_frame(OP_PONG, frame.payload)
        elif frame.opcode == OP_CLOSE:
            got.close_code = frame.close_code
            await ws.answer_close(frame)
            return


async def _publish_until_refused(ws: RawWebSocket, accepted: list[int]) -> None:
    """Runs of 20 publishes, each run's replies awaited, until one is refused or the
    connection closes; *accepted* gets every offset the server said ok to."""
    i = 0
    try:
        while True:
            await ws.send_many({"op": "publish", "topic": "t", "data": i + k, "id": i + k}
                               for k in range(20))
            i += 20
            refused = False
            for _ in range(20):
                reply = await ws.recv_json()
                if reply.get("ok"):
                    accepted.append(reply["offset"])
                else:
                    refused = True
            if refused:
                return
    except Exception:
        return


async def test_sigterm_delivers_everything_accepted_before_the_1001_on_every_worker() -> None:
    received = [Received() for _ in range(20)]
    accepted: list[int] = []
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--client-publish", "--drain-timeout", "10") as sp:
            clients = [await subscribed(sp.port) for _ in received]
            by_worker = await connections_by_worker(sp.port)
            assert min(by_worker.values()) > 0, by_worker
            publisher = await RawWebSocket.connect(sp.port)
            async with trio.open_nursery() as nursery:
                for ws, got in zip(clients, received, strict=True):
                    nursery.start_soon(_read_until_close, ws, got)
                nursery.start_soon(_publish_until_refused, publisher, accepted)
                # Mid-stream: every subscriber has some, and more are coming.
                for got in received:
                    while len(got.offsets) < 100:
                        await got.changed.wait()
                sp.proc.send_signal(signal.SIGTERM)
                returncode = await sp.proc.wait()
            await close_all([*clients, publisher])
    assert returncode == 0, sp.text
    assert accepted == list(range(1, len(accepted) + 1))
    for got in received:
        assert got.close_code == 1001
        assert got.offsets == list(range(1, len(got.offsets) + 1))
        assert got.offsets[-1] >= accepted[-1], (got.offsets[-1], accepted[-1])
