"""The push protocol handler: client commands mapped onto the hub.

It is the default handler for both transports; applications can replace it
with their own (see ``Server(ws_handler=..., tcp_handler=...)``). It sees a
connection as a :class:`Client` and the server as a :class:`PushContext`:
what it needs of each, and nothing of sockets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, cast

import orjson

from ..protocol.claims import AuthError, Claims
from ..protocol.codes import CloseCode, ErrorCode
from ..protocol.messages import (
    Command,
    ProtocolError,
    encode_error,
    encode_presence_event,
    encode_reply,
    parse_command,
    parse_publications,
)
from .backend import Backend, BackendRefused, BackendUnavailable, CallerInfo, ConnectRequest, proxied_claims
from .brokers import BrokerUnavailable
from .hub import Subscriber
from .service import HubContext, PublishRefused, publish, publish_many, result_fields

__all__ = ["MAX_RECOVERY_BYTES", "Client", "PushContext", "client_info", "leave_all", "member_changed",
           "push_handler"]


class Client(Subscriber, Protocol):
    """What the push protocol needs of a connection (a :class:`trioserve.Connection`)."""

    @property
    def id(self) -> int: ...

    @property
    def transport_name(self) -> str: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def claims(self) -> Claims | None: ...

    def set_claims(self, claims: Claims) -> None: ...

    def check_rate(self) -> bool: ...

    def send_encoded(self, payload: bytes) -> bool: ...

    async def receive(self) -> str | bytes: ...

    def receive_nowait(self) -> str | bytes | None: ...


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

    def identify(self, conn: Any) -> None:
        """*conn*'s claims changed (``connect``): index it by its user for the server API."""

    @property
    def backend(self) -> Backend | None:
        """The application's backend (the ``proxy_*_url`` settings), or None."""

    def unsubscribed(self, conn: Any, topic: str) -> None:
        """*conn* unsubscribed from *topic* (the ``on_unsubscribe`` hook, a webhook)."""

    def connected(self, conn: Any) -> None:
        """*conn*, which started without claims (TCP), has just got them with ``connect``."""


_T = TypeVar("_T")

#: Publications one recovering subscribe reply may carry, in bytes.
MAX_RECOVERY_BYTES = 1024 * 1024 - 4096


async def push_handler(conn: Client, server: PushContext) -> None:
    """Serve the push protocol on *conn* until it closes (ConnectionClosed)."""
    while True:
        # No locals survive into the wait for the next message: an idle
        # connection would otherwise keep its last command and reply alive
        # (an orjson result occupies ~4 KB whatever its length). And receive()
        # rather than ``async for``: one coroutine frame less per connection.
        await _handle(conn, server, await conn.receive())


async def _handle(conn: Client, server: PushContext, message: str | bytes | None) -> None:
    while message is not None:
        message = await _handle_one(conn, server, message)


async def _handle_one(conn: Client, server: PushContext, message: str | bytes) -> str | bytes | None:
    """Handle *message*; returns a message read ahead and not handled yet (after a run of publishes)."""
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
            return None
        if cmd.op == "publish" and not _publish_proxied(server):
            return await _publish_run(conn, server, cmd)
        reply = await _dispatch(conn, server, cmd)
    except ProtocolError as exc:
        reply = encode_error(exc.code, exc.message, exc.id)
    conn.send_encoded(reply)
    return None


#: Publishes one run hands to a pipelined broker at most.
MAX_PUBLISH_RUN = 1000


async def _publish_run(conn: Client, server: PushContext, first: Command) -> str | bytes | None:
    """*first* and the publishes already received behind it, published together.

    With a pipelined broker (the embedded one, Redis) a burst from one client
    is then in flight at once, and reaches the subscribers in one fan-out
    batch, as it does with the memory broker. Replies go out in the commands'
    order, framed together in one send: one ``send()`` per run instead of one
    per publication (a profile of the rooms burst found the publisher's
    replies at 15% of the server's time). Returns the message that ended the
    run, if it is not a publish.
    """
    replies: list[bytes | int] = []  # a ready reply, or an index into items
    items: list[tuple[str, Any]] = []
    ids: list[Any] = []
    leftover: str | bytes | None = None
    cmd: Command | None = first
    while True:
        if cmd is not None:
            try:
                _check_publish(conn, server, cmd)
                replies.append(len(items))
                items.append((cmd.topic, cmd.fields["data"]))
                ids.append(cmd.id)
            except ProtocolError as exc:
                replies.append(encode_error(exc.code, exc.message, exc.id))
        if len(replies) >= MAX_PUBLISH_RUN or (message := conn.receive_nowait()) is None:
            break
        try:
            cmd = parse_command(message, server.op_names)
        except ProtocolError:
            cmd = None
        if cmd is None or cmd.op != "publish":
            leftover = message  # handled after the run's replies, as it came after them
            break
        if not conn.check_rate():
            replies.append(encode_error(ErrorCode.RATE_LIMITED, _rate_message(server), cmd.id))
            # End the run at the first refusal: its replies must go out before
            # the close (4029) that the limiter starts for a client that keeps
            # going; the messages after this one are handled one at a time.
            break
    results = await publish_many(server.hub, items) if items else []
    out: list[bytes] = []
    for reply in replies:
        if isinstance(reply, int):
            result = results[reply]
            if isinstance(result, PublishRefused):
                reply = encode_error(result.code, result.message, ids[reply])
            else:
                reply = encode_reply(ids[reply], offset=result.offset, subscribers=result.subscribers)
        out.append(reply)
    conn.send_prepared(conn.framing.frame_batch(out), len(out))
    return leftover


def _publish_proxied(server: PushContext) -> bool:
    backend = server.backend
    return backend is not None and backend.publish_proxied


def _check_publish(conn: Client, server: PushContext, cmd: Command, topic: str | None = None) -> None:
    if _publish_proxied(server):
        return  # the backend decides, for every client (_dispatch, _publish_batch)
    claims = conn.claims
    assert claims is not None
    topic = cmd.topic if topic is None else topic
    allowed = server.config.client_publish if claims.anonymous else claims.may_publish(topic)
    if not allowed:
        raise _forbidden(cmd, "client publish is disabled on this server (--client-publish)"
                         if claims.anonymous else f"the token does not allow publishing to {topic}")


async def _publish_batch(conn: Client, server: PushContext, cmd: Command) -> bytes:
    """``{"op":"publish_batch","publications":[{topic, data}, ...]}``: one offset per
    publication, in order; the reply's ``results`` has one entry per publication.
    A topic the client may not publish to refuses the whole batch."""
    items = parse_publications(cmd.fields["publications"], cmd.id)
    backend = server.backend
    if backend is not None and backend.publish_proxied:
        # Each publication is the backend's to allow or rewrite, as a single
        # publish is; the first refusal refuses the whole batch, before any is published.
        caller = _caller(server, conn)
        items = [(topic, await _ask(cmd, backend.publish(caller, topic, data))) for topic, data in items]
    for topic, _ in items:
        _check_publish(conn, server, cmd, topic)
    results = await publish_many(server.hub, items)
    return encode_reply(cmd.id, results=[result_fields(r) for r in results])


def _rate_message(server: PushContext) -> str:
    cfg = server.config
    return (f"over {cfg.rate_limit:g} messages/s (bursts of {cfg.rate_burst}); slow down, "
            "or the server closes the connection (4029)")


def client_info(conn: Client, node: str = "") -> dict[str, Any]:
    """How *conn* appears in presence lists and join/leave events. *node* (the
    broker's, in a cluster) makes ``conn`` unique across it: ``c12@w2``."""
    sub = conn.claims.sub if conn.claims is not None else "anonymous"
    return {"client": sub, "conn": f"c{conn.id}@{node}" if node else f"c{conn.id}",
            "transport": conn.transport_name}


def _member(server: PushContext, conn: Client, topic: str, op: str) -> None:
    """*conn* has just joined (subscribed to) or left *topic*: tell the topic's
    subscribers here (with presence events) and, through a broker that shares
    presence, the other nodes. Called once per subscribe or unsubscribe."""
    events = server.config.presence_events_for(topic)
    broker = server.hub.broker
    if not broker.shares_presence:
        if events:
            server.hub.send_event(topic, encode_presence_event(op, topic, client_info(conn)),
                                  exclude=conn)
        return
    member = client_info(conn, broker.node)
    event = encode_presence_event(op, topic, member) if events else None
    if event is not None:
        server.hub.send_event(topic, event, exclude=conn)
    if op == "join":
        broker.member_joined(topic, member, event)
    else:
        broker.member_left(topic, member, event)


#: For the other handlers (SSE streams): *conn* joined or left *topic*.
member_changed = _member


def leave_all(server: PushContext, conn: Client, topics: frozenset[str]) -> None:
    """Tell each of *topics* (with presence events, or a broker that shares
    presence) that *conn* has left: it disconnected."""
    for topic in topics:
        _member(server, conn, topic, "leave")


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
        if hub.unsubscribe(conn, cmd.topic):
            _member(server, conn, cmd.topic, "leave")
            server.unsubscribed(conn, cmd.topic)
        return encode_reply(cmd.id, topic=cmd.topic)
    if op == "publish":
        # Only a proxied publish comes here (_handle_one takes the others as a run):
        # the backend decides, and may replace the data.
        backend = server.backend
        assert backend is not None and backend.publish_proxied
        data = await _ask(cmd, backend.publish(_caller(server, conn), cmd.topic, cmd.fields["data"]))
        try:
            result = await publish(hub, cmd.topic, data, wait=True)
        except PublishRefused as exc:
            raise ProtocolError(exc.code, exc.message, cmd.id) from None
        return encode_reply(cmd.id, offset=result.offset, subscribers=result.subscribers)
    if op == "publish_batch":
        return await _publish_batch(conn, server, cmd)
    if op == "presence":
        assert claims is not None
        if not claims.presence:
            raise _forbidden(cmd, "the token does not allow presence")
        # Every subscriber is a Client: connections subscribe through this handler
        # or through hub.subscribe(conn, ...) from a server's own handler.
        try:
            others = await hub.broker.members(cmd.topic) if hub.broker.shares_presence else None
        except BrokerUnavailable as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), cmd.id) from None
        node = hub.broker.node
        clients = [client_info(cast(Client, c), node) for c in hub.subscribers(cmd.topic)]
        if others:
            clients += others
        return encode_reply(cmd.id, topic=cmd.topic, clients=clients)
    if op in ("connect", "refresh"):
        if op == "connect" and "token" not in cmd.fields:
            return await _connect_proxy(conn, server, cmd)
        return _authenticate(conn, server, cmd)
    if op == "rpc":
        return await _rpc(conn, server, cmd)
    custom = server.ops.get(op)
    if custom is not None:
        return encode_reply(cmd.id, **(await custom(conn, cmd) or {}))
    # "ping": the only other op parse_command accepts.
    return encode_reply(cmd.id, op="pong")


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
    backend = server.backend
    if backend is not None and backend.subscribe_proxied:
        # Before the hook and the broker: a refused subscribe changes nothing.
        await _ask(cmd, backend.subscribe(_caller(server, conn), topic))
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
            # Again if a leave came in meanwhile (the last other subscriber went):
            # a subscriber must never be added to a topic this node does not receive.
            while True:
                await hub.broker.join(topic)
                if since is not None and since["epoch"] == hub.epoch_of(topic):
                    fetched = await hub.broker.fetch(topic, since["offset"])
                if hub.broker.joined(topic):
                    break
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
    if hub.subscribe(conn, topic):
        _member(server, conn, topic, "join")
    return encode_reply(cmd.id, topic=topic, **fields)


def _caller(server: PushContext, conn: Client) -> CallerInfo:
    claims = conn.claims
    # An anonymous connection is user "" to the backend, as in Centrifugo.
    user = "" if claims is None or claims.anonymous else claims.sub
    return CallerInfo(client_info(conn, server.hub.broker.node)["conn"], user, conn.transport_name)


async def _ask(cmd: Command, call: Awaitable[_T]) -> _T:
    """A subscribe or publish proxy call: a refusal is ``forbidden``, a failure ``unavailable``."""
    try:
        return await call
    except BackendRefused as exc:
        raise _forbidden(cmd, exc.message or "refused by the application") from None
    except BackendUnavailable as exc:
        raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), cmd.id) from None


async def _rpc(conn: Client, server: PushContext, cmd: Command) -> bytes:
    backend = server.backend
    if backend is None or not backend.rpc_proxied:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, "rpc needs proxy_rpc_url on the server", cmd.id)
    try:
        result = await backend.rpc(_caller(server, conn), cmd.fields["method"], cmd.fields.get("data"))
    except BackendRefused as exc:
        # The application's own error, with its own code: the client's to interpret.
        return encode_error(ErrorCode.RPC_ERROR, exc.message, cmd.id, status=exc.code)
    except BackendUnavailable as exc:
        raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), cmd.id) from None
    return encode_reply(cmd.id, result=result)


async def _connect_proxy(conn: Client, server: PushContext, cmd: Command) -> bytes:
    """``{"op": "connect"}`` without a token, on TCP: the connect proxy decides."""
    backend = server.backend
    if backend is None or not backend.connect_proxied:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'token' must be a non-empty string", cmd.id)
    if conn.claims is not None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "already connected", cmd.id)
    name = client_info(conn, server.hub.broker.node)["conn"]
    try:
        result = await backend.connect(ConnectRequest(name, conn.transport_name, conn.remote))
    except BackendRefused as exc:
        conn.start_close(CloseCode.FORBIDDEN, exc.message or "refused by the application")
        raise _forbidden(cmd, exc.message or "refused by the application") from None
    except BackendUnavailable as exc:
        raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), cmd.id) from None
    conn.set_claims(proxied_claims(server.config, result.user))
    server.connected(conn)
    fields: dict[str, Any] = {"client": result.user}
    if result.data is not None:
        fields["data"] = result.data
    return encode_reply(cmd.id, **fields)


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
    first = conn.claims is None
    conn.set_claims(claims)
    server.identify(conn)
    if first:
        server.connected(conn)
    return encode_reply(cmd.id, client=claims.sub)
