"""The Server: one nursery per listener, the hub, drain and signals.

::

    Server.serve
    ├── hub fan-out task
    ├── cluster              (answers the other nodes' server-API questions)
    ├── listener "ws+http"   accept loop + one task per socket
    ├── listener "tcp"       (when tcp_port is set)
    ├── shedder              (sleeps until the queued bytes pass max_queued_bytes)
    └── signal watcher       (when handle_signals=True)
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..config import Config
from ..net import listeners
from ..net.admission import Admission, IdleScopes
from ..net.connection import Connection, ConnectionClosed, ConnectionState, QueueTotal
from ..net.heartbeat import Heartbeats
from ..net.httpd import EventStream, HttpSite, RouteHandler, Router, Upgrade, serve_http
from ..net.sse import SseConnection
from ..net.tcp import TcpConnection
from ..net.transport import SocketTransport, TlsTransport, Transport
from ..net.websocket import DeflateWebSocketConnection, WebSocketConnection
from ..protocol import ndjson
from ..protocol.claims import ANONYMOUS, AuthError
from ..protocol.codes import CloseCode
from ..protocol.messages import KNOWN_OPS, Command
from ..push.api import api_routes
from ..push.brokers import make_broker
from ..push.handler import leave_all, push_handler
from ..push.history import History
from ..push.hub import Hub
from ..push.sse import SSE_PATH, sse_handler
from ..push.users import UserIndex
from .admin import ADMIN_WS_PATH, admin_stream
from .api_admin import admin_api_routes
from .application import ApplicationLink
from .auth import Authenticator
from .cluster import Cluster, new_recent, recent
from .proxy import HttpBackend
from .routes import server_routes
from .stats import ServerStatistics
from .webhooks import Webhooks

__all__ = ["Handler", "OpHandler", "Reject", "Server", "ServerStatistics", "server_routes"]

log = logging.getLogger("trioserve.server")

_NORMAL_CLOSES = frozenset({CloseCode.NORMAL, CloseCode.GOING_AWAY})
# Seconds between rounds of shedding, so a total that stays over the limit while
# queues drain does not make the shedder sort every connection again and again.
_SHED_INTERVAL = 0.01

Handler = Callable[[Connection], Awaitable[None]]
#: A custom protocol op: returns the reply's fields (or None), or raises ProtocolError.
OpHandler = Callable[[Connection, Command], Awaitable[dict[str, Any] | None]]


class Reject(Exception):
    """Raise from ``on_connect`` to refuse a connection with a close code and reason."""

    def __init__(self, code: int = CloseCode.POLICY_VIOLATION, reason: str = "rejected"):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


@attrs.define
class _Listener:
    name: str
    sockets: list[socket.socket]
    nursery: trio.Nursery | None = None
    accept_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)


class Server(ApplicationLink):
    """A trioserve server: HTTP + WebSocket on one port, NDJSON over TCP on another.

    Run it inside your own nursery; ``start`` returns once every listener is
    bound, with the real ports in :attr:`addresses` (so port 0 works)::

        server = Server(Config(port=0))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print(server.addresses["ws+http"])

    ``ws_handler`` / ``tcp_handler`` replace the push protocol for that transport;
    a handler is ``async def handler(conn)`` and the connection closes (1000)
    when it returns, or with 1011 if it raises.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        hub: Hub | None = None,
        ws_handler: Handler | None = None,
        tcp_handler: Handler | None = None,
        handle_signals: bool = False,
        on_connect: Callable[[Connection], Awaitable[None]] | None = None,
        on_disconnect: Callable[[Connection], None] | None = None,
        on_subscribe: Callable[[Connection, str], None] | None = None,
        on_unsubscribe: Callable[[Connection, str], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.config = config or Config()
        if ssl_context is None and self.config.certfile is not None:
            from ..net.tls import server_context

            ssl_context = server_context(self.config)
        #: With a context, both listeners speak TLS (``certfile``, or given here).
        self.ssl_context = ssl_context
        self.hub = hub or Hub(self.config.hub_max_pending, History(self.config.history_for),
                              make_broker(self.config))
        #: Verifies connection tokens; None when no token key is configured.
        self.authenticator = Authenticator.from_config(self.config)
        push = functools.partial(push_handler, server=self)
        #: WebSocket handlers by path; ``ws_path`` serves the push protocol by default.
        self.ws_handlers: dict[str, Handler] = {self.config.ws_path: ws_handler or push}
        self.tcp_handler: Handler = tcp_handler or push
        self._sse_handler: Handler = functools.partial(sse_handler, server=self)
        self.handle_signals = handle_signals
        #: Called after authentication and before the handler; raise :class:`Reject` to refuse.
        self.on_connect = on_connect
        #: Called once a connection has closed, with its subscriptions already gone.
        self.on_disconnect = on_disconnect
        #: Called before a push-protocol subscribe; raise ProtocolError to refuse it.
        #: Synchronous on purpose: recovery and subscribing must not be split by a checkpoint.
        self.on_subscribe = on_subscribe
        #: Called after a push-protocol unsubscribe that removed a subscription.
        self.on_unsubscribe = on_unsubscribe
        cfg = self.config
        #: The application's backend (docs/backend.md): the ``proxy_*_url`` settings.
        self.backend = HttpBackend.for_config(cfg)
        self.webhooks = Webhooks(cfg) if cfg.webhooks_url is not None else None
        self.ops: dict[str, OpHandler] = {}
        #: ``ops``' names, kept as a frozenset for the parser on every message.
        self.op_names: frozenset[str] = frozenset()
        #: Bound addresses per listener name, filled in before ``started``.
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        #: Set when a second signal cut the drain short: the signal number.
        self.forced_exit: int | None = None
        self._listeners: list[_Listener] = []
        self._connections: set[Connection] = set()
        self._admission = Admission(self.config, self._connections)
        self._idle = IdleScopes()
        #: Connections by user (a token's sub), for the server API; recent closes, for /admin.
        self.users = UserIndex()
        self.recent_disconnects = new_recent()
        self.started_at = time.monotonic()
        #: The server API's reach to every node or worker, through the broker.
        self.cluster = Cluster(self)
        self.ws_handlers[ADMIN_WS_PATH] = functools.partial(admin_stream, server=self, cluster=self.cluster)
        self._router = Router({**server_routes(self), **api_routes(self),
                               **admin_api_routes(self, self.cluster)})
        gate = self.connect_proxy if cfg.connect_proxied else None
        self._http = HttpSite(cfg, self._admission, self._idle, self._router, self.ws_handlers, gate,
                              SSE_PATH)
        self._heartbeats = Heartbeats(self.config.ping_interval, self.config.ping_timeout,
                                      lambda: self._connections)
        self._connects: dict[str, int] = {}
        self._disconnects: dict[int, int] = {}
        self._auth_failures = 0
        self._shed_lot = trio.lowlevel.ParkingLot()
        self._queue_total = QueueTotal(self.config.max_queued_bytes, self._shed_lot.unpark_all)
        self._conn_gone = trio.lowlevel.ParkingLot()
        self._drained = 0
        self._forced = 0
        self._drain_done = trio.Event()
        self._started = False

    # --- public ---------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._admission.draining

    @property
    def max_connections(self) -> int:
        """The connection limit in force: ``max_connections``, or what the fd limit
        allows once serving when that is unset."""
        return self._admission.max_connections

    def add_websocket(self, path: str, handler: Handler) -> None:
        """Serve WebSocket upgrades on *path* with ``async def handler(conn)``,
        next to the push protocol on ``ws_path``."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        self.ws_handlers[path] = handler

    def add_op(self, op: str, handler: OpHandler) -> None:
        """Add ``{"op": op, ...}`` to the push protocol on both transports.

        ``async def handler(conn, cmd) -> dict | None``: the dict's fields go
        into the ``{"ok": true}`` reply (with the command's id); raise
        ``trioserve.ProtocolError`` for an error reply. Built-in ops cannot be
        replaced.
        """
        if op in KNOWN_OPS:
            raise ValueError(f"{op!r} is a built-in op")
        self.ops[op] = handler
        self.op_names = frozenset(self.ops)

    def add_route(self, method: str, path: str, handler: RouteHandler) -> None:
        """Serve ``method path`` on the HTTP port with ``async def handler(request) -> Response``."""
        self._router.add(method, path, handler)

    @property
    def connections(self) -> frozenset[Connection]:
        return frozenset(self._connections)

    def statistics(self) -> ServerStatistics:
        ws = sum(1 for c in self._connections if isinstance(c, WebSocketConnection))
        streams = sum(1 for c in self._connections if isinstance(c, SseConnection))
        return ServerStatistics(
            connections=len(self._connections),
            websocket_connections=ws,
            tcp_connections=len(self._connections) - ws - streams,
            sse_connections=streams,
            max_connections=self.max_connections,
            rejected_connections=self._admission.rejected,
            connects_total=dict(self._connects),
            disconnects_total=dict(self._disconnects),
            auth_failures=self._auth_failures,
            draining=self.draining,
            hub=self.hub.statistics(),
            worker_id=self.config.worker_id,
            proxy_calls=dict(self.backend.calls) if self.backend else {},
            webhooks=self.webhooks.counters() if self.webhooks else {},
        )

    async def serve(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until drained. ``nursery.start(server.serve)`` returns the server once bound."""
        if self._started:
            raise RuntimeError("a Server can be served only once")
        self._started = True
        self._admission.check_fd_limit()
        cfg = self.config
        self._listeners.append(
            _Listener("ws+http", listeners.bind_listeners(cfg.host, cfg.port, cfg.backlog, cfg.reuse_port))
        )
        try:
            if cfg.tcp_port is not None:
                self._listeners.append(
                    _Listener("tcp", listeners.bind_listeners(cfg.host, cfg.tcp_port, cfg.backlog,
                                                              cfg.reuse_port))
                )
            for lst in self._listeners:
                self.addresses[lst.name] = [s.getsockname()[:2] for s in lst.sockets]
            self._log_listening()
            async with trio.open_nursery() as root:
                await root.start(self.hub.run)
                await root.start(self.hub.broker.run)
                await root.start(self.cluster.run)
                await root.start(self._heartbeats.run)
                if self.webhooks is not None:
                    await root.start(self.webhooks.run)
                if self._queue_total.limit:
                    root.start_soon(self._shed_loop)
                if self.handle_signals:
                    root.start_soon(self._watch_signals, root)
                async with trio.open_nursery() as listener_nursery:
                    for lst in self._listeners:
                        await listener_nursery.start(self._run_listener, lst)
                    task_status.started(self)
                log.info("drained %d, forced %d", self._drained, self._forced)
                self._drain_done.set()
                root.cancel_scope.cancel()
        finally:
            for lst in self._listeners:
                for s in lst.sockets:
                    listeners.close_listener(s)
            if self.backend is not None:
                with trio.CancelScope(shield=True):
                    await self.backend.aclose()

    async def drain(self, timeout: float | None = None) -> None:
        """Close gracefully: stop accepting, report not-ready, deliver everything
        already published, send 1001 to every client, and wait for them until
        *timeout* (default ``drain_timeout``); then cancel what is left."""
        if self.draining:
            await self._drain_done.wait()
            return
        self._admission.draining = True
        deadline = trio.current_time() + (self.config.drain_timeout if timeout is None else timeout)
        log.info("draining %d connections (deadline %.0fs)", len(self._connections),
                 deadline - trio.current_time())
        # The HTTP port keeps answering while connections close, so probes see
        # /readyz 503 and new clients get a 503 upgrade rather than a refused
        # connection; only the TCP listener, which has no such answer, stops now.
        for lst in self._listeners[1:]:
            lst.accept_scope.cancel()
        self.hub.close()
        with trio.move_on_at(deadline):
            await self.hub.flush()
        for conn in list(self._connections):
            conn.start_close(CloseCode.GOING_AWAY)
        for lst in self._listeners:
            if lst.nursery is not None:
                lst.nursery.cancel_scope.deadline = deadline
        with trio.move_on_at(deadline):
            while self._connections:
                await self._conn_gone.park()
        if self.webhooks is not None:
            await self.webhooks.flush(deadline)
        self._listeners[0].accept_scope.cancel()
        self._idle.close()
        await self._drain_done.wait()

    # --- internals ---------------------------------------------------------------------

    def _log_listening(self) -> None:
        tls = self.ssl_context is not None
        http_scheme, ws_scheme, tcp_scheme = ("https", "wss", "tcp+tls") if tls else ("http", "ws", "tcp")
        for name, addrs in self.addresses.items():
            for host, port in addrs:
                shown = f"[{host}]" if ":" in host else host
                if name == "ws+http":
                    log.info("listening on %s://%s:%d (WebSocket at %s://%s:%d%s)",
                             http_scheme, shown, port, ws_scheme, shown, port, self.config.ws_path)
                else:
                    log.info("listening on %s://%s:%d (NDJSON)", tcp_scheme, shown, port)

    async def _run_listener(self, lst: _Listener, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            lst.nursery = nursery
            serve_socket = self._serve_http_socket if lst.name == "ws+http" else self._serve_tcp_socket

            def on_accept(sock: socket.socket, remote: str) -> None:
                if self._admission.take_socket():
                    nursery.start_soon(serve_socket, sock, remote)
                else:
                    sock.close()

            for lsock in lst.sockets:
                nursery.start_soon(self._accept, lst, lsock, on_accept)
            task_status.started()

    async def _accept(self, lst: _Listener, lsock: socket.socket,
                      on_accept: Callable[[socket.socket, str], None]) -> None:
        with lst.accept_scope:
            await listeners.accept_loop(lsock, on_accept)
        listeners.close_listener(lsock)

    # --- max_queued_bytes ---------------------------------------------------------------

    async def _shed_loop(self) -> None:
        total = self._queue_total
        while True:
            if not total.over:
                await self._shed_lot.park()
                continue
            self._shed()
            await trio.sleep(_SHED_INTERVAL)
            total.over = total.bytes > total.limit

    def _shed(self) -> None:
        """Close the connections with the largest queues until the total fits again."""
        total = self._queue_total
        projected = total.bytes
        if projected <= total.limit:
            return
        victims = sorted((c for c in self._connections if c.queued_bytes),
                         key=lambda c: c.queued_bytes, reverse=True)
        shed = 0
        for conn in victims:
            if projected <= total.limit:
                break
            # All of its queue goes: what is not dropped now is in flight, and
            # is freed once sent or when the connection closes.
            projected -= conn.queued_bytes
            conn.shed()
            shed += 1
        log.warning("%d bytes queued for clients, over max_queued_bytes (%d): closing the %d "
                    "connection(s) with the largest queues (4008)", total.bytes, total.limit, shed)

    # --- TLS ----------------------------------------------------------------------------

    def _transport_for(self, sock: socket.socket) -> Transport:
        if self.ssl_context is None:
            return SocketTransport(sock)
        return TlsTransport(sock, self.ssl_context)

    async def _tls_handshake(self, transport: Transport, remote: str) -> bool:
        """The TLS handshake, within handshake_timeout (and cancelled by a drain)."""
        if not isinstance(transport, TlsTransport):
            return True
        scope = self._idle.open(trio.current_time() + self.config.handshake_timeout)
        try:
            with scope:
                if await transport.handshake():
                    return True
        finally:
            self._idle.discard(scope)
        log.debug("TLS handshake with %s %s", remote, "timed out" if scope.cancelled_caught else "failed")
        return False

    async def _close_transport(self, transport: Transport) -> None:
        if isinstance(transport, TlsTransport):
            # Shielded: the socket must be closed even when this task is cancelled.
            with trio.CancelScope(shield=True):
                await transport.aclose()
        else:
            transport.close()

    async def _serve_http_socket(self, sock: socket.socket, remote: str) -> None:
        peer = self._admission.count_peer(remote)
        transport = self._transport_for(sock)
        try:
            if not await self._tls_handshake(transport, remote):
                return
            try:
                upgrade = await serve_http(transport, self._http, remote)
            except Exception:
                # A bug in request handling costs this socket, never the listener.
                log.exception("HTTP handling failed for %s; closing the socket", remote)
                return
            if upgrade is not None:
                nursery = self._listeners[0].nursery
                assert nursery is not None
                conn: Connection
                admitted = upgrade.admitted
                if isinstance(upgrade, EventStream):  # GET /sse: its handler answers
                    conn = SseConnection(transport, self.config, nursery, remote, upgrade.request,
                                         upgrade.cors, queue_total=self._queue_total,
                                         heartbeats=self._heartbeats,
                                         conn_id=admitted.conn_id if admitted else None)
                    handler = self._sse_handler
                else:
                    cls = DeflateWebSocketConnection if upgrade.deflate else WebSocketConnection
                    conn = cls(transport, self.config, nursery, remote, upgrade.trailing,
                               queue_total=self._queue_total, heartbeats=self._heartbeats,
                               conn_id=admitted.conn_id if admitted else None)
                    handler = self.ws_handlers[upgrade.path]
                if isinstance(upgrade, Upgrade) and upgrade.path == ADMIN_WS_PATH:
                    conn.set_claims(ANONYMOUS)  # the status page: it sends the API key itself
                elif admitted is not None:  # the connect proxy let it in
                    conn.set_claims(admitted.claims)
                else:
                    self._authenticate(conn, upgrade.token)
                # The upgrade's reserved slot becomes the connection itself:
                # _run_connection counts it before its first checkpoint.
                self._admission.release()
                await self._run_connection(conn, handler)
        finally:
            await self._close_transport(transport)
            self._admission.release_peer(peer)
            self._admission.release_socket()

    async def _serve_tcp_socket(self, sock: socket.socket, remote: str) -> None:
        peer = self._admission.count_peer(remote)
        transport = self._transport_for(sock)
        try:
            if not await self._tls_handshake(transport, remote):
                return
            refusal = self._admission.refusal(remote)
            if refusal is not None:
                line = ndjson.close_line(refusal.code, refusal.reason)
                if isinstance(transport, SocketTransport):
                    transport.try_send(line)
                else:
                    with trio.move_on_after(self.config.close_timeout):
                        await transport.send_all(line)
                return
            nursery = self._listeners[-1].nursery
            assert nursery is not None
            conn = TcpConnection(transport, self.config, nursery, remote, queue_total=self._queue_total,
                                 heartbeats=self._heartbeats)
            if self.config.anonymous_allowed and not self.config.connect_proxied:
                # Otherwise a TCP client authenticates with its first line, {"op":"connect"}.
                conn.set_claims(ANONYMOUS)
            await self._run_connection(conn, self.tcp_handler)
        except OSError:
            pass
        finally:
            await self._close_transport(transport)
            self._admission.release_peer(peer)
            self._admission.release_socket()

    def _authenticate(self, conn: Connection, token: str | None) -> None:
        """Give *conn* its claims from *token*, or start closing it with 4001.

        A refused WebSocket is closed after the upgrade rather than answered
        with a 401, because a browser sees no HTTP status of a failed upgrade,
        but it does see a close frame's code and reason.
        """
        if token is None and self.config.anonymous_allowed:
            conn.set_claims(ANONYMOUS)
            return
        if self.authenticator is None:
            # No key to verify with; a token is not a reason to refuse a connection.
            conn.set_claims(ANONYMOUS)
            return
        try:
            conn.set_claims(self.authenticator.verify(token or ""))
        except AuthError as exc:
            self._auth_failures += 1
            log.info("unauthorized %s: %s", conn.remote, exc.code)
            conn.start_close(CloseCode.UNAUTHORIZED, f"unauthorized: {exc.code}")

    def identify(self, conn: Connection) -> None:
        """Index *conn* by its user for the server API (anonymous ones are not)."""
        claims = conn.claims
        self.users.set(conn, None if claims is None or claims.anonymous else claims.sub)

    def count_auth_failure(self) -> None:
        """Count a refused token (for the auth-failures metric)."""
        self._auth_failures += 1

    async def _run_connection(self, conn: Connection, handler: Handler) -> None:
        self._connections.add(conn)
        name = conn.transport_name
        self._connects[name] = self._connects.get(name, 0) + 1
        log.debug("connect %s (%s)", conn.remote, name)
        self.identify(conn)
        if self.draining:
            conn.start_close(CloseCode.GOING_AWAY)
        try:
            try:
                if conn.state is ConnectionState.OPEN and conn.claims is not None:
                    self.connected(conn)  # a TCP client without claims: after its connect
                if conn.state is ConnectionState.OPEN and self.on_connect is not None:
                    try:
                        await self.on_connect(conn)
                    except Reject as exc:
                        conn.start_close(exc.code, exc.reason)
                if conn.state is ConnectionState.OPEN:
                    await handler(conn)
            except ConnectionClosed:
                pass
            except Exception:
                log.exception("handler failed on %s; closing 1011", conn.remote)
                conn.start_close(CloseCode.INTERNAL_ERROR)
            await conn.close()
        finally:
            self._connections.discard(conn)
            self.users.discard(conn)
            self._conn_gone.unpark_all()
            topics = self.hub.topics_of(conn)
            self.hub.unsubscribe_all(conn)
            leave_all(self, conn, topics)
            if conn.claims is not None:  # it was let in: the application heard of it
                self.connection_event("disconnect", conn, code=conn.close_code or CloseCode.ABNORMAL,
                                      reason=conn.close_reason or "")
            if self.on_disconnect is not None:
                try:
                    self.on_disconnect(conn)
                except Exception:
                    log.exception("on_disconnect failed for %s", conn.remote)
            if conn.state is not ConnectionState.CLOSED:
                conn.abort()
                if self.draining:
                    self._forced += 1
            elif self.draining:
                self._drained += 1
            with trio.CancelScope(shield=True):
                await conn.transport.aclose()
            self._log_disconnect(conn)

    def _log_disconnect(self, conn: Connection) -> None:
        code = conn.close_code or CloseCode.ABNORMAL
        self._disconnects[code] = self._disconnects.get(code, 0) + 1
        recent(self, code, conn.close_reason or "", conn.transport_name)
        # Normal ends are routine at scale; everything else is worth seeing at info.
        level = logging.DEBUG if code in _NORMAL_CLOSES else logging.INFO
        log.log(level, "disconnect %s (%s): %d %s", conn.remote, conn.transport_name, code,
                conn.close_reason or "")

    async def _watch_signals(self, root: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.draining:
                    log.info("%s: draining (send it again to exit at once)", name)
                    root.start_soon(self.drain)
                else:
                    log.warning("%s again: exiting without waiting for the drain", name)
                    self.forced_exit = signum
                    root.cancel_scope.cancel()
                    return

