"""The HTTP API of the push domain: ``POST /api/publish`` (one publication or an
array of them), ``POST /api/broadcast`` and ``GET /api/history``."""

from __future__ import annotations

import hmac
from typing import Any

import orjson

from ..net.httpd import Request, Response, RouteHandler, json_error, json_response
from ..protocol.codes import ErrorCode
from ..protocol.messages import ProtocolError, parse_broadcast_topics, parse_publications, validate_topic
from .brokers import BrokerUnavailable
from .service import HubContext, PublishRefused, publish, publish_many, result_fields

__all__ = ["api_key_refusal", "api_routes"]


def api_key_refusal(ctx: HubContext, req: Request) -> Response | None:
    """A 401 unless *req* carries the API key (when one is configured)."""
    key = ctx.config.api_key
    if key is None:
        return None
    given = req.header(b"authorization") or b""
    # The scheme is case-insensitive (RFC 9110 11.1); the key is compared in constant time.
    if given[:7].lower() == b"bearer " and hmac.compare_digest(given[7:], key.encode()):
        return None
    ctx.count_auth_failure()
    return json_error(401, ErrorCode.UNAUTHORIZED,
                      "missing or wrong API key (Authorization: Bearer <key>)",
                      [(b"www-authenticate", b"Bearer")])


def batch_error(exc: ProtocolError) -> Response:
    """A batch refused whole: 413 when it has too many entries, else 400."""
    return json_error(413 if exc.code == ErrorCode.BATCH_TOO_LARGE else 400, exc.code, exc.message)


def api_routes(ctx: HubContext) -> dict[tuple[str, str], RouteHandler]:
    def refused(req: Request) -> Response | None:
        return api_key_refusal(ctx, req)

    def authorized_json(req: Request) -> tuple[Any, Response | None]:
        """The request's JSON body, or the answer refusing it (API key, invalid JSON)."""
        if (denied := refused(req)) is not None:
            return None, denied
        try:
            return orjson.loads(req.body), None
        except orjson.JSONDecodeError as exc:
            return None, json_error(400, ErrorCode.BAD_REQUEST, f"invalid JSON: {exc}")

    async def publish_route(req: Request) -> Response:
        body, error = authorized_json(req)
        if error is not None:
            return error
        if isinstance(body, list):
            return await publish_batch(body)
        if not isinstance(body, dict) or "data" not in body:
            return json_error(400, ErrorCode.BAD_REQUEST,
                              'body must be {"topic": "...", "data": <any JSON>}')
        try:
            topic = validate_topic(body.get("topic"))
        except ProtocolError as exc:
            return json_error(400, exc.code, exc.message)
        try:
            result = await publish(ctx.hub, topic, body["data"], wait=False)
        except PublishRefused as exc:
            retry = [] if exc.retry_after is None else [(b"retry-after", str(exc.retry_after).encode())]
            return json_error(503, exc.code, exc.message, retry)
        return json_response(200, {"ok": True, "offset": result.offset,
                                   "subscribers": result.subscribers})

    async def publish_batch(body: list[object]) -> Response:
        """An array of ``{topic, data}``: checked whole, then published in order,
        one offset each; the answer is an array of results, one per publication."""
        try:
            items = parse_publications(body)
        except ProtocolError as exc:
            return batch_error(exc)
        results = await publish_many(ctx.hub, items, wait=False)
        return json_response(200, [result_fields(r) for r in results])

    async def broadcast(req: Request) -> Response:
        """``{"topics": [...], "data": ...}``: the same data to each topic (one offset
        per topic); an array of results, one per topic."""
        body, error = authorized_json(req)
        if error is not None:
            return error
        if not isinstance(body, dict) or "data" not in body:
            return json_error(400, ErrorCode.BAD_REQUEST,
                              'body must be {"topics": ["...", ...], "data": <any JSON>}')
        try:
            topics = parse_broadcast_topics(body.get("topics"))
        except ProtocolError as exc:
            return batch_error(exc)
        data = body["data"]
        results = await publish_many(ctx.hub, [(topic, data) for topic in topics], wait=False)
        return json_response(200, [result_fields(r) for r in results])

    async def history(req: Request) -> Response:
        """``GET /api/history?topic=t&since=41&limit=100``: what followed offset 41.

        ``complete`` is false when history no longer reaches back to ``since``
        (the publications returned then start later than ``since + 1``).
        """
        if (denied := refused(req)) is not None:
            return denied
        try:
            topic = validate_topic(req.query.get("topic", [None])[0])
            since = int(req.query.get("since", ["0"])[0])
            limit = int(req.query.get("limit", ["100"])[0])
            if since < 0 or not 1 <= limit <= 1000:
                raise ValueError
        except ProtocolError as exc:
            return json_error(400, exc.code, exc.message)
        except ValueError:
            return json_error(400, ErrorCode.BAD_REQUEST,
                              "since must be an integer >= 0 and limit 1-1000")
        hub = ctx.hub
        try:
            publications, complete = await hub.history_page(topic, since, limit)
            epoch, offset = await hub.broker.head(topic)
        except BrokerUnavailable as exc:
            return json_error(503, ErrorCode.UNAVAILABLE, f"broker unavailable: {exc}")
        return json_response(200, {
            "ok": True, "topic": topic, "epoch": epoch, "offset": offset,
            "complete": complete, "publications": [orjson.Fragment(p) for p in publications],
        })

    return {
        ("POST", "/api/publish"): publish_route,
        ("POST", "/api/broadcast"): broadcast,
        ("GET", "/api/history"): history,
    }
