"""Load-client worker process: holds a share of the subscriber connections.

The orchestrator (``fanout.py``) starts a few of these with ``multiprocessing``
(spawn) and drives them over a pipe with small command dicts, one reply per
command. Each worker runs one asyncio loop for its whole life, so the pipe is
watched with ``add_reader`` rather than a thread.

Commands: ``ping``, ``connect``, ``arm``, ``wait``, ``collect``, ``close``, ``exit``.
Every phase is bounded in time; nothing here waits without a deadline.
``Workers`` is the orchestrator's side of the pool.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import multiprocessing as mp
import os
import resource
import time
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.serverproc import PhaseError
from benchmarks.wsclient import Deliveries, WsClient, open_ws, subscribe


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def own_cpu() -> tuple[float, float, float]:
    """(total, user, system) CPU seconds of this process; total in ns resolution."""
    t = os.times()
    return time.process_time(), t.user, t.system


class PipeReader:
    """Turns a multiprocessing pipe into an awaitable queue on this loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            self.queue.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            self.queue.put_nowait(None)

    async def get(self) -> Any:
        return await self.queue.get()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.conn.fileno())


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "TimeoutError"
    return f"{type(exc).__name__}: {exc}"[:160]


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.deliveries = Deliveries()
        self.clients: list[WsClient] = []

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open and subscribe one connection per source IP in ``cmd['src_ips']``.

        At most ``concurrency`` connections are in flight, so the measured
        rate is at a fixed, stated concurrency.
        """
        sem = asyncio.Semaphore(cmd["concurrency"])
        errors: collections.Counter[str] = collections.Counter()
        finished: list[float] = []

        async def one(src_ip: str) -> None:
            async with sem:
                try:
                    client = await open_ws(cmd["host"], cmd["port"], src_ip, self.deliveries,
                                           cmd["timeout"])
                except Exception as exc:
                    errors[describe(exc)] += 1
                    return
                try:
                    await subscribe(client, cmd["topic"], cmd["timeout"])
                except Exception as exc:
                    errors[describe(exc)] += 1
                    client.close()
                    return
                self.clients.append(client)
                finished.append(time.monotonic())

        start = time.monotonic()
        tasks = [asyncio.create_task(one(ip)) for ip in cmd["src_ips"]]
        _, pending = await asyncio.wait(tasks, timeout=cmd["phase_timeout"])
        for task in pending:
            task.cancel()
        if pending:
            errors["phase timeout"] += len(pending)
            await asyncio.wait(pending, timeout=5)
        # The connections live until the end: move them out of the cyclic GC's
        # reach so the full collections that a burst's allocations trigger
        # don't walk thousands of protocol objects each time.
        gc.collect()
        gc.freeze()
        return {
            "ok": len(self.clients),
            "failed": sum(errors.values()),
            "errors": dict(errors.most_common(5)),
            "start": start,
            "end": max(finished) if finished else start,
        }

    def open_clients(self) -> list[WsClient]:
        return [c for c in self.clients if not c.closed.done()]

    def arm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        clients = self.open_clients()
        for client in clients:
            client.burst_count = 0
        self.deliveries.arm(cmd["publications"], len(clients))
        return {"armed": len(clients), "cpu": own_cpu()}

    async def wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait until every open subscriber got the burst, or give up.

        Gives up after ``timeout`` overall, or after ``stall`` seconds without
        a single delivery, so a server that silently drops messages costs
        seconds rather than the whole phase timeout.
        """
        d = self.deliveries
        start = time.monotonic()
        status = "ok"
        while not d.done.is_set():
            try:
                await asyncio.wait_for(d.done.wait(), 0.25)
            except TimeoutError:
                now = time.monotonic()
                if now - start > cmd["timeout"]:
                    status = "timeout"
                elif now - max(start, d.last_recv) > cmd["stall"]:
                    status = "stalled"
                else:
                    continue
                break
        d.armed = False
        if status == "ok" and d.received < d.expected:
            status = "conns closed"  # done only because closed subscribers were written off
        return {"status": status, "received": d.received, "last_recv": d.last_recv,
                "remaining": max(d.remaining, 0), "cpu": own_cpu()}

    def collect(self) -> dict[str, Any]:
        """Per-burst detail, sent after the timing-critical ``wait`` reply."""
        clients = self.clients
        per = self.deliveries.per_conn
        open_clients = self.open_clients()
        offsets = [c.last_offset for c in open_clients] or [0]
        reasons = collections.Counter(c.close_reason for c in clients if c.closed.done())
        return {
            "latencies": self.deliveries.lat.tobytes(),
            "short_conns": sum(1 for c in open_clients if c.burst_count < per),
            "gaps": sum(c.gaps for c in clients),
            "dups": sum(c.dups for c in clients),
            "unexpected": sum(c.unexpected for c in clients),
            "closed": len(clients) - len(open_clients),
            "close_reasons": dict(reasons.most_common(3)),
            "last_offset_min": min(offsets),
            "last_offset_max": max(offsets),
        }

    async def close(self) -> dict[str, Any]:
        for client in self.clients:
            client.close()
        closed = [c.closed for c in self.clients]
        if closed:
            await asyncio.wait(closed, timeout=10)
        count = len(self.clients)
        self.clients = []
        gc.unfreeze()
        return {"closed": count}


async def serve_commands(conn: Connection, index: int) -> None:
    reader = PipeReader(conn)
    worker = Worker(index)
    try:
        while True:
            cmd = await reader.get()
            if cmd is None or cmd["op"] == "exit":
                break
            op = cmd["op"]
            reply: dict[str, Any]
            if op == "ping":
                reply = {"pong": worker.index}
            elif op == "connect":
                reply = await worker.connect(cmd)
            elif op == "arm":
                reply = worker.arm(cmd)
            elif op == "wait":
                reply = await worker.wait(cmd)
            elif op == "collect":
                reply = worker.collect()
            elif op == "close":
                reply = await worker.close()
            else:
                reply = {"error": f"unknown op {op!r}"}
            conn.send(reply)
    finally:
        reader.close()
        await worker.close()


def worker_main(conn: Connection, index: int) -> None:
    """Entry point of a load-client process (multiprocessing target)."""
    raise_fd_limit()
    try:
        asyncio.run(serve_commands(conn, index))
    except KeyboardInterrupt:
        pass


class Workers:
    """The orchestrator's handle on the load-client processes.

    Protocol: one command per process, one reply per command, in order.
    """

    def __init__(self, count: int) -> None:
        ctx = mp.get_context("spawn")  # fresh interpreters: nothing inherited from the caller's loop
        self.procs = []
        self.conns = []
        for index in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, index), daemon=True,
                               name=f"fanout-client-{index}")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self.readers = [PipeReader(c) for c in self.conns]

    def __len__(self) -> int:
        return len(self.procs)

    def send(self, cmds: list[dict[str, Any]]) -> None:
        for conn, cmd in zip(self.conns, cmds, strict=True):
            conn.send(cmd)

    async def replies(self, timeout: float) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(timeout):
                out = await asyncio.gather(*(r.get() for r in self.readers))
        except TimeoutError:
            raise PhaseError(f"load client did not answer within {timeout:.0f}s") from None
        if any(r is None for r in out):
            raise PhaseError("a load-client process died")
        return list(out)

    async def ask(self, cmds: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        self.send(cmds)
        return await self.replies(timeout)

    async def stop(self) -> None:
        for reader in self.readers:
            reader.close()
        for conn in self.conns:
            try:
                conn.send({"op": "exit"})
            except OSError:
                pass
        deadline = time.monotonic() + 15
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            proc.close()
        for conn in self.conns:
            conn.close()
