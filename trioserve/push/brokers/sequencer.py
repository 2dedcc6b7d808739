"""The embedded broker's sequencer: one offset sequence, history and epoch for all workers.

``trioserve serve --workers N`` without ``--broker`` runs this in the
supervisor (the socket part is :mod:`.relay`). Workers send requests over
their own Unix socket (:mod:`.inhost` is their side), and the sequencer:

- **assigns offsets**: one counter per topic, so every worker sees the same,
  gapless order; one epoch for the sequencer's life (a new supervisor is a
  new history, and its clients learn that their gap is unknown);
- **encodes each publication once**: the worker sends the data's JSON, the
  sequencer wraps it (``{"op":"pub",...}``) and relays those bytes, which the
  workers' hubs fan out as they are;
- **keeps the history ring** by the config's ``history_for`` (size, ttl,
  rules), and answers ``fetch`` and ``head`` for any worker, joined or not;
- **keeps presence**: each topic's members per worker (``mjoin``/``mleave``,
  one frame per subscribe or unsubscribe, never per publication), answers
  ``members`` with the other workers' members, relays a join/leave event to the
  other workers that joined the topic, and drops a worker's members when its
  socket closes (a leave event for each on topics with presence events);
- **relays** a publication only to the workers that joined its topic, into
  each worker's outbox. The socket part sends an outbox whole: one write
  carries everything waiting, and a worker reading it hands its hub the whole
  run, so one fan-out batch carries many publications.

Everything here is synchronous and does no I/O: requests in, bytes out.

Requests (``[kind, id, ...]`` headers; see :mod:`.wire` for the framing):

=========================================  ======================================
worker → sequencer                         sequencer → worker
=========================================  ======================================
``["pub", id, topic]`` + data JSON         ``["ok", id, offset]``
``["join", id, topic]``                    ``["ok", id, position]``, then relays
``["leave", topic]``                       (nothing)
``["head", id, topic]``                    ``["ok", id, position]``
``["fetch", id, topic, after, limit]``     ``["ok", id, upto, [len, ...]]`` + payloads
``["sync", id]``                           ``["ok", id, 0]`` after every earlier relay
``["mjoin", topic, member]`` + event       (nothing; the event, if any, is relayed)
``["mleave", topic, conn]`` + event        (nothing; the event, if any, is relayed)
``["members", id, topic]``                 ``["ok", id, count]`` + the other workers'
                                           members, a JSON array
``["ctl", id]`` + a control message        ``["ok", id, count]``: relayed as ``["ctl"]``
                                           to *count* other connected workers
=========================================  ======================================

A refusal is ``["err", id, message]``. On connecting, a worker first gets
``["hello", epoch, worker_id]``. Relays are ``["m", topic, offset]`` + the
publication's JSON; relayed presence events are ``["ev", topic]`` + the
event's JSON, for the worker's hub to send to the topic's subscribers as it is.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson

from ...protocol.messages import encode_presence_event
from ..history import History, Policy
from .wire import encode_frame

__all__ = ["MAX_FETCH_BYTES", "MAX_OUTBOX", "Sequencer", "publication"]

#: Bytes of publications one fetch reply carries at most; the run stops short of it
#: (recovery then reports the rest as a gap, as with a short history).
MAX_FETCH_BYTES = 8 * 1024 * 1024
#: A worker this many bytes behind on its relays makes publishing refuse (503)
#: until it catches up: backpressure, as a full hub inbox gives.
MAX_OUTBOX = 64 * 1024 * 1024


def publication(topic: str, offset: int, data_json: bytes) -> bytes:
    """The publication's JSON, as ``protocol.messages.encode_publication`` makes it."""
    return b"".join((b'{"op":"pub","topic":', orjson.dumps(topic), b',"offset":',
                     str(offset).encode(), b',"data":', data_json, b"}"))


class Sequencer:
    """Offsets, history and relays for the workers of one supervisor.

    ``connect(worker)`` when a worker's socket connects, ``handle(worker, header,
    payload)`` for each frame it sends, ``take(worker)`` for the bytes to write
    to it, ``disconnect(worker)`` when its socket closes. :attr:`ready` holds the
    workers whose outbox has bytes waiting.
    """

    def __init__(self, policy: Policy, *, epoch: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 max_fetch_bytes: int = MAX_FETCH_BYTES, max_outbox: int = MAX_OUTBOX):
        self.epoch = epoch or secrets.token_hex(8)
        self.history = History(policy)
        self.clock = clock
        self.max_fetch_bytes = max_fetch_bytes
        self.max_outbox = max_outbox
        #: Refusing publications (the server drains): see :meth:`close`.
        self.closed = False
        #: Workers with bytes waiting in their outbox.
        self.ready: set[int] = set()
        self._outboxes: dict[int, bytearray] = {}
        self._joined: dict[str, set[int]] = {}
        self._topics_of: dict[int, set[str]] = {}
        # Presence: topic -> worker -> conn id -> (member, whether its topic has events).
        self._members: dict[str, dict[int, dict[str, tuple[dict[str, Any], bool]]]] = {}
        self._member_topics: dict[int, set[str]] = {}
        self.publications = 0

    # --- connections -------------------------------------------------------------------

    def connect(self, worker: int) -> None:
        """A worker's socket connected (a restarted worker replaces its old self)."""
        self.disconnect(worker)
        self._outboxes[worker] = bytearray(encode_frame(["hello", self.epoch, worker]))
        self._topics_of[worker] = set()
        self.ready.add(worker)

    def disconnect(self, worker: int) -> None:
        """A worker's socket closed: it joins nothing any more, its members leave
        (with a leave event to the other workers where the topic has events), and
        its outbox goes."""
        for topic in self._member_topics.pop(worker, ()):
            gone = self._members[topic].pop(worker, {})
            if not self._members[topic]:
                del self._members[topic]
            for member, events in gone.values():
                if events:
                    self._relay_event(worker, topic, encode_presence_event("leave", topic, member))
        for topic in self._topics_of.pop(worker, ()):
            self._leave(worker, topic)
        self._outboxes.pop(worker, None)
        self.ready.discard(worker)

    def connected(self) -> list[int]:
        return sorted(self._outboxes)

    def take(self, worker: int) -> bytearray:
        """Everything waiting for *worker*, emptying its outbox."""
        self.ready.discard(worker)
        out = self._outboxes.get(worker)
        if not out:
            return bytearray()
        self._outboxes[worker] = bytearray()
        return out

    def backlog(self, worker: int) -> int:
        return len(self._outboxes.get(worker, b""))

    def close(self) -> None:
        """Refuse publications from now on (the whole server drains). Everything
        already accepted still reaches the joined workers before their ``sync``
        reply, so each worker's drain delivers it before its 1001."""
        self.closed = True

    # --- requests ------------------------------------------------------------------------

    def handle(self, worker: int, header: list[Any], payload: bytes) -> None:
        """One request from *worker*; its answers and relays go to the outboxes."""
        kind = header[0]
        try:
            if kind == "pub":
                self._publish(worker, header[1], header[2], payload)
            elif kind == "join":
                self._join(worker, header[1], header[2])
            elif kind == "leave":
                self._leave(worker, header[1])
                self._topics_of.get(worker, set()).discard(header[1])
            elif kind == "head":
                self._reply(worker, ["ok", header[1], self.history.position(_topic(header[2]))])
            elif kind == "fetch":
                self._fetch(worker, header[1], _topic(header[2]), header[3], header[4])
            elif kind == "sync":
                self._reply(worker, ["ok", header[1], 0])
            elif kind == "mjoin":
                self._member_joined(worker, _topic(header[1]), header[2], payload)
            elif kind == "mleave":
                self._member_left(worker, _topic(header[1]), header[2], payload)
            elif kind == "ctl":
                self._reply(worker, ["ok", header[1], self._relay_control(worker, payload)])
            elif kind == "members":
                members = self.members(_topic(header[2]), exclude=worker)
                self._reply(worker, ["ok", header[1], len(members)], orjson.dumps(members))
            else:
                raise ValueError(f"unknown request {kind!r}")
        except (IndexError, TypeError, ValueError) as exc:
            # A worker is this same program: a bad request is a bug, said once, and answered.
            request_id = header[1] if len(header) > 1 and isinstance(header[1], int) else None
            self._reply(worker, ["err", request_id, f"bad request {header!r:.200}: {exc}"])

    def _publish(self, worker: int, request_id: int, topic: str, data_json: bytes) -> None:
        topic = _topic(topic)
        if self.closed:
            self._reply(worker, ["err", request_id, "the server is draining"])
            return
        joined = self._joined.get(topic, ())
        behind = [w for w in joined if len(self._outboxes[w]) > self.max_outbox]
        if behind:
            self._reply(worker, ["err", request_id, f"overloaded: worker {behind[0]} is "
                                 f"{len(self._outboxes[behind[0]]) >> 20} MiB behind"])
            return
        offset = self.history.position(topic) + 1
        payload = publication(topic, offset, data_json)
        self.history.append(topic, offset, payload, self.clock())
        self.publications += 1
        if joined:
            relay = encode_frame(["m", topic, offset], payload)
            for w in joined:
                self._outboxes[w] += relay
                self.ready.add(w)
        self._reply(worker, ["ok", request_id, offset])

    def _join(self, worker: int, request_id: int, topic: str) -> None:
        topic = _topic(topic)
        self._joined.setdefault(topic, set()).add(worker)
        self._topics_of.setdefault(worker, set()).add(topic)
        # Every relay of this topic after this reply follows the position it names.
        self._reply(worker, ["ok", request_id, self.history.position(topic)])

    def _leave(self, worker: int, topic: str) -> None:
        workers = self._joined.get(topic)
        if workers is not None:
            workers.discard(worker)
            if not workers:
                del self._joined[topic]

    def _fetch(self, worker: int, request_id: int, topic: str, after: int, limit: int | None) -> None:
        if not isinstance(after, int) or (limit is not None and not isinstance(limit, int)):
            raise TypeError("after and limit must be integers")
        entries, upto = self.fetch(topic, after, limit)
        self._reply(worker, ["ok", request_id, upto, [len(p) for _, p in entries]],
                    b"".join(p for _, p in entries))

    def fetch(self, topic: str, after: int, limit: int | None = None
              ) -> tuple[list[tuple[int, bytes]], int]:
        """The unbroken run of *topic*'s held publications after *after* (at most
        *limit*, and at most ``max_fetch_bytes``), and the offset it reaches."""
        position = self.history.position(topic)
        if after >= position or after < 0:
            return [], after
        held, complete = self.history.after(topic, after, self.clock(), position - after)
        if not complete or not held:
            return [], after
        run: list[tuple[int, bytes]] = []
        size = 0
        for i, payload in enumerate(held[:limit] if limit is not None else held):
            size += len(payload)
            if size > self.max_fetch_bytes and run:
                break
            run.append((after + 1 + i, payload))
        return run, after + len(run)

    # --- presence ----------------------------------------------------------------------

    def _member_joined(self, worker: int, topic: str, member: Any, event: bytes) -> None:
        if not isinstance(member, dict) or not isinstance(member.get("conn"), str):
            raise TypeError(f"a member is an object with a conn, got {member!r:.100}")
        if worker not in self._outboxes:
            return  # gone meanwhile
        self._members.setdefault(topic, {}).setdefault(worker, {})[member["conn"]] = (member, bool(event))
        self._member_topics.setdefault(worker, set()).add(topic)
        self._relay_event(worker, topic, event)

    def _member_left(self, worker: int, topic: str, conn: Any, event: bytes) -> None:
        if not isinstance(conn, str):
            raise TypeError(f"a member's conn is a string, got {conn!r:.100}")
        by_worker = self._members.get(topic)
        held = by_worker.get(worker) if by_worker is not None else None
        if by_worker is None or held is None or held.pop(conn, None) is None:
            return  # not a member: nobody heard it join
        if not held:
            del by_worker[worker]
            self._member_topics[worker].discard(topic)
            if not by_worker:
                del self._members[topic]
        self._relay_event(worker, topic, event)

    def _relay_event(self, source: int, topic: str, event: bytes) -> None:
        """*event* to every other worker that joined *topic*; its hub sends it on."""
        if not event:
            return
        frame = None
        for w in self._joined.get(topic, ()):
            if w != source:
                frame = frame or encode_frame(["ev", topic], event)
                self._outboxes[w] += frame
                self.ready.add(w)

    def _relay_control(self, source: int, message: bytes) -> int:
        """A control message (the server API) to every other connected worker."""
        frame = encode_frame(["ctl"], message)
        count = 0
        for w, out in self._outboxes.items():
            if w != source:
                out += frame
                self.ready.add(w)
                count += 1
        return count

    def members(self, topic: str, exclude: int | None = None) -> list[dict[str, Any]]:
        """*topic*'s members on every worker but *exclude*, by worker."""
        return [member for worker, held in sorted(self._members.get(topic, {}).items())
                if worker != exclude for member, _ in held.values()]

    def joined(self, topic: str) -> frozenset[int]:
        return frozenset(self._joined.get(topic, ()))

    def _reply(self, worker: int, header: list[Any], payload: bytes = b"") -> None:
        out = self._outboxes.get(worker)
        if out is None:
            return  # gone meanwhile
        out += encode_frame(header, payload)
        self.ready.add(worker)


def _topic(topic: Any) -> str:
    if not isinstance(topic, str) or not topic:
        raise TypeError(f"a topic is a non-empty string, got {topic!r:.100}")
    return topic
