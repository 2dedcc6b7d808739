"""Load-client worker processes and the orchestrator's handle on them.

The orchestrator starts a few workers with ``multiprocessing`` (spawn) and
drives them over a pipe with small command dicts. Each worker runs one
asyncio loop for its whole life, so the pipe is watched with ``add_reader``
rather than a thread. Every command carries an ``rid`` and runs as a task of
its own, so a long one (``connect``) does not stop the worker from answering
a ``stats`` poll; its reply carries the same ``rid``.

A worker's behaviour is a *handler* object, made in the child from a
picklable factory (a module-level class): command ``{"op": "x", ...}`` calls
``handler.op_x(cmd)`` (sync or async), whose dict is the reply. ``close()``
runs when the worker exits.

``benchmarks/fanout.py``, ``trioserve bench`` and the fault tests all use
it. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import itertools
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

from ..net.listeners import raise_fd_limit


class PhaseError(Exception):
    """A phase could not complete; the run reports it instead of crashing."""


class Handler(Protocol):
    async def close(self) -> Any: ...


HandlerFactory = Callable[[int], Handler]


def own_cpu() -> tuple[float, float, float]:
    """(total, user, system) CPU seconds of this process; total in ns resolution."""
    t = os.times()
    return time.process_time(), t.user, t.system


def describe(exc: BaseException) -> str:
    """A short, stable name for an error, so that equal failures count together."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
        return f"{type(exc).__name__} {errno.errorcode[exc.errno]}"
    return f"{type(exc).__name__}: {exc}"[:160]


def connect_totals(replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The load-client processes' ``connect`` replies added up: ok, failed,
    errors by kind, and the rate over the span from first start to last end."""
    ok = sum(r["ok"] for r in replies)
    start = min(r["start"] for r in replies)
    end = max(r["end"] for r in replies)
    errors: dict[str, int] = {}
    for r in replies:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {"ok": ok, "failed": sum(r["failed"] for r in replies), "errors": errors,
            "seconds": end - start, "rate": ok / (end - start) if ok and end > start else None}


class PipeReader:
    """Turns a multiprocessing pipe into an awaitable queue on this loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._open = True
        asyncio.get_running_loop().add_reader(conn.fileno(), self._readable)
        # uvloop's add_reader makes the fd non-blocking, and Connection.recv()
        # and send() then fail mid-message with EAGAIN. Readiness still comes
        # from the loop; a message, once started, is read or written whole.
        os.set_blocking(conn.fileno(), True)

    def _readable(self) -> None:
        try:
            self.queue.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self.close()
            self.queue.put_nowait(None)

    async def get(self) -> Any:
        return await self.queue.get()

    def close(self) -> None:
        if self._open:
            self._open = False
            asyncio.get_running_loop().remove_reader(self.conn.fileno())


async def _run_command(conn: Connection, handler: Handler, cmd: dict[str, Any]) -> None:
    op = cmd["op"]
    method = getattr(handler, f"op_{op}", None)
    reply: dict[str, Any]
    try:
        if method is None:
            reply = {"error": f"unknown op {op!r}"}
        else:
            result = method(cmd)
            reply = await result if inspect.isawaitable(result) else result
    except Exception as exc:  # the orchestrator must hear about it, not wait forever
        reply = {"error": f"{op}: {describe(exc)}"}
    try:
        conn.send({**reply, "rid": cmd.get("rid")})
    except OSError:
        pass


async def serve_commands(conn: Connection, handler: Handler) -> None:
    reader = PipeReader(conn)
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            cmd = await reader.get()
            if cmd is None or cmd["op"] == "exit":
                break
            task = asyncio.create_task(_run_command(conn, handler, cmd))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        reader.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await handler.close()


LOOPS = ("auto", "uvloop", "asyncio")


def resolve_loop(loop: str) -> str:
    """``auto`` → ``uvloop`` when it is installed, else ``asyncio``.

    A broadcast costs the load client one read per subscriber. uvloop's C
    event loop takes about a fifth off the client's CPU per delivery, and
    the client shares the cores with the server it measures.
    """
    if loop not in LOOPS:
        raise ValueError(f"unknown event loop {loop!r}: choose one of {', '.join(LOOPS)}")
    if loop != "auto":
        return loop
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_loop(main: Callable[[], Coroutine[Any, Any, None]], loop: str) -> None:
    if resolve_loop(loop) == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def worker_main(conn: Connection, index: int, factory: HandlerFactory, loop: str = "auto") -> None:
    """Entry point of a load-client process (multiprocessing target)."""
    raise_fd_limit()

    async def main() -> None:
        await serve_commands(conn, factory(index))

    try:
        run_loop(main, loop)
    except KeyboardInterrupt:
        pass


class Workers:
    """The orchestrator's handle on the load-client processes.

    ``send`` writes one command to each process; ``replies`` waits for the
    replies to the last ``send``, in process order; ``ask`` does both.
    """

    def __init__(self, count: int, factory: HandlerFactory, name: str = "load-client",
                 loop: str = "auto") -> None:
        self.loop = resolve_loop(loop)
        ctx = mp.get_context("spawn")  # fresh interpreters: nothing inherited from the caller's loop
        self.procs = []
        self.conns = []
        for index in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, index, factory, self.loop), daemon=True,
                               name=f"{name}-{index}")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self.readers = [PipeReader(c) for c in self.conns]
        self._rids = itertools.count(1)
        self._waiting: list[dict[int, asyncio.Future[dict[str, Any]]]] = [{} for _ in self.procs]
        self._dead = [False] * count
        self._pumps = [asyncio.create_task(self._pump(i)) for i in range(count)]
        self._last: list[asyncio.Future[dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self.procs)

    async def _pump(self, index: int) -> None:
        reader, waiting = self.readers[index], self._waiting[index]
        while True:
            reply = await reader.get()
            if reply is None:
                self._dead[index] = True
                for fut in waiting.values():
                    if not fut.done():
                        fut.set_exception(PhaseError("a load-client process died"))
                waiting.clear()
                return
            waiter = waiting.pop(reply.pop("rid", -1), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)

    def send(self, cmds: Sequence[dict[str, Any]]) -> list[asyncio.Future[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        futures = []
        for index, (conn, cmd) in enumerate(zip(self.conns, cmds, strict=True)):
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            if self._dead[index]:
                fut.set_exception(PhaseError("a load-client process died"))
            else:
                rid = next(self._rids)
                self._waiting[index][rid] = fut
                try:
                    conn.send({**cmd, "rid": rid})
                except OSError:
                    self._waiting[index].pop(rid, None)
                    fut.set_exception(PhaseError("a load-client process died"))
            futures.append(fut)
        self._last = futures
        return futures

    async def gather(self, futures: list[asyncio.Future[dict[str, Any]]],
                     timeout: float) -> list[dict[str, Any]]:
        _, pending = await asyncio.wait(futures, timeout=timeout)
        for fut in pending:
            fut.cancel()
        if pending:
            raise PhaseError(f"load client did not answer within {timeout:.0f}s")
        out = [fut.result() for fut in futures]
        errors = [r["error"] for r in out if "error" in r]
        if errors:
            raise PhaseError(f"load client: {errors[0]}")
        return out

    async def replies(self, timeout: float) -> list[dict[str, Any]]:
        return await self.gather(self._last, timeout)

    async def ask(self, cmds: Sequence[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        return await self.gather(self.send(cmds), timeout)

    async def ask_all(self, cmd: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        return await self.ask([cmd] * len(self), timeout)

    async def stop(self) -> None:
        for pump in self._pumps:
            pump.cancel()
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
