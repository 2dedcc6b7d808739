"""The client: :func:`connect`, :class:`Client` and :class:`Subscription`.

::

    connect()                      the caller's ``async with``
    └── nursery
        └── Client._run            connects, reads, reconnects with backoff
            └── session nursery    one per connection
                ├── reader         (Client._read_loop, in _run itself)
                └── subscribe / refresh requests of that connection

One reader task per connection dispatches every message: a reply goes to the
request waiting for its id (a one-slot memory channel), a publication to its
subscription's bounded memory channel. When a consumer falls behind and its
channel is full, the reader waits: backpressure reaches the server, which
closes a client that stays behind (4008) and the client then reconnects and
recovers.

A subscribe reply is applied by the reader before it reads anything else, so a
subscription's recovered publications, and the live ones after them, enter the
channel in offset order with nothing in between.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs
import orjson
import trio

from ..hub import PublishResult
from ._errors import (
    ClientClosed,
    ClientError,
    ConnectError,
    ConnectionLost,
    RecoveryGap,
    ServerError,
    Unauthorized,
)
from ._models import (
    ClientInfo,
    ClientState,
    ClientStatistics,
    PresenceEvent,
    Publication,
    StreamPosition,
)
from ._websocket import Closed, WebSocket, WsUrl

__all__ = ["Client", "GapHandler", "PresenceHandler", "Subscription", "TokenProvider", "connect"]

log = logging.getLogger("trioserve.client")

#: ``async def provider() -> str``: returns a fresh token.
TokenProvider = Callable[[], Awaitable[str]]
#: ``def on_gap(gap: RecoveryGap) -> bool``: True continues from the new position.
GapHandler = Callable[[RecoveryGap], bool]
#: ``def on_presence(event: PresenceEvent) -> None``.
PresenceHandler = Callable[[PresenceEvent], None]

#: Close codes after which the client reconnects: going away (drain), no close
#: frame at all, server error, at capacity, heartbeat timeout, slow consumer.
RECONNECT_CODES = frozenset({1001, 1006, 1011, 1013, 4002, 4008})
UNAUTHORIZED_CODE = 4001
#: How long closing waits for the server to answer the close frame.
CLOSE_TIMEOUT = 5.0
_MAX_BACKOFF_EXPONENT = 60

# What a subscription's channel carries: a publication with its topic's epoch
# (so the consumer's position is exact), or an exception to raise in order.
_Item = tuple[str | None, Publication] | Exception


class _Lost(Exception):
    """Internal: the connection ended before the reply arrived."""


class _SubState:
    """The reader's side of one subscription."""

    def __init__(self, topic: str, since: StreamPosition | None, on_gap: GapHandler | None,
                 on_presence: PresenceHandler | None, buffer_size: int):
        self.topic = topic
        self.on_presence = on_presence
        # The last position handed to the channel; resubscribing asks for what follows.
        self.epoch = since.epoch if since is not None else None
        self.offset = since.offset if since is not None else None
        self.on_gap = on_gap
        self.send, self.recv = trio.open_memory_channel[_Item](buffer_size)
        #: Set once the first subscribe reply (or an error) is in.
        self.ready = trio.Event()
        #: Position when ready, for the Subscription's initial ``position``.
        self.start_position: StreamPosition | None = None
        #: Failed before ready: :meth:`Client.subscribe` raises it.
        self.error: ClientError | None = None
        #: Failed after ready: the iterator raises it once the channel is empty.
        self.failure: ClientError | None = None
        self.closed = False
        #: The connection on which a subscribe is in flight; its publications wait in ``held``.
        self.pending: _Session | None = None
        self.held: list[dict[str, Any]] = []


@attrs.define
class _Pending:
    reply: trio.MemorySendChannel[dict[str, Any]]
    sub: _SubState | None


class _Session:
    """One connection's state: the socket, its requests, its tasks."""

    def __init__(self, ws: WebSocket, nursery: trio.Nursery):
        self.ws = ws
        self.nursery = nursery
        self.pending: dict[int, _Pending] = {}
        self.closed = False
        self.done = trio.Event()
        self.started_at = trio.current_time()


class Subscription:
    """A subscription to one topic: an async iterator of :class:`Publication`.

    Made by :meth:`Client.subscribe`; it lasts until its ``async with`` block
    ends, across reconnects. Each offset is yielded once, in order. If
    publications were lost (see :class:`RecoveryGap`), iteration raises
    :class:`RecoveryGap` at the point of the gap, unless an ``on_gap`` handler
    chose to continue; iterating again continues after the gap.

    Iteration ends (``StopAsyncIteration``) when the client is closed with
    :meth:`Client.aclose`, and raises :class:`Unauthorized`,
    :class:`ClientClosed` or :class:`ServerError` when the client or this
    subscription failed; publications received before that are yielded first.
    """

    def __init__(self, state: _SubState):
        self._state = state
        self._position = state.start_position

    @property
    def topic(self) -> str:
        return self._state.topic

    @property
    def position(self) -> StreamPosition | None:
        """The position of the last publication yielded (or the subscribe
        position before the first one). Pass it as ``since=`` to resume later."""
        return self._position

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Publication:
        try:
            item = await self._state.recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._state.failure is not None:
                raise self._state.failure.with_traceback(None) from None
            raise StopAsyncIteration from None
        if isinstance(item, Exception):
            if isinstance(item, RecoveryGap):
                self._position = StreamPosition(item.new_epoch, item.new_offset)
            raise item
        epoch, pub = item
        self._position = StreamPosition(epoch, pub.offset)
        return pub

    def __repr__(self) -> str:
        return f"<Subscription {self.topic!r} at {self._position}>"


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

        self._subs: dict[str, _SubState] = {}
        self._session: _Session | None = None
        self._changed = trio.Event()
        self._run_scope = trio.CancelScope()
        self._state = ClientState.RECONNECTING
        self._closing = False
        self._failure: ClientError | None = None
        self._next_id = 0
        self._reconnects = 0
        self._failed_attempts = 0
        self._received = 0
        self._duplicates = 0
        self._gaps = 0

    # --- public ----------------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self._state

    def statistics(self) -> ClientStatistics:
        session = self._session
        return ClientStatistics(
            state=self._state,
            reconnects=self._reconnects,
            failed_attempts=self._failed_attempts,
            publications_received=self._received,
            duplicates_skipped=self._duplicates,
            gaps=self._gaps,
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
        if topic in self._subs:
            raise RuntimeError(f"this client is already subscribed to {topic!r}")
        state = _SubState(topic, since, on_gap or self._on_gap, on_presence,
                          buffer_size or self._buffer_size)
        self._subs[topic] = state
        try:
            with trio.fail_after(self._request_timeout):
                if self._session is not None:
                    self._start_subscribe(self._session, state)
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
        return PublishResult(offset=_int(reply.get("offset")), subscribers=_int(reply.get("subscribers")))

    async def presence(self, topic: str) -> list[ClientInfo]:
        """The connections subscribed to *topic* now, on the server this client is connected to.

        Needs the token's ``presence`` claim (anonymous connections may).
        """
        reply = await self._request({"op": "presence", "topic": topic}, retry=True)
        clients = reply.get("clients")
        return [ClientInfo.from_json(c) for c in clients] if isinstance(clients, list) else []

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

    async def _open(self) -> WebSocket:
        """One connection attempt, token included, bounded by ``connect_timeout``."""
        with trio.move_on_after(self._connect_timeout):
            headers = list(self._headers)
            token = await self._get_token()
            if token is not None:
                headers.append(("Authorization", f"Bearer {token}"))
            return await WebSocket.open(
                self._url,
                target=self._url.target,
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

    async def _run(self, ws: WebSocket) -> None:
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
                        ws = await self._open()
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
            session = _Session(ws, nursery)
            self._session = session
            self._state = ClientState.OPEN
            self._notify()
            for state in list(self._subs.values()):
                self._start_subscribe(session, state)
            try:
                closed = await self._read_loop(session)
            finally:
                session.closed = True
                ws.abort()
                if self._session is session:
                    self._session = None
                for pending in session.pending.values():
                    pending.reply.close()
                for state in self._subs.values():
                    if state.pending is session:
                        state.pending = None
                        state.held = []
                nursery.cancel_scope.cancel()
                session.done.set()
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
        for state in list(self._subs.values()):
            self._end_sub(state, None if quiet else exc)
        self._notify()

    def _raise_if_closed(self) -> None:
        if self._failure is not None:
            raise self._failure.with_traceback(None)

    # --- requests --------------------------------------------------------------------------

    async def _request(self, msg: dict[str, Any], *, retry: bool) -> dict[str, Any]:
        with trio.fail_after(self._request_timeout):
            while True:
                session = await self._wait_session()
                try:
                    reply = await self._roundtrip(session, dict(msg))
                except _Lost:
                    self._raise_if_closed()
                    if retry:
                        await session.done.wait()
                        continue
                    raise ConnectionLost(
                        f"the connection dropped before the server answered {msg['op']!r}"
                    ) from None
                break
        if reply.get("ok") is not True:
            raise _server_error(reply)
        return reply

    async def _wait_session(self) -> _Session:
        while True:
            self._raise_if_closed()
            session = self._session
            if session is not None and not session.closed:
                return session
            await self._changed.wait()

    async def _roundtrip(self, session: _Session, msg: dict[str, Any],
                         sub: _SubState | None = None) -> dict[str, Any]:
        self._next_id += 1
        request_id = msg["id"] = self._next_id
        text = orjson.dumps(msg).decode()
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        session.pending[request_id] = _Pending(send, sub)
        try:
            try:
                await session.ws.send_text(text)
            except Closed:
                raise _Lost from None
            try:
                return await receive.receive()
            except trio.EndOfChannel:
                raise _Lost from None
        finally:
            session.pending.pop(request_id, None)

    async def _refresh(self, session: _Session) -> None:
        if self._token is None or isinstance(self._token, str):
            log.warning("the server asked for a fresh token but the token is a fixed string; "
                        "pass an async token provider to connect() to refresh it")
            return
        try:
            with trio.fail_after(self._request_timeout):
                token = await self._get_token()
                reply = await self._roundtrip(session, {"op": "refresh", "token": token})
        except (_Lost, trio.TooSlowError, ConnectError) as exc:
            log.warning("token refresh failed: %r", exc)
            return
        if reply.get("ok") is not True:
            log.warning("the server refused the refreshed token: %s", _server_error(reply))

    # --- subscriptions ---------------------------------------------------------------------

    def _start_subscribe(self, session: _Session, state: _SubState) -> None:
        """Send a subscribe for *state* on *session* (with ``since`` when its
        position is known); publications for it wait until the reply."""
        if state.closed or session.closed or state.pending is session:
            return
        msg: dict[str, Any] = {"op": "subscribe", "topic": state.topic}
        if state.offset is not None and state.epoch is not None:
            msg["since"] = {"epoch": state.epoch, "offset": state.offset}
        state.pending = session
        state.held = []
        session.nursery.start_soon(self._subscribe_task, session, state, msg)

    async def _subscribe_task(self, session: _Session, state: _SubState, msg: dict[str, Any]) -> None:
        # No timeout: the reply may wait behind a slow consumer's backpressure;
        # a dead connection is noticed by the reader and ends this task.
        try:
            reply = await self._roundtrip(session, msg, sub=state)
        except _Lost:
            return  # the next connection subscribes again
        if reply.get("ok") is not True:
            self._end_sub(state, _server_error(reply))

    def _end_sub(self, state: _SubState, exc: ClientError | None) -> None:
        if self._subs.get(state.topic) is state:
            del self._subs[state.topic]
        if not state.ready.is_set():
            state.error = exc or ClientClosed(1000, "closed by the client")
            state.ready.set()
        elif exc is not None:
            state.failure = exc
        state.pending = None
        state.held = []
        state.send.close()

    async def _unsubscribe(self, state: _SubState) -> None:
        was_active = self._subs.get(state.topic) is state
        state.closed = True
        self._end_sub(state, None)
        state.recv.close()
        session = self._session
        if was_active and session is not None and not session.closed:
            # Awaited (not spawned) so a later subscribe to the topic goes out after it.
            with trio.CancelScope(shield=True), trio.move_on_after(self._request_timeout):
                with contextlib.suppress(Closed):
                    msg = {"op": "unsubscribe", "topic": state.topic}
                    await session.ws.send_text(orjson.dumps(msg).decode())

    # --- the reader ------------------------------------------------------------------------

    async def _read_loop(self, session: _Session) -> Closed:
        ws = session.ws
        while True:
            try:
                text = await ws.receive()
            except Closed as closed:
                return closed
            try:
                msg = orjson.loads(text)
            except orjson.JSONDecodeError:
                log.warning("ignoring a message that is not JSON: %.200r", text)
                continue
            if not isinstance(msg, dict):
                continue
            if "ok" in msg:
                await self._on_reply(session, msg)
                continue
            op = msg.get("op")
            if op == "pub":
                await self._on_publication(session, msg)
            elif op == "refresh_required":
                session.nursery.start_soon(self._refresh, session)
            elif op in ("join", "leave"):
                await self._on_presence(msg)
            else:
                log.debug("ignoring %.200r", text)

    async def _on_reply(self, session: _Session, msg: dict[str, Any]) -> None:
        request_id = msg.get("id")
        if not isinstance(request_id, int):
            if msg.get("ok") is False:
                log.warning("error from the server: %s", _server_error(msg))
            return
        pending = session.pending.pop(request_id, None)
        if pending is None:
            return
        state = pending.sub
        if state is not None and state.pending is session:
            if msg.get("ok") is True:
                await self._apply_subscribe(session, state, msg)
            else:
                state.pending = None
                state.held = []
        pending.reply.send_nowait(msg)

    async def _on_publication(self, session: _Session, msg: dict[str, Any]) -> None:
        topic = msg.get("topic")
        state = self._subs.get(topic) if isinstance(topic, str) else None
        if state is None or state.closed:
            return
        if state.pending is not None:
            state.held.append(msg)
            return
        await self._deliver(session, state, msg, live=True)

    async def _on_presence(self, msg: dict[str, Any]) -> None:
        topic = msg.get("topic")
        state = self._subs.get(topic) if isinstance(topic, str) else None
        if state is None or state.closed or state.on_presence is None:
            return
        try:
            client = ClientInfo.from_json(msg.get("client"))
            state.on_presence(PresenceEvent(str(msg["op"]), state.topic, client))
        except Exception as exc:
            await self._put(state, exc)

    async def _deliver(self, session: _Session, state: _SubState, msg: dict[str, Any], live: bool) -> None:
        offset = msg.get("offset")
        if not isinstance(offset, int):
            return
        last = state.offset
        if last is not None and offset <= last:
            self._duplicates += 1
            return
        if last is not None and offset > last + 1:
            if live and state.epoch is not None:
                # Offsets jumped on a live connection (the server dropped some
                # for a slow consumer): ask for them from the server's history.
                self._start_subscribe(session, state)
                state.held.append(msg)
                return
            await self._gap(state, RecoveryGap(state.topic, state.epoch, last, state.epoch, offset - 1))
            state.offset = offset - 1
        if await self._put(state, (state.epoch, Publication(state.topic, offset, msg.get("data")))):
            state.offset = offset
            self._received += 1

    async def _apply_subscribe(self, session: _Session, state: _SubState, reply: dict[str, Any]) -> None:
        held, state.held = state.held, []
        state.pending = None
        if state.closed:
            return
        epoch = reply.get("epoch")
        epoch = epoch if isinstance(epoch, str) else None
        offset = _int(reply.get("offset"))
        last_epoch, last = state.epoch, state.offset
        if last is None:
            state.epoch, state.offset = epoch, offset
        state.start_position = state.start_position or StreamPosition(state.epoch, state.offset or 0)
        # Ready before anything is delivered: the consumer must be free to
        # drain the channel while the reader fills it.
        state.ready.set()
        if last is not None:
            await self._recover(session, state, reply, last_epoch, last, epoch, offset, held)
        for msg in held:
            if state.pending is None:
                await self._deliver(session, state, msg, live=True)
            else:
                state.held.append(msg)

    async def _recover(self, session: _Session, state: _SubState, reply: dict[str, Any],
                       last_epoch: str | None, last: int, epoch: str | None, offset: int,
                       held: list[dict[str, Any]]) -> None:
        if reply.get("recovered") is True:
            state.epoch = epoch if epoch is not None else last_epoch
            publications = reply.get("publications")
            for msg in publications if isinstance(publications, list) else ():
                if isinstance(msg, dict):
                    await self._deliver(session, state, msg, live=False)
            return
        if epoch == last_epoch and offset == last:
            # Nothing was published meanwhile (also how a server without
            # recovery support says "no gap").
            return
        new_offset = offset
        held_offsets = [m["offset"] for m in held if isinstance(m.get("offset"), int)]
        if held_offsets:
            new_offset = min(offset, min(held_offsets) - 1)
        await self._gap(state, RecoveryGap(state.topic, last_epoch, last, epoch, new_offset))
        state.epoch, state.offset = epoch, new_offset

    async def _gap(self, state: _SubState, gap: RecoveryGap) -> None:
        self._gaps += 1
        item: Exception = gap
        if state.on_gap is not None:
            try:
                if state.on_gap(gap):
                    log.info("%s (on_gap continues)", gap)
                    return
            except Exception as exc:
                exc.__context__ = gap
                item = exc
        log.warning("%s", gap)
        await self._put(state, item)

    async def _put(self, state: _SubState, item: _Item) -> bool:
        try:
            await state.send.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _server_error(reply: dict[str, Any]) -> ServerError:
    error = reply.get("error")
    if isinstance(error, dict):
        return ServerError(str(error.get("code", "unknown")), str(error.get("message", "")))
    return ServerError("unknown", f"unexpected reply {reply!r:.200}")


@contextlib.asynccontextmanager
async def connect(
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
) -> AsyncIterator[Client]:
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
    client = Client(
        url, token=token, on_gap=on_gap, reconnect=reconnect, backoff_initial=backoff_initial,
        backoff_max=backoff_max, request_timeout=request_timeout, connect_timeout=connect_timeout,
        buffer_size=buffer_size, max_message_size=max_message_size, ping_interval=ping_interval,
        ping_timeout=ping_timeout, headers=headers, ssl_context=ssl_context,
    )
    ws = await client._open()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run, ws)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background task does not raise (it records failures for the
        # caller's requests and iterators), so a lone exception here is the
        # caller's own: give it back unwrapped.
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            raise exc from exc.__cause__
        raise
