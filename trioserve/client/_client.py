"""The client: :func:`connect` and :class:`Client`.

::

    connect()                        the caller's ``async with``
    └── the client's nursery
        ├── Client._run              connects, reads, reconnects with backoff
        │   └── session nursery      one per connection: its subscribe / refresh requests
        └── trio-websocket's reader  one per connection

The reader of each connection is trio-websocket's; the client's own reading
and dispatching happens in ``_run`` (see _session.py). A connection is opened
before the session that uses it (the first one before the ``async with`` block
starts, later ones in the reconnect loop), so trio-websocket's reader runs in
the one nursery that outlives both: the client's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import trio

from ..push.hub import PublishResult
from ._errors import ClientClosed, ClientError, ConnectError, ConnectionLost, Unauthorized, server_error
from ._models import ClientInfo, ClientState, ClientStatistics, StreamPosition, int_or_zero
from ._session import Lost, Session
from ._subscription import GapHandler, PresenceHandler, Subscription, Subscriptions, SubState
from ._websocket import Closed, WebSocket, WsUrl

log = logging.getLogger("trioserve.client")

#: ``async def provider() -> str``: returns a fresh token.
TokenProvider = Callable[[], Awaitable[str]]

#: Close codes after which the client reconnects: going away (drain), no close
#: frame at all, server error, at capacity, heartbeat timeout, slow consumer.
RECONNECT_CODES = frozenset({1001, 1006, 1011, 1013, 4002, 4008})
UNAUTHORIZED_CODE = 4001
#: How long closing waits for the server to answer the close frame.
CLOSE_TIMEOUT = 5.0
_MAX_BACKOFF_EXPONENT = 60

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Client:
    """A connection to a trioserve server that reconnects by itself.

    Made by :func:`connect` (see it for the options); use it only inside that
    ``async with`` block. Any task may call its methods.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | TokenProvider | None = None,
        on_gap: GapHandler | None = None,
        reconnect: bool = True,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        request_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        buffer_size: int = 256,
        max_message_size: int = 16 * 1024 * 1024,
        ping_interval: float | None = 30.0,
        ping_timeout: float = 10.0,
        headers: Sequence[tuple[str, str]] = (),
        ssl_context: ssl.SSLContext | None = None,
    ):
        self._url = WsUrl.parse(url)
        for name, value in (("backoff_initial", backoff_initial), ("backoff_max", backoff_max),
                            ("request_timeout", request_timeout), ("connect_timeout", connect_timeout),
                            ("ping_timeout", ping_timeout)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if ping_interval is not None and not ping_interval > 0:
            raise ValueError(f"ping_interval must be positive or None, got {ping_interval!r}")
        if backoff_max < backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        if buffer_size < 1 or max_message_size < 1:
            raise ValueError("buffer_size and max_message_size must be at least 1")
        self._token = token
        self._on_gap = on_gap
        self._reconnect = reconnect
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._buffer_size = buffer_size
        self._max_message_size = max_message_size
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._headers = list(headers)
        self._ssl_context = ssl_context

        self._subs = Subscriptions()
        self._session: Session | None = None
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self._run_scope = trio.CancelScope()
        self._state = ClientState.RECONNECTING
        self._closing = False
        self._failure: ClientError | None = None
        self._reconnects = 0
        self._failed_attempts = 0

    # --- public ----------------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self._state

    def statistics(self) -> ClientStatistics:
        session = self._session
        counters = self._subs.counters
        return ClientStatistics(
            state=self._state,
            reconnects=self._reconnects,
            failed_attempts=self._failed_attempts,
            publications_received=counters.received,
            duplicates_skipped=counters.duplicates,
            gaps=counters.gaps,
            subscriptions=len(self._subs),
            pending_requests=0 if session is None else len(session.pending),
        )

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        topic: str,
        *,
        since: StreamPosition | None = None,
        on_gap: GapHandler | None = None,
        on_presence: PresenceHandler | None = None,
        buffer_size: int | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to *topic* for the duration of the ``async with`` block::

            async with client.subscribe("news") as sub:
                async for pub in sub:
                    print(pub.offset, pub.data)

        Entering waits for the server's reply (at most ``request_timeout``,
        then :class:`trio.TooSlowError`; while reconnecting it waits for the
        connection), and raises :class:`ServerError` if the server refuses.

        Args:
          since: start after this position instead of at the topic's current
            end: the server replays what followed, or the iterator raises
            :class:`RecoveryGap` first if it cannot.
          on_gap: overrides :func:`connect`'s ``on_gap`` for this subscription.
          on_presence: ``on_presence(event)``, called (in the reader task: it
            must not block) with each :class:`PresenceEvent` of the topic, when
            the server sends them for it. An exception it raises is raised by
            the iterator.
          buffer_size: publications buffered for the consumer (default: the
            client's); when the buffer is full the client stops reading.

        Raises:
          RuntimeError: if this client is already subscribed to *topic*.
        """
        self._raise_if_closed()
        state = self._subs.add(topic, since, on_gap or self._on_gap, on_presence,
                               buffer_size or self._buffer_size)
        try:
            with trio.fail_after(self._request_timeout):
                if self._session is not None:
                    self._session.start_subscribe(state)
                await state.ready.wait()
            if state.error is not None:
                raise state.error.with_traceback(None)
            yield Subscription(state)
        finally:
            await self._unsubscribe(state)

    async def publish(self, topic: str, data: Any) -> PublishResult:
        """Publish *data* (any JSON value) to *topic*.

        The server must allow it (``client_publish``, or a token with the
        publish claim); otherwise :class:`ServerError` with code
        ``"forbidden"``. A publish is not repeated on the next connection when
        the connection drops before the reply: that raises
        :class:`ConnectionLost`, and the publication may or may not exist.
        """
        reply = await self._request({"op": "publish", "topic": topic, "data": data}, retry=False)
        return PublishResult(offset=int_or_zero(reply.get("offset")),
                             subscribers=int_or_zero(reply.get("subscribers")))

    async def presence(self, topic: str) -> list[ClientInfo]:
        """The connections subscribed to *topic* now, on the server this client is connected to.

        Needs the token's ``presence`` claim (anonymous connections may).
        """
        reply = await self._request({"op": "presence", "topic": topic}, retry=True)
        clients = reply.get("clients")
        return [ClientInfo.from_json(c) for c in clients] if isinstance(clients, list) else []

    async def rpc(self, method: str, data: Any = None) -> Any:
        """Call *method* on the application's backend through the server (its
        ``proxy_rpc_url``, docs/backend.md) and return the backend's ``result``.

        The backend's refusal raises :class:`ServerError` with code
        ``"rpc_error"`` and the backend's code as its ``status``; a server with no
        RPC backend answers ``"unknown_op"``. Not repeated after a reconnect:
        the backend may have acted on it.
        """
        reply = await self._request({"op": "rpc", "method": method, "data": data}, retry=False)
        return reply.get("result")

    async def ping(self) -> None:
        """One round trip to the server."""
        await self._request({"op": "ping"}, retry=True)

    async def aclose(self) -> None:
        """Close the connection (code 1000) and stop reconnecting.

        Subscriptions' iterators end once they have yielded what was already
        received; requests raise :class:`ClientClosed`. Leaving :func:`connect`'s
        block does this too.
        """
        if self._closing:
            await trio.lowlevel.checkpoint()
            return
        self._closing = True
        self._shut(ClientClosed(1000, "closed by the client"), quiet=True)
        session = self._session
        if session is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await session.ws.close(1000)
                await session.done.wait()
            session.ws.abort()
        else:
            await trio.lowlevel.checkpoint()
        self._run_scope.cancel()

    # --- connecting ------------------------------------------------------------------------

    async def _open(self, nursery: trio.Nursery) -> WebSocket:
        """One connection attempt, token included, bounded by ``connect_timeout``.

        *nursery* is the client's (see the module docstring).
        """
        with trio.move_on_after(self._connect_timeout):
            headers = list(self._headers)
            token = await self._get_token()
            if token is not None:
                headers.append(("Authorization", f"Bearer {token}"))
            return await WebSocket.open(
                nursery,
                self._url,
                headers=headers,
                ssl_context=self._ssl_context,
                max_message_size=self._max_message_size,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
            )
        raise ConnectError(f"connecting to {self._url.host_header} timed out after {self._connect_timeout}s")

    async def _get_token(self) -> str | None:
        if self._token is None or isinstance(self._token, str):
            return self._token
        try:
            token = await self._token()
        except Exception as exc:
            raise ConnectError(f"the token provider failed: {exc!r}") from exc
        if not isinstance(token, str):
            raise ConnectError(f"the token provider returned {type(token).__name__}, not str")
        return token

    async def _run(self, nursery: trio.Nursery, ws: WebSocket) -> None:
        """Serve connections until closed: the one background task of :func:`connect`."""
        attempt = 0
        with self._run_scope:
            while True:
                started = trio.current_time()
                closed = await self._serve(ws)
                if self._closing:
                    return
                if closed.code == UNAUTHORIZED_CODE:
                    self._shut(Unauthorized(f"the server closed the connection: 4001 {closed.reason}"))
                    return
                if not self._reconnect or closed.code not in RECONNECT_CODES:
                    self._shut(ClientClosed(closed.code, closed.reason))
                    return
                log.info("connection closed (%d %s); reconnecting", closed.code, closed.reason)
                self._state = ClientState.RECONNECTING
                if trio.current_time() - started >= self._backoff_max:
                    attempt = 0
                while True:
                    # Exponential backoff with full jitter.
                    cap = self._backoff_initial * 2.0 ** min(attempt, _MAX_BACKOFF_EXPONENT)
                    await trio.sleep(random.uniform(0, min(self._backoff_max, cap)))
                    attempt += 1
                    try:
                        ws = await self._open(nursery)
                    except Unauthorized as exc:
                        self._shut(exc)
                        return
                    except ConnectError as exc:
                        self._failed_attempts += 1
                        log.info("reconnect attempt %d failed: %s", attempt, exc)
                        continue
                    break
                self._reconnects += 1
                log.info("reconnected to %s (attempt %d)", self._url.host_header, attempt)

    async def _serve(self, ws: WebSocket) -> Closed:
        async with trio.open_nursery() as nursery:
            session = Session(ws, nursery, self._subs, self._ids, self._refresh)
            self._session = session
            self._state = ClientState.OPEN
            self._notify()
            for state in self._subs:
                session.start_subscribe(state)
            try:
                closed = await session.read_loop()
            finally:
                session.end()
                if self._session is session:
                    self._session = None
                self._notify()
        return closed

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _shut(self, exc: ClientError, quiet: bool = False) -> None:
        """Closed for good: fail (or, if *quiet*, end) every subscription and waiter."""
        if self._failure is None:
            self._failure = exc
        self._state = ClientState.CLOSED
        for state in self._subs:
            self._subs.end(state, None if quiet else exc)
        self._notify()

    def _raise_if_closed(self) -> None:
        if self._failure is not None:
            raise self._failure.with_traceback(None)

    # --- requests --------------------------------------------------------------------------

    async def request(self, op: str, *, retry: bool = False, **fields: Any) -> dict[str, Any]:
        """Send your own op (one added with ``Server.add_op``) and return its reply.

        With ``retry=True`` the request is sent again after a reconnect; leave
        it False for ops that must not run twice. Raises :class:`ServerError`
        for an error reply and :class:`ConnectionLost` if the connection drops
        before the answer (without retry).
        """
        return await self._request({"op": op, **fields}, retry=retry)

    async def _request(self, msg: dict[str, Any], *, retry: bool) -> dict[str, Any]:
        with trio.fail_after(self._request_timeout):
            while True:
                session = await self._wait_session()
                try:
                    reply = await session.roundtrip(dict(msg))
                except Lost:
                    self._raise_if_closed()
                    if retry:
                        await session.done.wait()
                        continue
                    raise ConnectionLost(
                        f"the connection dropped before the server answered {msg['op']!r}"
                    ) from None
                break
        if reply.get("ok") is not True:
            raise server_error(reply)
        return reply

    async def _wait_session(self) -> Session:
        while True:
            self._raise_if_closed()
            session = self._session
            if session is not None and not session.closed:
                return session
            await self._changed.wait()

    async def _refresh(self, session: Session) -> None:
        if self._token is None or isinstance(self._token, str):
            log.warning("the server asked for a fresh token but the token is a fixed string; "
                        "pass an async token provider to connect() to refresh it")
            return
        try:
            with trio.fail_after(self._request_timeout):
                token = await self._get_token()
                reply = await session.roundtrip({"op": "refresh", "token": token})
        except (Lost, trio.TooSlowError, ConnectError) as exc:
            log.warning("token refresh failed: %r", exc)
            return
        if reply.get("ok") is not True:
            log.warning("the server refused the refreshed token: %s", server_error(reply))

    async def _unsubscribe(self, state: SubState) -> None:
        was_active = self._subs.end(state, None)
        state.closed = True
        state.recv.close()
        session = self._session
        if was_active and session is not None and not session.closed:
            # Awaited (not spawned) so a later subscribe to the topic goes out after it.
            with trio.CancelScope(shield=True), trio.move_on_after(self._request_timeout):
                with contextlib.suppress(Closed):
                    await session.send({"op": "unsubscribe", "topic": state.topic})


def _arguments_of(cls: Callable[_P, object]) -> Callable[[Callable[..., _R]], Callable[_P, _R]]:
    """Give the decorated function *cls*'s parameters, for type checkers and
    ``inspect.signature``: they are written once, in ``Client.__init__``."""

    def decorate(fn: Callable[..., _R]) -> Callable[_P, _R]:
        functools.update_wrapper(fn, cls, assigned=(), updated=())
        return fn

    return decorate


@_arguments_of(Client)
@contextlib.asynccontextmanager
async def connect(*args: Any, **kwargs: Any) -> AsyncIterator[Client]:
    """Connect to a trioserve server's WebSocket endpoint::

        async with trioserve.client.connect("ws://127.0.0.1:8000/ws") as client:
            async with client.subscribe("news") as sub:
                async for pub in sub:
                    ...

    The first connection is made before the block starts; if it fails this
    raises :class:`ConnectError` (or :class:`Unauthorized` on HTTP 401). After
    that the client reconnects by itself when the connection drops or the
    server closes it with 1001, 1011, 1013, 4002 or 4008, waiting a random
    time between 0 and ``min(backoff_max, backoff_initial * 2**attempt)``
    (exponential backoff with full jitter), and resubscribes every active
    subscription from its last position (see :class:`RecoveryGap`). Leaving
    the block closes the client.

    Args:
      url: ``ws://host:port/ws`` or ``wss://...``.
      token: sent as ``Authorization: Bearer <token>`` on the upgrade. An async
        callable is called for a fresh token on every connection attempt and
        when the server asks for a refresh (``refresh_required``).
      on_gap: ``on_gap(gap) -> bool``, called (in the client's reader task:
        it must not block) when a subscription lost publications; returning
        True continues from the new position instead of raising
        :class:`RecoveryGap` in the iterator.
      reconnect: False turns automatic reconnection off: a dropped connection
        then closes the client (:class:`ClientClosed`).
      backoff_initial, backoff_max: the backoff bounds, in seconds.
      request_timeout: how long a request (subscribe, publish, presence, ping)
        waits for its reply, including for a reconnection, before
        :class:`trio.TooSlowError`.
      connect_timeout: bound on one connection attempt (token, TCP, TLS, upgrade).
      buffer_size: publications each subscription buffers for its consumer.
        When a consumer's buffer is full the client stops reading from the
        server until it has room (backpressure).
      max_message_size: the largest message accepted from the server (a
        subscribe reply carries every recovered publication).
      ping_interval, ping_timeout: when the server has been silent for
        *ping_interval* seconds, the client pings it and treats the connection
        as dead if nothing arrives within *ping_timeout*. None turns it off.
      headers: extra HTTP headers for the upgrade request.
      ssl_context: for ``wss://``; the default verifies certificates.
    """
    client = Client(*args, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            ws = await client._open(nursery)
            nursery.start_soon(client._run, nursery, ws)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background tasks do not raise (they record failures for the
        # caller's requests and iterators), so a lone exception here is the
        # caller's own, or the first connection's failure: give it back unwrapped.
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            raise exc from exc.__cause__
        raise
