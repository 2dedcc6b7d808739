"""One worker process of ``trioserve serve --workers N``.

The supervisor (:mod:`trioserve.ops.supervisor`) starts each worker as
``python -m trioserve _worker --runtime-dir DIR --worker-id I --ready-fd FD``:

- **Config**: ``DIR/config.json`` holds the supervisor's effective config (file,
  environment and flags already merged), with the ports it reserved and
  ``reuse_port = true``. It is read back through :func:`load_config`, so a
  worker's config is validated exactly like the supervisor's. Secrets stay
  out of argv and the environment; the directory is the supervisor's, mode 700.
- **Ports**: the worker binds and listens on those ports itself with
  SO_REUSEPORT, so the kernel spreads new connections across the workers.
- **Control socket** ``DIR/wI.sock``: answers one request line, ``status`` or
  ``metrics``, with JSON. A worker asks its siblings when it answers
  ``/metrics``, ``/readyz`` or ``/healthz``, so those describe the whole server
  and not whichever worker the kernel picked for the request.
- **Broker socket** ``DIR/bI.sock`` (without ``--broker``): the supervisor is the
  embedded broker's sequencer, and this worker's hub reaches it through an
  :class:`~trioserve.push.brokers.inhost.InHostBroker` connected there. If that
  connection closes, the supervisor is gone: the worker drains and exits
  rather than serve topics no other worker shares.
- **Ready**: once the ports are bound and the control socket listens, the worker
  writes one JSON line to ``FD`` (its pid and max_connections) and closes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from ..config import Config, load_config
from ..config.sources import OPTIONS
from ..net.httpd import Request, Response, RouteHandler, json_response
from ..push.brokers.inhost import InHostBroker
from ..push.history import History
from ..push.hub import Hub
from ..server import metrics
from ..server.routes import server_routes
from ..server.server import Server

__all__ = ["CONFIG_FILE", "Worker", "broker_path", "control_path", "read_worker_config",
           "write_worker_config"]

log = logging.getLogger("trioserve.worker")

#: The effective config, in the runtime directory.
CONFIG_FILE = "config.json"
#: A sibling that has not answered within this many seconds is reported missing.
CONTROL_TIMEOUT = 1.0
#: How often a worker checks that its supervisor is still there.
PARENT_CHECK_INTERVAL = 1.0
# A request line is one short word; a metrics reply is a few hundred KB at most.
_MAX_REQUEST = 64
_MAX_REPLY = 64 * 1024 * 1024


def control_path(runtime_dir: str | Path, worker_id: int) -> Path:
    return Path(runtime_dir) / f"w{worker_id}.sock"


def broker_path(runtime_dir: str | Path, worker_id: int) -> Path:
    """Where the supervisor's embedded broker listens for worker *worker_id*."""
    return Path(runtime_dir) / f"b{worker_id}.sock"


def write_worker_config(runtime_dir: str | Path, config: Config) -> None:
    """Write *config* where :func:`read_worker_config` finds it, readable by its owner only."""
    # Every option a config file could set (so not worker_id), by its loader's name.
    data = {name: getattr(config, name) for name in OPTIONS if hasattr(config, name)}
    data["history_rules"] = [attrs.asdict(rule) for rule in config.history_rules]
    path = Path(runtime_dir) / CONFIG_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(data))


def read_worker_config(runtime_dir: str | Path, worker_id: int) -> Config:
    """Worker *worker_id*'s config: the supervisor's, with ``worker_id`` set."""
    data = orjson.loads((Path(runtime_dir) / CONFIG_FILE).read_bytes())
    # No file and no environment: the supervisor has already applied them.
    config = load_config(None, {}, data)
    return attrs.evolve(config, worker_id=worker_id)


class Worker:
    """A :class:`Server` that answers ``/metrics``, ``/readyz`` and ``/healthz`` for
    every worker, and a control socket that answers its siblings."""

    def __init__(self, config: Config, runtime_dir: str | Path):
        if config.worker_id is None:
            raise ValueError("a worker's config needs a worker_id")
        self.config = config
        self.id = config.worker_id
        self.label = str(config.worker_id)
        self.runtime_dir = Path(runtime_dir)
        #: 1 once the worker stopped because its supervisor's broker went away.
        self.exit_code = 0
        #: The embedded broker's connection to the supervisor (None with --broker redis://).
        self.broker: InHostBroker | None = None
        hub = None
        if config.embedded_broker:
            self.broker = InHostBroker(broker_path(runtime_dir, self.id))
            hub = Hub(config.hub_max_pending, History(config.history_for), self.broker)
        # Signals are this class's: see _watch_signals.
        self.server = Server(config, hub=hub)
        # This worker's own answers, whatever the single-process server bases them on;
        # the routes below add the other workers' to them.
        defaults = server_routes(self.server)
        self._local_readyz = defaults[("GET", "/readyz")]
        self._local_healthz = defaults[("GET", "/healthz")]
        routes: dict[str, RouteHandler] = {
            "/metrics": self._metrics, "/readyz": self._readyz, "/healthz": self._healthz,
        }
        for path, handler in routes.items():
            self.server.add_route("GET", path, handler)

    async def run(self, ready_fd: int | None = None) -> None:
        """Serve until drained."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._serve, nursery)
            nursery.start_soon(self._watch_signals, nursery)
            listener = await self._listen_control()
            nursery.start_soon(trio.serve_listeners, self._answer, [listener])
            nursery.start_soon(self._watch_supervisor, os.getppid())
            if self.broker is not None:
                nursery.start_soon(self._watch_broker, self.broker)
            if ready_fd is not None:
                self._report_ready(ready_fd)

    async def _serve(self, nursery: trio.Nursery, *, task_status: trio.TaskStatus[Server]) -> None:
        await self.server.serve(task_status=task_status)
        nursery.cancel_scope.cancel()

    async def _watch_signals(self, nursery: trio.Nursery) -> None:
        # Every SIGTERM or SIGINT means "drain", however many come: under systemd's
        # default KillMode=control-group a worker gets one from systemd and one
        # forwarded by the supervisor. Cutting a drain short is the supervisor's
        # job (SIGKILL, on a second signal to it).
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.server.draining:
                    log.info("%s: already draining", name)
                else:
                    log.info("%s: draining", name)
                    nursery.start_soon(self.server.drain)

    def _report_ready(self, fd: int) -> None:
        ready = {"pid": os.getpid(), "max_connections": self.server.max_connections}
        try:
            os.write(fd, orjson.dumps(ready) + b"\n")
        finally:
            os.close(fd)

    async def _watch_supervisor(self, parent: int) -> None:
        # The workers run in their own process group, so a terminal's Ctrl-C
        # reaches only the supervisor. If the supervisor dies without stopping
        # them (SIGKILL, a crash), the kernel re-parents them; drain then.
        while os.getppid() == parent:
            await trio.sleep(PARENT_CHECK_INTERVAL)
        log.warning("the supervisor (pid %d) is gone; draining", parent)
        await self.server.drain()

    async def _watch_broker(self, broker: InHostBroker) -> None:
        # The supervisor is the sequencer: without it, this worker's topics would
        # drift apart from the others' (a split brain). Stop instead.
        await broker.lost.wait()
        self.exit_code = 1
        log.error("lost the supervisor's broker (%s); draining and exiting", broker.lost_reason)
        await self.server.drain()

    # --- the control socket ---------------------------------------------------------------

    async def _listen_control(self) -> trio.SocketListener:
        path = control_path(self.runtime_dir, self.id)
        # A worker that died leaves its socket file behind.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(path))
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        return trio.SocketListener(sock)

    async def _answer(self, stream: trio.SocketStream) -> None:
        # An exception here would end serve_listeners and with it the worker.
        try:
            async with stream:
                with trio.move_on_after(CONTROL_TIMEOUT):
                    await self._answer_one(stream)
        except (trio.BrokenResourceError, OSError):
            pass
        except Exception:
            log.exception("control request failed")

    async def _answer_one(self, stream: trio.SocketStream) -> None:
        request = bytearray()
        while b"\n" not in request and len(request) < _MAX_REQUEST:
            data = await stream.receive_some(_MAX_REQUEST)
            if not data:
                return
            request += data
        word = bytes(request).partition(b"\n")[0]
        if word == b"status":
            reply = await self._status()
        elif word == b"metrics":
            reply = {"worker": self.id, "families": metrics.families_to_json(
                metrics.worker_families(self.server, self.label))}
        else:
            return
        await stream.send_all(orjson.dumps(reply))

    async def _status(self) -> dict[str, Any]:
        """This worker's state: ``ready``, ``draining``, or ``not ready`` (its own /readyz
        fails for another reason)."""
        if self.server.draining:
            state = "draining"
        else:
            ready = await self._local_readyz(_probe("/readyz"))
            state = "ready" if ready.status == 200 else "not ready"
        return {"worker": self.id, "pid": os.getpid(), "state": state}

    async def _ask(self, worker_id: int, request: bytes) -> dict[str, Any] | None:
        """Sibling *worker_id*'s reply to *request*, or None if it does not answer in time."""
        with trio.move_on_after(CONTROL_TIMEOUT):
            try:
                stream = await trio.open_unix_socket(str(control_path(self.runtime_dir, worker_id)))
            except OSError:
                return None  # not running, or restarting
            async with stream:
                try:
                    await stream.send_all(request + b"\n")
                    chunks = []
                    size = 0
                    while data := await stream.receive_some(65536):
                        chunks.append(data)
                        size += len(data)
                        if size > _MAX_REPLY:
                            return None
                except trio.BrokenResourceError:
                    return None
            try:
                reply = orjson.loads(b"".join(chunks))
            except orjson.JSONDecodeError:
                return None
            return reply if isinstance(reply, dict) else None
        return None

    async def _ask_siblings(self, request: bytes) -> dict[int, dict[str, Any] | None]:
        replies: dict[int, dict[str, Any] | None] = {}

        async def ask(worker_id: int) -> None:
            replies[worker_id] = await self._ask(worker_id, request)

        async with trio.open_nursery() as nursery:
            for worker_id in range(1, self.config.workers + 1):
                if worker_id != self.id:
                    nursery.start_soon(ask, worker_id)
        return replies

    async def _states(self) -> dict[str, str]:
        """Each worker's state by id, this one included: ready, draining, not ready or missing."""
        replies = await self._ask_siblings(b"status")
        replies[self.id] = await self._status()
        return {str(worker_id): str(reply.get("state", "missing")) if reply else "missing"
                for worker_id, reply in sorted(replies.items())}

    # --- routes for the whole server ------------------------------------------------------

    async def _metrics(self, req: Request) -> Response:
        replies = await self._ask_siblings(b"metrics")
        groups = [metrics.worker_families(self.server, self.label)]
        up = {self.id: True}
        for worker_id, reply in replies.items():
            try:
                groups.append(metrics.families_from_json(reply["families"]) if reply else [])
                up[worker_id] = reply is not None
            except (KeyError, TypeError, ValueError):
                log.warning("worker %d sent metrics that could not be read", worker_id)
                up[worker_id] = False
        families = metrics.merge_families(groups)
        families.append(metrics.worker_up_family({str(k): v for k, v in sorted(up.items())}))
        return metrics.families_response(families, req)

    async def _readyz(self, req: Request) -> Response:
        # Not ready while any worker is not: a load balancer should stop sending
        # this host new clients, a share of which the kernel would give that worker.
        local = await self._local_readyz(req)
        if local.status != 200:
            return _with_worker(local, self.id)
        states = await self._states()
        if all(state == "ready" for state in states.values()):
            return json_response(200, {"status": "ready", "worker": self.id, "workers": states})
        status = "draining" if "draining" in states.values() else "degraded"
        return json_response(503, {"status": status, "worker": self.id, "workers": states})

    async def _healthz(self, req: Request) -> Response:
        # Alive while this worker is, whatever the others do: the supervisor
        # restarts a missing worker, and a failed liveness probe would make an
        # orchestrator restart the whole server, healthy workers and all.
        local = await self._local_healthz(req)
        if local.status != 200:
            return _with_worker(local, self.id)
        states = await self._states()
        return json_response(200, {"status": "ok", "worker": self.id, "workers": states})


def _probe(path: str) -> Request:
    return Request("GET", path, {}, [], b"", None)


def _with_worker(resp: Response, worker_id: int) -> Response:
    """*resp* with ``"worker": id`` added to its JSON object body (as it is, if it has none)."""
    try:
        body = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        return resp
    if not isinstance(body, dict):
        return resp
    return attrs.evolve(resp, body=orjson.dumps({**body, "worker": worker_id}))
