"""The sequencer's sockets: one Unix socket per worker, in the supervisor's runtime dir.

For each worker, ``serve`` listens on its path and takes one connection at a
time (a restarted worker's new connection replaces the old). Per connection,
a reader hands every frame of a chunk to :class:`.Sequencer` with no
checkpoint in between, and a writer sends each outbox whole: a relay carries
everything that waited while the last one was written.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Mapping
from pathlib import Path

import trio

from .sequencer import Sequencer
from .wire import FrameError, FrameReader

__all__ = ["RelayServer"]

log = logging.getLogger("trioserve.sequencer")

#: Bytes read from a worker's socket at a time.
CHUNK = 256 * 1024


class RelayServer:
    """``await nursery.start(RelayServer(sequencer, paths).serve)``; cancel to stop."""

    def __init__(self, sequencer: Sequencer, paths: Mapping[int, str | Path]):
        self.sequencer = sequencer
        self.paths = {worker: str(path) for worker, path in paths.items()}
        self._wakes: dict[int, trio.lowlevel.ParkingLot] = {}
        self._scopes: dict[int, trio.CancelScope] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners: dict[int, trio.socket.SocketType] = {}
        try:
            for worker, path in self.paths.items():
                listeners[worker] = await _listen(path)
            async with trio.open_nursery() as nursery:
                for worker, sock in listeners.items():
                    nursery.start_soon(self._accept_loop, worker, sock)
                task_status.started()
        finally:
            for sock in listeners.values():
                sock.close()

    async def _accept_loop(self, worker: int, sock: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                old = self._scopes.pop(worker, None)
                if old is not None:
                    old.cancel()
                scope = trio.CancelScope()
                self._scopes[worker] = scope
                nursery.start_soon(self._serve_worker, worker, trio.SocketStream(conn), scope)

    async def _serve_worker(self, worker: int, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        seq = self.sequencer
        seq.connect(worker)  # drops a replaced connection's members: leave events to wake for
        wake = self._wakes[worker] = trio.lowlevel.ParkingLot()
        self._wake_ready()
        log.debug("worker %d connected", worker)
        try:
            with scope:
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, worker, stream, wake, scope)
                    await self._read(worker, stream)
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            log.debug("worker %d: %s", worker, group.exceptions[0])
        except* FrameError as group:
            log.error("worker %d sent a bad frame (%s); closing its connection", worker,
                      group.exceptions[0])
        finally:
            if self._scopes.get(worker) is scope:
                del self._scopes[worker]
                seq.disconnect(worker)
                self._wakes.pop(worker, None)
                self._wake_ready()  # its members' leave events, for the others
            log.debug("worker %d disconnected", worker)

    async def _read(self, worker: int, stream: trio.SocketStream) -> None:
        seq = self.sequencer
        reader = FrameReader()
        while data := await stream.receive_some(CHUNK):
            for header, payload in reader.feed(data):
                seq.handle(worker, header, payload)
            self._wake_ready()

    def _wake_ready(self) -> None:
        for w in self.sequencer.ready:
            wake = self._wakes.get(w)
            if wake:
                wake.unpark_all()

    async def _write(self, worker: int, stream: trio.SocketStream, wake: trio.lowlevel.ParkingLot,
                     scope: trio.CancelScope) -> None:
        seq = self.sequencer
        # Once replaced by a newer connection, never take what is the new one's.
        while not scope.cancel_called:
            if worker not in seq.ready:
                await wake.park()
                continue
            data = seq.take(worker)
            if data:
                await stream.send_all(data)


async def _listen(path: str) -> trio.socket.SocketType:
    # A supervisor that died leaves its socket file behind.
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock
