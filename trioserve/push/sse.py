"""Server-Sent Events: ``GET /sse?topic=a&topic=b``, topics and the resume cursor.

A stream subscribes to its topics once, at its start, and then only receives.
Each event's ``id:`` is a cursor over *all* of the stream's topics
(:mod:`trioserve.protocol.sse`), so a reconnect with ``Last-Event-ID`` (which
EventSource sends by itself) or ``?since=`` resumes every topic: recovery and
subscribing run with no checkpoint in between, as for a WebSocket ``since``,
and the stream sees every publication exactly once, or a ``gap`` event.

The hub frames a batch once for all streams with the last event left open;
each stream's :class:`StreamCursor` adds the ``id:`` line, which is the only
per-stream work of a delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import orjson

from ..net.httpd import Request
from ..net.sse import Resumable
from ..protocol import sse
from ..protocol.claims import Claims
from ..protocol.codes import ErrorCode
from ..protocol.messages import ProtocolError, validate_topic
from .brokers import BrokerUnavailable
from .handler import Client, PushContext, member_changed
from .hub import PositionedSubscriber

__all__ = ["SSE_PATH", "Stream", "StreamCursor", "sse_handler"]

SSE_PATH = "/sse"


class Stream(Client, PositionedSubscriber, Protocol):
    """What the SSE handler needs of a stream (a :class:`trioserve.net.sse.SseConnection`)."""

    cursor: Resumable | None

    @property
    def closed(self) -> bool: ...

    def take_request(self) -> Request: ...

    def accept(self, first: bytes = b"") -> bool: ...

    def refuse(self, status: int, code: str, message: str) -> None: ...


class StreamCursor:
    """One stream's position in each of its topics: the ``id:`` of its events."""

    __slots__ = ("_offsets", "_tags", "_topics")

    def __init__(self, topics: tuple[str, ...], tags: list[bytes], offsets: list[int]):
        self._topics = topics
        #: Per topic, its entry tag (topic and epoch) in the cursor.
        self._tags = tags
        self._offsets = offsets

    def set(self, topic: str, tag: bytes, offset: int) -> None:
        i = self._topics.index(topic)
        self._tags[i] = tag
        self._offsets[i] = offset

    def cursor(self) -> bytes:
        return sse.encode_cursor(self._tags, self._offsets)

    def id_line(self, key: str, offset: int) -> bytes:
        """Called by the connection for every batch it is sent: per stream, per batch."""
        offsets = self._offsets
        offsets[0 if len(offsets) == 1 else self._topics.index(key)] = offset
        return b"id: " + sse.encode_cursor(self._tags, offsets) + b"\n\n"


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


async def sse_handler(conn: Stream, server: PushContext) -> None:
    """Open the stream on *conn*, then hold it until it closes (ConnectionClosed)."""
    try:
        await _open(conn, server)
    except _Refused as exc:
        conn.refuse(exc.status, exc.code, exc.message)
        return
    while True:
        await conn.receive()


def _topics(req: Request, server: PushContext, claims: Claims) -> tuple[str, ...]:
    given = req.query.get("topic", [])
    if not given:
        raise _Refused(400, ErrorCode.BAD_REQUEST, "name the topics to stream: /sse?topic=news&topic=chat")
    topics = tuple(dict.fromkeys(given))
    try:
        for topic in topics:
            validate_topic(topic)
    except ProtocolError as exc:
        raise _Refused(400, exc.code, exc.message) from None
    limit = server.config.max_subscriptions
    if limit and len(topics) > limit:
        raise _Refused(400, ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                       f"at most {limit} topics per stream (max_subscriptions)")
    for topic in topics:
        if not claims.may_subscribe(topic):
            raise _Refused(403, ErrorCode.FORBIDDEN, f"the token does not allow subscribing to {topic}")
    return topics


def _entries(req: Request) -> dict[bytes, tuple[bytes, int]]:
    """Where each topic resumes: topic tag -> (entry tag, offset).

    ``Last-Event-ID`` alone when present: EventSource sends the newest id
    there, while its URL still holds what the stream was first opened with.
    Else the ``since`` cursor, and over it ``since.<topic>=<epoch>:<offset>``,
    the plain form for a client that kept its own positions (after a WebSocket).
    """
    header = req.header(b"last-event-id")
    raw = header.decode("latin-1").strip() if header else None
    if not raw and req.query.get("since"):
        raw = req.query["since"][0]
    try:
        entries = sse.decode_cursor(raw) if raw else {}
    except sse.CursorError as exc:
        raise _Refused(400, ErrorCode.BAD_REQUEST, f"bad Last-Event-ID or since: {exc}") from None
    if header:
        return entries
    for key, values in req.query.items():
        if key.startswith("since."):
            topic = key[6:]
            epoch, _, offset = values[0].rpartition(":")
            if not epoch or not offset.isdigit() or len(offset) > 19:
                raise _Refused(400, ErrorCode.BAD_REQUEST,
                               f"{key} must be <epoch>:<offset>, as a subscribe reply gives them")
            entries[sse.tag(topic)] = (sse.entry_tag(topic, epoch), int(offset))
    return entries


async def _open(conn: Stream, server: PushContext) -> None:
    req = conn.take_request()
    claims = conn.claims
    assert claims is not None  # the server authenticates before the handler runs
    topics = _topics(req, server, claims)
    entries = _entries(req)
    on_subscribe: Callable[[Any, str], None] | None = server.on_subscribe
    if on_subscribe is not None:
        try:
            for topic in topics:
                on_subscribe(conn, topic)
        except ProtocolError as exc:
            raise _Refused(403, exc.code, exc.message) from None
    hub = server.hub
    fetched: dict[str, tuple[list[tuple[int, bytes]], int]] = {}
    if not hub.broker.synchronous:
        # As the push handler's subscribe: this node must receive every topic,
        # and the part of a gap older than its own history is fetched first.
        try:
            while True:
                for topic in topics:
                    await hub.broker.join(topic)
                    entry = entries.get(sse.tag(topic))
                    if entry is not None and entry[0] == sse.entry_tag(topic, hub.epoch_of(topic)):
                        fetched[topic] = await hub.broker.fetch(topic, entry[1])
                if all(hub.broker.joined(topic) for topic in topics):
                    break
        except BrokerUnavailable as exc:
            raise _Refused(503, ErrorCode.UNAVAILABLE, str(exc)) from None
    if conn.closed or conn.claims is None:
        return
    # From here to accept(): no checkpoint, so nothing is both recovered and
    # delivered live, or neither.
    tags: list[bytes] = []
    offsets: list[int] = []
    for topic in topics:
        entry = entries.get(sse.tag(topic))
        if entry is None:  # a topic new to this stream: live from here on
            tags.append(sse.entry_tag(topic, hub.epoch_of(topic)))
            offsets.append(hub.position(topic))
        else:  # until its turn below, the topic stays where the cursor had it
            tags.append(entry[0])
            offsets.append(entry[1])
    cursor = StreamCursor(topics, tags, offsets)
    out: list[bytes] = []
    summary = []
    for topic in topics:
        epoch = hub.epoch_of(topic)
        current = sse.entry_tag(topic, epoch)
        entry = entries.get(sse.tag(topic))
        info: dict[str, Any] = {"topic": topic, "epoch": epoch}
        if entry is None:
            info["offset"] = hub.position(topic)
        else:
            recovery = hub.recover(topic, epoch if entry[0] == current else "", entry[1],
                                   fetched=fetched.get(topic))
            cursor.set(topic, current, recovery.offset)
            info["offset"] = recovery.offset
            info["recovered"] = recovery.recovered
            if not recovery.recovered:
                gap = orjson.dumps({"topic": topic, "epoch": epoch, "offset": recovery.offset})
                out.append(sse.event("gap", gap, cursor.cursor()))
            elif recovery.publications:
                out.append(sse.frame_open(recovery.publications) + sse.id_line(cursor.cursor()))
        summary.append(info)
    out.append(sse.event("subscribed", orjson.dumps({"topics": summary}), cursor.cursor()))
    conn.cursor = cursor
    for topic in topics:
        if hub.subscribe(conn, topic):
            member_changed(server, conn, topic, "join")
    conn.accept(b"".join(out))
