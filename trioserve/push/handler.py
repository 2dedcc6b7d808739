"""The push protocol handler: client commands mapped onto the hub.

It is the default handler for both transports; applications can replace it
with their own (see ``Server(ws_handler=..., tcp_handler=...)``). It sees a
connection as a :class:`Client` and the server as a :class:`PushContext`:
what it needs of each, and nothing of sockets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, cast

import orjson
import trio

from ..protocol.claims import AuthError, Claims
from ..protocol.codes import CloseCode, ErrorCode
from ..protocol.messages import (
    Command,
    ProtocolError,
    encode_error,
    encode_reply,
    parse_command,
)
from .brokers import BrokerUnavailable
from .hub import PublishResult, Subscriber
from .service import HubContext, PublishRefused, publish, publish_later

__all__ = ["MAX_RECOVERY_BYTES", "Client", "PushContext", "client_info", "leave_all", "push_handler"]


class Client(Subscriber, Protocol):
    """What the push protocol needs of a connection (a :class:`trioserve.Connection`)."""

    @property
    def id(self) -> int: ...

    @property
    def transport_name(self) -> str: ...

    @property
    def claims(self) -> Claims | None: ...

    def set_claims(self, claims: Claims) -> None: ...

    def check_rate(self) -> bool: ...

    def send_encoded(self, payload: bytes) -> bool: ...

    async def receive(self) -> str | bytes: ...


class TokenVerifier(Protocol):
    def verify(self, token: str, now: float | None = None) -> Claims: ...


class PushContext(HubContext, Protocol):
    """What the push protocol needs of the server (a :class:`trioserve.Server`)."""

    @property
    def authenticator(self) -> TokenVerifier | None: ...

    @property
    def ops(self) -> Mapping[str, Callable[[Any, Command], Awaitable[dict[str, Any] | None]]]: ...

    @property
    def op_names(self) -> frozenset[str]: ...

    @property
    def on_subscribe(self) -> Callable[[Any, str], None] | None: ...

#: Publications one recovering subscribe reply may carry, in bytes.
MAX_RECOVERY_BYTES = 1024 * 1024 - 4096
#: A connection's publications queued with a pipelined broker and not yet
#: answered, at most; past it the handler waits for their answers.
MAX_AHEAD = 1024


class _Ahead:
    """A connection's publications queued with a pipelined broker (Redis) ahead
    of their answers. Their replies are sent as the broker answers, in order;
    any other reply waits until they are all out, so replies keep the order of
    the commands."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._idle: trio.Event | None = None

    def answered(self) -> None:
        self.count -= 1
        if not self.count and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait(self) -> None:
        """Until every queued publication has been answered (no checkpoint if none waits)."""
        while self.count:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()


async def push_handler(conn: Client, server: PushContext) -> None:
    """Serve the push protocol on *conn* until it closes (ConnectionClosed)."""
    ahead: _Ahead | None = None
    while True:
        if ahead is not None and not ahead.count:
            ahead = None
        # No other locals survive into the wait for the next message: an idle
        # connection would otherwise keep its last command and reply alive
        # (an orjson result occupies ~4 KB whatever its length). And receive()
        # rather than ``async for``: one coroutine frame less per connection.
        ahead = await _handle(conn, server, await conn.receive(), ahead)


async def _handle(conn: Client, server: PushContext, message: str | bytes,
                  ahead: _Ahead | None) -> _Ahead | None:
    # Counted before parsing, so malformed messages count too.
    allowed = conn.check_rate()
    try:
        cmd = parse_command(message, server.op_names)
        if not allowed:
            raise ProtocolError(ErrorCode.RATE_LIMITED, _rate_message(server), cmd.id)
        if conn.claims is None and cmd.op != "connect":
            # Only TCP connections start without claims, when a token is required.
            conn.start_close(CloseCode.UNAUTHORIZED,
                             'unauthorized: send {"op":"connect","token":...} first')
            return ahead
        if cmd.op == "publish" and server.hub.broker.pipelined:
            queued = _publish_ahead(conn, server, cmd, ahead)
            if queued is not None:
                return queued
        if ahead is not None:
            await ahead.wait()
        reply = await _dispatch(conn, server, cmd)
    except ProtocolError as exc:
        if ahead is not None:
            await ahead.wait()
        reply = encode_error(exc.code, exc.message, exc.id)
    conn.send_encoded(reply)
    return ahead


def _publish_ahead(conn: Client, server: PushContext, cmd: Command, ahead: _Ahead | None) -> _Ahead | None:
    """Queue a publish with a pipelined broker without waiting for its answer,
    so a burst of publishes read in one chunk reaches the broker together; the
    reply goes out when the broker answers. None if it was not queued (not a
    pipelined broker, its queue is full, or MAX_AHEAD): publish as usual."""
    _check_may_publish(conn, server, cmd)
    if ahead is None:
        ahead = _Ahead()
    elif ahead.count >= MAX_AHEAD:
        return None
    cmd_id = cmd.id
    line = ahead

    def reply(result: PublishResult | PublishRefused) -> None:
        line.answered()
        if isinstance(result, PublishRefused):
            conn.send_encoded(encode_error(result.code, result.message, cmd_id))
        else:
            conn.send_encoded(encode_reply(cmd_id, offset=result.offset, subscribers=result.subscribers))

    try:
        if not publish_later(server.hub, cmd.topic, cmd.fields["data"], reply):
            return None
    except PublishRefused as exc:
        raise ProtocolError(exc.code, exc.message, cmd.id) from None
    ahead.count += 1
    return ahead


def _rate_message(server: PushContext) -> str:
    cfg = server.config
    return (f"over {cfg.rate_limit:g} messages/s (bursts of {cfg.rate_burst}); slow down, "
            "or the server closes the connection (4029)")


def client_info(conn: Client) -> dict[str, Any]:
    """How *conn* appears in presence lists and join/leave events."""
    sub = conn.claims.sub if conn.claims is not None else "anonymous"
    return {"client": sub, "conn": f"c{conn.id}", "transport": conn.transport_name}


def _presence_event(op: str, topic: str, conn: Client) -> bytes:
    return orjson.dumps({"op": op, "topic": topic, "client": client_info(conn)})


def leave_all(server: PushContext, conn: Client, topics: frozenset[str]) -> None:
    """Tell the rest of each topic with presence events that *conn* has left."""
    for topic in topics:
        if server.config.presence_events_for(topic):
            server.hub.send_event(topic, _presence_event("leave", topic, conn), exclude=conn)


def _forbidden(cmd: Command, what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, what, cmd.id)


async def _dispatch(conn: Client, server: PushContext, cmd: Command) -> bytes:
    hub = server.hub
    op = cmd.op
    claims = conn.claims
    assert claims is not None or op == "connect"
    if op == "subscribe":
        assert claims is not None
        return await _subscribe(conn, server, cmd, claims)
    if op == "unsubscribe":
        if hub.unsubscribe(conn, cmd.topic) and server.config.presence_events_for(cmd.topic):
            hub.send_event(cmd.topic, _presence_event("leave", cmd.topic, conn))
        return encode_reply(cmd.id, topic=cmd.topic)
    if op == "publish":
        _check_may_publish(conn, server, cmd)
        try:
            result = await publish(hub, cmd.topic, cmd.fields["data"], wait=True)
        except PublishRefused as exc:
            raise ProtocolError(exc.code, exc.message, cmd.id) from None
        return encode_reply(cmd.id, offset=result.offset, subscribers=result.subscribers)
    if op == "presence":
        assert claims is not None
        if not claims.presence:
            raise _forbidden(cmd, "the token does not allow presence")
        # Every subscriber is a Client: connections subscribe through this handler
        # or through hub.subscribe(conn, ...) from a server's own handler.
        clients = [client_info(cast(Client, c)) for c in hub.subscribers(cmd.topic)]
        return encode_reply(cmd.id, topic=cmd.topic, clients=clients)
    if op in ("connect", "refresh"):
        return _authenticate(conn, server, cmd)
    custom = server.ops.get(op)
    if custom is not None:
        return encode_reply(cmd.id, **(await custom(conn, cmd) or {}))
    # "ping": the only other op parse_command accepts.
    return encode_reply(cmd.id, op="pong")


def _check_may_publish(conn: Client, server: PushContext, cmd: Command) -> None:
    claims = conn.claims
    assert claims is not None
    allowed = server.config.client_publish if claims.anonymous else claims.may_publish(cmd.topic)
    if not allowed:
        raise _forbidden(cmd, "client publish is disabled on this server (--client-publish)"
                         if claims.anonymous else f"the token does not allow publishing to {cmd.topic}")


async def _subscribe(conn: Client, server: PushContext, cmd: Command, claims: Claims) -> bytes:
    hub = server.hub
    topic = cmd.topic
    if not claims.may_subscribe(topic):
        raise _forbidden(cmd, f"the token does not allow subscribing to {topic}")
    limit = server.config.max_subscriptions
    if limit and hub.topic_count(conn) >= limit and not hub.is_subscribed(conn, topic):
        raise ProtocolError(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                            f"at most {limit} subscriptions per connection (max_subscriptions); "
                            "unsubscribe from one first", cmd.id)
    if server.on_subscribe is not None:
        try:
            server.on_subscribe(conn, topic)
        except ProtocolError as exc:
            exc.id = cmd.id
            raise
    since = cmd.fields.get("since")
    fetched = None
    if not hub.broker.synchronous:
        # A network broker: make sure this node receives the topic, and fetch
        # the part of the gap older than this node's own history. Only then
        # the synchronous part below.
        try:
            await hub.broker.join(topic)
            if since is not None and since["epoch"] == hub.epoch_of(topic):
                fetched = await hub.broker.fetch(topic, since["offset"])
        except BrokerUnavailable as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), cmd.id) from None
    # Recovery, subscribing and the reply happen with no checkpoint in between,
    # so no publication is both recovered and delivered live, or neither.
    if since is None:
        fields: dict[str, Any] = {"epoch": hub.epoch_of(topic), "offset": hub.position(topic)}
    else:
        recovery = hub.recover(topic, since["epoch"], since["offset"], fetched=fetched)
        recovered = recovery.recovered
        if sum(len(p) for p in recovery.publications) > MAX_RECOVERY_BYTES:
            # Too big for one reply to pass common clients' 1 MiB message limit:
            # report a gap; the client can page GET /api/history instead.
            recovered = False
        fields = {
            "epoch": recovery.epoch,
            "offset": recovery.offset,
            "recovered": recovered,
            "publications": [orjson.Fragment(p) for p in recovery.publications] if recovered else [],
        }
    if hub.subscribe(conn, topic) and server.config.presence_events_for(topic):
        hub.send_event(topic, _presence_event("join", topic, conn), exclude=conn)
    return encode_reply(cmd.id, topic=topic, **fields)


def _authenticate(conn: Client, server: PushContext, cmd: Command) -> bytes:
    authenticator = server.authenticator
    if authenticator is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "this server does not use tokens", cmd.id)
    try:
        claims = authenticator.verify(cmd.fields["token"])
    except AuthError as exc:
        server.count_auth_failure()
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"{exc.code}: {exc.message}", cmd.id) from None
    if cmd.op == "refresh" and conn.claims is not None and claims.sub != conn.claims.sub:
        raise ProtocolError(ErrorCode.UNAUTHORIZED,
                            f"the new token is for {claims.sub!r}, not {conn.claims.sub!r}", cmd.id)
    conn.set_claims(claims)
    return encode_reply(cmd.id, client=claims.sub)
