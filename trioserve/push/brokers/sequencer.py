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
=========================================  ======================================

A refusal is ``["err", id, message]``. On connecting, a worker first gets
``["hello", epoch, worker_id]``. Relays are ``["m", topic, offset]`` + the
publication's JSON.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson

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
        self.publications = 0

    # --- connections -------------------------------------------------------------------

    def connect(self, worker: int) -> None:
        """A worker's socket connected (a restarted worker replaces its old self)."""
        self.disconnect(worker)
        self._outboxes[worker] = bytearray(encode_frame(["hello", self.epoch, worker]))
        self._topics_of[worker] = set()
        self.ready.add(worker)

    def disconnect(self, worker: int) -> None:
        """A worker's socket closed: it joins nothing any more, and its outbox goes."""
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
