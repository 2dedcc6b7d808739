"""``trioserve serve --workers N``: a supervisor process and N workers on the same ports.

Each process has its own file-descriptor limit, so N workers hold N times the
connections one process can. The supervisor:

1. **Reserves the ports.** It binds a SO_REUSEPORT socket on each address and
   never listens on it. That keeps the port (a resolved port 0 too) for as long
   as the supervisor runs, and a socket that does not listen takes no
   connections. Each worker binds and listens on the port itself with
   SO_REUSEPORT, and the kernel spreads new connections across the workers'
   listeners by a hash of the client's address and port.
2. **Hands over the config.** The effective config (file < environment < flags,
   merged once, here) goes to ``config.json`` in a private runtime directory
   (mode 700), with the reserved ports; each worker loads it back through
   ``load_config``. Secrets never appear in a worker's argv or environment.
3. **Starts the workers** as ``python -m trioserve _worker`` in their own
   process group, so a terminal's Ctrl-C reaches only the supervisor, which then
   drains them once rather than twice. See :mod:`trioserve.ops.worker`.
4. **Restarts a worker that dies**, after a backoff that doubles from 0.5 s to
   30 s and starts over once a worker has run for 30 s, and logs how it died.
   A worker that fails before the first start-up is complete stops everything:
   that is a configuration or environment problem, not a crash to retry.
5. **Is the embedded broker** when there is no ``--broker``: it runs the
   sequencer (:mod:`trioserve.push.brokers.sequencer`), which assigns every
   topic's offsets, keeps history and relays publications to the workers that
   joined a topic, over one Unix socket per worker in the runtime directory.
   Only starting and stopping it is this module's business.
6. **Drains on SIGTERM or SIGINT**: first closes the sequencer to new
   publications (so everything accepted reaches every worker before its
   1001), then forwards SIGTERM, so every worker drains
   (1001 to its clients, "drained N, forced M"), waits for them and exits 0.
   A second signal kills the workers and exits with 128 + the signal.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import orjson
import trio

from ..config import Config, redact_url
from ..net import listeners
from ..push.brokers.relay import RelayServer
from ..push.brokers.sequencer import Sequencer
from .worker import broker_path, write_worker_config

__all__ = ["Supervisor", "describe_exit"]

log = logging.getLogger("trioserve.workers")

#: First wait before restarting a dead worker; it doubles on each quick death.
RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
#: A worker that ran this long before dying is restarted after the shortest wait again.
STABLE_AFTER = 30.0
#: Seconds a worker has to bind its ports and report ready before it is killed.
START_TIMEOUT = 60.0
#: On top of drain_timeout + close_timeout, before workers that still run are killed.
STOP_GRACE = 5.0
# sockaddr_un.sun_path holds 108 bytes with the terminating NUL.
_UNIX_PATH_MAX = 107


def describe_exit(returncode: int) -> str:
    """``exited with status 3`` or ``killed by signal SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exited with status {returncode}"


@attrs.define(eq=False)
class _Worker:
    id: int
    process: trio.Process | None = None
    #: Reported ready at least once, in any of its runs.
    started: trio.Event = attrs.Factory(trio.Event)
    max_connections: int = 0


class Supervisor:
    """Runs ``config.workers`` worker processes until a signal drains them.

    ``trio.run(Supervisor(config).run)`` returns the exit status.
    """

    def __init__(self, config: Config, python: str = sys.executable):
        self.config = config
        self.python = python
        self.exit_code = 0
        self._workers = [_Worker(i) for i in range(1, config.workers + 1)]
        self._stopping = False
        self._started = False
        self._scopes: set[trio.CancelScope] = set()
        self._runtime_dir = ""
        self._nursery: trio.Nursery | None = None
        #: The embedded broker's sequencer; None with --broker redis://.
        self.sequencer: Sequencer | None = (
            Sequencer(config.history_for, clock=trio.current_time) if config.embedded_broker else None)

    async def run(self) -> int:
        if not sys.platform.startswith("linux"):
            # Elsewhere SO_REUSEPORT may hand every connection to one listener.
            log.warning("--workers relies on Linux's SO_REUSEPORT to spread connections; on %s "
                        "they may all go to one worker", sys.platform)
        config, reserved = self._reserve_ports()
        try:
            self._runtime_dir = tempfile.mkdtemp(prefix="trioserve-", dir=self._runtime_base())
            write_worker_config(self._runtime_dir, config)
            tcp = f", tcp port {config.tcp_port}" if config.tcp_port is not None else ""
            broker = ("embedded (this supervisor is the sequencer)" if self.sequencer is not None
                      else redact_url(config.broker))
            log.info("supervisor (pid %d): starting %d workers on %s port %d%s, broker %s",
                     os.getpid(), config.workers, config.host, config.port, tcp, broker)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._watch_signals)
                if self.sequencer is not None:
                    paths = {w.id: broker_path(self._runtime_dir, w.id) for w in self._workers}
                    await nursery.start(RelayServer(self.sequencer, paths).serve)
                async with trio.open_nursery() as workers:
                    for worker in self._workers:
                        workers.start_soon(self._keep_running, worker)
                    workers.start_soon(self._announce, config)
                nursery.cancel_scope.cancel()
        finally:
            for sock in reserved:
                sock.close()
            if self._runtime_dir:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)
        if self.exit_code == 0:
            log.info("all workers stopped")
        return self.exit_code

    def _runtime_base(self) -> str:
        """$XDG_RUNTIME_DIR when there is one (tmpfs, private), else the temp directory;
        one whose control socket paths fit the 107 bytes a unix socket path may have."""
        longest = len(f"/trioserve-xxxxxxxx/w{self.config.workers}.sock")
        for base in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir()):
            if base and len(base.encode()) + longest <= _UNIX_PATH_MAX:
                return base
        return "/tmp"

    def _reserve_ports(self) -> tuple[Config, list[socket.socket]]:
        cfg = self.config
        reserved: list[socket.socket] = []
        try:
            ports = {}
            for name in ("port", "tcp_port"):
                port = getattr(cfg, name)
                if port is None:
                    continue
                # A plain bind first: it fails if anything else holds the port,
                # even another process's SO_REUSEPORT socket, which a SO_REUSEPORT
                # bind would quietly share the connections with.
                probe = listeners.bind_listeners(cfg.host, port, cfg.backlog, listen=False)
                port = probe[0].getsockname()[1]
                for sock in probe:
                    sock.close()
                reserved += listeners.bind_listeners(cfg.host, port, cfg.backlog, reuse_port=True,
                                                     listen=False)
                ports[name] = port
        except BaseException:
            for sock in reserved:
                sock.close()
            raise
        return attrs.evolve(cfg, reuse_port=True, **ports), reserved

    @contextmanager
    def _until_stopping(self) -> Iterator[trio.CancelScope]:
        """A scope that :meth:`_stop` cancels (waits that a drain makes pointless)."""
        scope = trio.CancelScope()
        if self._stopping:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def _stop(self) -> None:
        """Drain every worker: SIGTERM now, SIGKILL if they outlast the drain."""
        if self._stopping:
            return
        self._stopping = True
        if self.sequencer is not None:
            # Before any worker drains: a publication accepted from now on could
            # reach a worker after it sent its 1001.
            self.sequencer.close()
        for scope in self._scopes:
            scope.cancel()
        for worker in self._workers:
            if worker.process is not None:
                worker.process.send_signal(signal.SIGTERM)
        assert self._nursery is not None
        self._nursery.start_soon(self._kill_after_drain)

    async def _kill_after_drain(self) -> None:
        budget = self.config.drain_timeout + self.config.close_timeout + STOP_GRACE
        await trio.sleep(budget)
        alive = [w for w in self._workers if w.process is not None]
        if alive:
            log.error("workers %s still running %.0fs after SIGTERM; killing them",
                      ", ".join(str(w.id) for w in alive), budget)
            self.exit_code = self.exit_code or 1
            self._kill_all()

    def _kill_all(self) -> None:
        for worker in self._workers:
            if worker.process is not None:
                worker.process.kill()

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stopping:
                    log.info("%s: draining %d workers (send it again to exit at once)",
                             name, len(self._workers))
                    self._stop()
                else:
                    log.warning("%s again: killing the workers without waiting for the drain", name)
                    self.exit_code = 128 + signum
                    self._kill_all()
                    return

    async def _announce(self, config: Config) -> None:
        with self._until_stopping():
            for worker in self._workers:
                await worker.started.wait()
            self._started = True
            total = sum(w.max_connections for w in self._workers)
            each = ", ".join(f"w{w.id} {w.max_connections}" for w in self._workers)
            shown = f"[{config.host}]" if ":" in config.host else config.host
            log.info("%d workers serving %s://%s:%d: max_connections %d in total (%s)",
                     len(self._workers), "https" if config.tls_enabled else "http", shown,
                     config.port, total, each)

    async def _keep_running(self, worker: _Worker) -> None:
        backoff = RESTART_BACKOFF_MIN
        while not self._stopping:
            began = trio.current_time()
            pid, returncode = await self._run_once(worker)
            ran = trio.current_time() - began
            how = describe_exit(returncode)
            if self._stopping:
                log.info("worker %d (pid %d) %s", worker.id, pid, how)
                return
            if not self._started:
                log.error("worker %d (pid %d) %s during start-up; stopping (its log above "
                          "says why)", worker.id, pid, how)
                self.exit_code = 1
                self._stop()
                return
            if ran >= STABLE_AFTER:
                backoff = RESTART_BACKOFF_MIN
            log.warning("worker %d (pid %d) %s after %.1fs; restarting it in %.1fs",
                        worker.id, pid, how, ran, backoff)
            with self._until_stopping():
                await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    async def _run_once(self, worker: _Worker) -> tuple[int, int]:
        """Start *worker* and wait for it to exit; returns (pid, returncode)."""
        read_fd, write_fd = os.pipe()
        try:
            cmd = [self.python, "-m", "trioserve", "_worker", "--runtime-dir", self._runtime_dir,
                   "--worker-id", str(worker.id), "--ready-fd", str(write_fd)]
            process = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.DEVNULL, pass_fds=(write_fd,), process_group=0)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker.process = process
        log.info("worker %d started (pid %d)", worker.id, process.pid)
        if self._stopping:
            process.send_signal(signal.SIGTERM)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wait_ready, worker, process, read_fd)
                returncode = await process.wait()
        finally:
            worker.process = None
        return process.pid, returncode

    async def _wait_ready(self, worker: _Worker, process: trio.Process, read_fd: int) -> None:
        """Read the worker's ready line; the pipe closes without one if it dies first."""
        async with trio.lowlevel.FdStream(read_fd) as pipe:
            data = b""
            with trio.move_on_after(START_TIMEOUT) as timeout:
                while chunk := await pipe.receive_some(4096):
                    data += chunk
        if timeout.cancelled_caught:
            log.error("worker %d (pid %d) not ready after %.0fs; killing it",
                      worker.id, process.pid, START_TIMEOUT)
            process.kill()
            return
        if not data:
            return
        ready = orjson.loads(data)
        worker.max_connections = int(ready["max_connections"])
        log.info("worker %d (pid %d) ready%s: max_connections %d", worker.id, process.pid,
                 " again" if worker.started.is_set() else "", worker.max_connections)
        worker.started.set()
