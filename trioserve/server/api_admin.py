"""The server API for an application backend: ``POST /api/disconnect``,
``POST /api/unsubscribe``, ``GET /api/topics`` and ``GET /api/info``.

Each asks for the API key, as ``/api/publish`` does, and acts on every node
or worker through :class:`~.cluster.Cluster` (the broker's control seam).
Users are a token's ``sub``: anonymous connections have no user to address.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..net.httpd import Request, Response, RouteHandler, json_error, json_response
from ..protocol.codes import ErrorCode
from ..protocol.messages import ProtocolError, validate_topic
from ..push.api import api_key_refusal
from ..push.brokers import BrokerUnavailable
from .cluster import Cluster, ClusterNode, merge_topics, node_stats, topic_table

__all__ = ["MAX_REASON_BYTES", "MAX_USER_LENGTH", "BadBody", "admin_api_routes", "parse_disconnect",
           "parse_unsubscribe"]

#: A WebSocket close reason fits 123 bytes of UTF-8 (RFC 6455 5.5: a control frame's 125, less the code).
MAX_REASON_BYTES = 123
MAX_USER_LENGTH = 1024
DEFAULT_REASON = "disconnected by the server"
#: The fields of a node in ``GET /api/info``.
_INFO_FIELDS = ("node", "worker", "pid", "state", "version", "uptime", "connections", "users",
                "subscriptions")


class BadBody(ValueError):
    """A request body the API refuses: a 400 with this message."""


def _object(body: bytes, shape: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadBody(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadBody(f"body must be a JSON object: {shape}")
    return obj


def _user(obj: dict[str, Any]) -> str:
    user = obj.get("user")
    if user is None:
        raise BadBody("user: missing (the token's sub of the connections to act on)")
    if not isinstance(user, str) or not user or len(user) > MAX_USER_LENGTH:
        raise BadBody(f"user: must be a non-empty string of at most {MAX_USER_LENGTH} characters")
    return user


def parse_disconnect(body: bytes) -> tuple[str, int, str]:
    """``{"user","code","reason"}`` → (user, code, reason); raises :class:`BadBody`."""
    obj = _object(body, '{"user": "...", "code": 4000-4999, "reason": "..."}')
    user = _user(obj)
    code = obj.get("code", 4000)
    if not isinstance(code, int) or isinstance(code, bool) or not 4000 <= code <= 4999:
        raise BadBody(f"code: must be an integer from 4000 to 4999 (an application close code), "
                      f"got {code!r:.50}")
    reason = obj.get("reason", DEFAULT_REASON)
    if not isinstance(reason, str):
        raise BadBody("reason: must be a string")
    if len(reason.encode()) > MAX_REASON_BYTES:
        raise BadBody(f"reason: at most {MAX_REASON_BYTES} bytes of UTF-8 (a WebSocket close reason)")
    return user, code, reason


def parse_unsubscribe(body: bytes) -> tuple[str, str]:
    """``{"user","topic"}`` → (user, topic); raises :class:`BadBody`."""
    obj = _object(body, '{"user": "...", "topic": "..."}')
    user = _user(obj)
    if "topic" not in obj:
        raise BadBody("topic: missing")
    try:
        topic = validate_topic(obj["topic"])
    except ProtocolError as exc:
        raise BadBody(f"topic: {exc.message}") from None
    return user, topic


def admin_api_routes(server: ClusterNode, cluster: Cluster) -> dict[tuple[str, str], RouteHandler]:
    def unavailable(exc: BrokerUnavailable) -> Response:
        return json_error(503, ErrorCode.UNAVAILABLE, f"broker unavailable: {exc}",
                          [(b"retry-after", b"1")])

    async def disconnect(req: Request) -> Response:
        if (denied := api_key_refusal(server, req)) is not None:
            return denied
        try:
            user, code, reason = parse_disconnect(req.body)
            answers, missing = await cluster.ask("disconnect", user=user, code=code, reason=reason)
        except BadBody as exc:
            return json_error(400, ErrorCode.BAD_REQUEST, str(exc))
        except BrokerUnavailable as exc:
            return unavailable(exc)
        return json_response(200, {"ok": True, "user": user,
                                   "disconnected": sum(a.get("disconnected", 0) for a in answers),
                                   "nodes": len(answers), "missing": missing})

    async def unsubscribe(req: Request) -> Response:
        if (denied := api_key_refusal(server, req)) is not None:
            return denied
        try:
            user, topic = parse_unsubscribe(req.body)
            answers, missing = await cluster.ask("unsubscribe", user=user, topic=topic)
        except BadBody as exc:
            return json_error(400, ErrorCode.BAD_REQUEST, str(exc))
        except BrokerUnavailable as exc:
            return unavailable(exc)
        return json_response(200, {"ok": True, "user": user, "topic": topic,
                                   "unsubscribed": sum(a.get("unsubscribed", 0) for a in answers),
                                   "nodes": len(answers), "missing": missing})

    async def topics(req: Request) -> Response:
        if (denied := api_key_refusal(server, req)) is not None:
            return denied
        scope = req.query.get("scope", ["node"])[0]
        if scope == "node":
            table, nodes, missing = topic_table(server.hub), 1, 0
        elif scope == "cluster":
            try:
                answers, missing = await cluster.ask("stats")
            except BrokerUnavailable as exc:
                return unavailable(exc)
            table, nodes = merge_topics(answers), len(answers)
        else:
            return json_error(400, ErrorCode.BAD_REQUEST,
                              f"scope: must be node (the default) or cluster, got {scope!r:.50}")
        listed = sorted(table.items(), key=lambda item: (-item[1][0], item[0]))
        return json_response(200, {
            "ok": True, "scope": scope, "nodes": nodes, "missing": missing,
            "topics": [{"topic": t, "subscribers": n, "offset": off} for t, (n, off) in listed],
        })

    async def info(req: Request) -> Response:
        if (denied := api_key_refusal(server, req)) is not None:
            return denied
        try:
            answers, missing = await cluster.ask("stats")
        except BrokerUnavailable:
            answers, missing = [{"node": cluster.node, **node_stats(server)}], 0
        nodes = [{k: a.get(k) for k in _INFO_FIELDS} | {"topics": len(a.get("topics", ()))}
                 for a in answers]
        nodes.sort(key=lambda n: (n["worker"] or 0, str(n["node"])))
        return json_response(200, {"ok": True, "nodes": nodes, "missing": missing})

    return {
        ("POST", "/api/disconnect"): disconnect,
        ("POST", "/api/unsubscribe"): unsubscribe,
        ("GET", "/api/topics"): topics,
        ("GET", "/api/info"): info,
    }
