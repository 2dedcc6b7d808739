"""The server API across the cluster: one question to every node, and their answers.

``POST /api/disconnect`` must close a user's connections on every node (or
worker), ``GET /api/info`` must list every node, the status page must see all
of them. :meth:`Cluster.ask` does the action here, sends it through the broker's
control seam (:meth:`Broker.broadcast`: a Redis pub/sub channel, or the
embedded broker's supervisor, which relays it to the other workers), and waits
for one answer per node it reached. The broker says how many that is, so the
wait ends as soon as the last answers, or after :data:`ANSWER_TIMEOUT` (a node
that died meanwhile is then reported ``missing``). The memory broker reaches
no one: the answer is this process's own, at once.

Messages are JSON: a question ``{"q": id, "kind": ..., "args": {...}}``, an answer
``{"a": id, "data": {...}}``, broadcast too (a node keeps the answers to its own
questions only; ids are random). Answers are computed synchronously when the
question arrives and sent by one task (:meth:`Cluster.run`), so the broker's
reader never waits. Nothing here runs per delivery or per connection.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import orjson
import trio

from .._version import __version__
from ..config import Config
from ..net.connection import Connection, ConnectionState
from ..push.brokers import BrokerUnavailable
from ..push.handler import Client, PushContext, leave_all
from ..push.hub import Hub
from ..push.users import UserIndex
from .stats import ServerStatistics

__all__ = ["ANSWER_TIMEOUT", "MAX_TOPICS", "Cluster", "ClusterNode", "Disconnect", "UNSUBSCRIBED_OP",
           "node_stats"]

log = logging.getLogger("trioserve.server")

#: Seconds to wait for the other nodes' answers.
ANSWER_TIMEOUT = 2.0
#: Topics one node reports at most (those with the most subscribers).
MAX_TOPICS = 10_000
#: The notice a client gets when the server API unsubscribed it.
UNSUBSCRIBED_OP = "unsubscribed"
#: Recent disconnects each node keeps for the status page.
RECENT_DISCONNECTS = 50


#: (Unix time, close code, reason, transport) of one closed connection.
Disconnect = tuple[float, int, str, str]


class ClusterNode(PushContext, Protocol):
    """What the cluster API needs of the server (a :class:`trioserve.Server`)."""

    @property
    def users(self) -> UserIndex: ...

    @property
    def draining(self) -> bool: ...

    @property
    def started_at(self) -> float: ...

    @property
    def recent_disconnects(self) -> deque[Disconnect]: ...

    def statistics(self) -> ServerStatistics: ...


class _Question:
    __slots__ = ("answers", "lot")

    def __init__(self) -> None:
        self.answers: list[dict[str, Any]] = []
        self.lot = trio.lowlevel.ParkingLot()


class Cluster:
    """``await nursery.start(cluster.run)``; then :meth:`ask` from any task."""

    def __init__(self, server: ClusterNode):
        self._server = server
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(6)
        self._pending: dict[str, _Question] = {}
        self._outbox: list[bytes] = []
        self._wake = trio.lowlevel.ParkingLot()
        self._actions: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "disconnect": self._disconnect,
            "unsubscribe": self._unsubscribe,
            "stats": lambda args: node_stats(self._server),
        }
        server.hub.broker.on_control(self._arrived)

    @property
    def node(self) -> str:
        return node_name(self._server)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the answers to the other nodes' questions; runs until cancelled."""
        task_status.started()
        broker = self._server.hub.broker
        while True:
            if not self._outbox:
                await self._wake.park()
                continue
            outbox, self._outbox = self._outbox, []
            for message in outbox:
                try:
                    await broker.broadcast(message)
                except BrokerUnavailable as exc:
                    log.warning("cluster API: an answer was not sent: %s", exc)

    async def ask(self, kind: str, **args: Any) -> tuple[list[dict[str, Any]], int]:
        """Do *kind* here and on every other node: this node's answer first, then
        the others' as they came, and how many nodes did not answer in time.
        Raises :class:`BrokerUnavailable` when the question could not be sent."""
        local = self._act(kind, args)
        qid = f"{self._prefix}.{next(self._ids)}"
        question = self._pending[qid] = _Question()
        try:
            reached = await self._server.hub.broker.broadcast(
                orjson.dumps({"q": qid, "kind": kind, "args": args}))
            with trio.move_on_after(ANSWER_TIMEOUT):
                while len(question.answers) < reached:
                    await question.lot.park()
        finally:
            del self._pending[qid]
        return [local, *question.answers], max(0, reached - len(question.answers))

    # --- the other nodes' messages (synchronous: called by the broker's reader) -------

    def _arrived(self, message: bytes) -> None:
        try:
            msg = orjson.loads(message)
            if "a" in msg:
                question = self._pending.get(msg["a"])
                if question is not None:
                    question.answers.append(msg["data"])
                    question.lot.unpark_all()
                return
            answer = self._act(msg["kind"], msg["args"])
            self._outbox.append(orjson.dumps({"a": msg["q"], "data": answer}))
            self._wake.unpark_all()
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            # Another node of this same program: a bad message is a bug, said and dropped.
            log.error("cluster API: bad control message %r: %s", message[:200], exc)

    def _act(self, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        action = self._actions.get(kind)
        if action is None:
            raise ValueError(f"unknown control message kind {kind!r}")
        return {"node": node_name(self._server), **action(args)}

    def _disconnect(self, args: dict[str, Any]) -> dict[str, Any]:
        code, reason = int(args["code"]), str(args["reason"])
        count = 0
        for conn in self._server.users.connections(str(args["user"])):
            connection = cast(Connection, conn)
            if connection.state is ConnectionState.OPEN:  # not those closing already
                connection.start_close(code, reason)
                count += 1
        return {"disconnected": count}

    def _unsubscribe(self, args: dict[str, Any]) -> dict[str, Any]:
        server = self._server
        topic = str(args["topic"])
        notice = orjson.dumps({"op": UNSUBSCRIBED_OP, "topic": topic, "reason": "server"})
        count = 0
        for conn in server.users.connections(str(args["user"])):
            client = cast(Client, conn)
            if server.hub.unsubscribe(client, topic):
                leave_all(server, client, frozenset((topic,)))
                client.send_encoded(notice)
                server.unsubscribed(client, topic)  # the on_unsubscribe hook and its webhook
                count += 1
        return {"unsubscribed": count}


def node_name(server: ClusterNode) -> str:
    """This node's name: the broker's (``w2``, or a Redis node's id), or ``local``."""
    return server.hub.broker.node or "local"


def topic_table(hub: Hub, limit: int = MAX_TOPICS) -> dict[str, list[int]]:
    """``{topic: [subscribers here, last offset]}``, the *limit* most subscribed."""
    counts = [(hub.subscriber_count(t), t) for t in hub.topics()]
    if len(counts) > limit:
        counts = sorted(counts, reverse=True)[:limit]
    return {t: [n, hub.position(t)] for n, t in counts}


def node_stats(server: ClusterNode) -> dict[str, Any]:
    """One node's figures, for ``GET /api/info``, ``/api/topics`` and the status page."""
    s = server.statistics()
    hub = s.hub
    config: Config = server.config
    return {
        "worker": config.worker_id,
        "pid": os.getpid(),
        "state": "draining" if server.draining else "ready",
        "version": __version__,
        "uptime": round(time.monotonic() - server.started_at, 3),
        "time": time.time(),
        "connections": {"websocket": s.websocket_connections, "tcp": s.tcp_connections},
        "users": server.users.users(),
        "subscriptions": hub.subscriptions,
        "publications": hub.publications,
        "deliveries": hub.deliveries,
        "latency_buckets": list(hub.fanout_latency_buckets),
        "disconnects_total": {str(k): v for k, v in s.disconnects_total.items()},
        "recent_disconnects": [list(d) for d in server.recent_disconnects],
        "topics": topic_table(server.hub),
    }


def merge_topics(answers: Iterable[dict[str, Any]]) -> dict[str, list[int]]:
    """Every node's topic table as one: subscribers summed, the highest offset."""
    merged: dict[str, list[int]] = {}
    for answer in answers:
        for topic, (subs, offset) in answer.get("topics", {}).items():
            held = merged.get(topic)
            if held is None:
                merged[topic] = [subs, offset]
            else:
                held[0] += subs
                held[1] = max(held[1], offset)
    return merged


def recent(server: ClusterNode, code: int, reason: str, transport: str) -> None:
    """Note a closed connection for the status page (the server calls this)."""
    server.recent_disconnects.append((time.time(), code, reason, transport))


def new_recent() -> deque[Disconnect]:
    return deque(maxlen=RECENT_DISCONNECTS)
