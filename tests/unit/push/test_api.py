"""The HTTP API's route handlers, called with a Request and a server reduced to
what they use (config, hub, the auth-failure count). tests/system covers the
API over HTTP; these are the handlers' own answers: which status, which error
code, which headers, and what reaches the hub."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
import trio

from trioserve import Config, Hub
from trioserve.net.httpd import Request, Response
from trioserve.push.api import api_routes

from .helpers import RemoteBroker

KEY = "api-key-0123456789"


@attrs.define
class Site:
    """A server as the API sees it (push.service.HubContext)."""

    config: Config = attrs.Factory(Config)
    hub: Hub = attrs.Factory(Hub)
    auth_failures: int = 0

    def count_auth_failure(self) -> None:
        self.auth_failures += 1


async def post(site: Site, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    handler = api_routes(site)[("POST", "/api/publish")]
    return await handler(Request("POST", "/api/publish", {}, headers or [], raw, "192.0.2.1:1"))


async def get_history(site: Site, headers: list[tuple[bytes, bytes]] | None = None,
                      **query: str) -> Response:
    handler = api_routes(site)[("GET", "/api/history")]
    req = Request("GET", "/api/history", {k: [v] for k, v in query.items()}, headers or [], b"", None)
    return await handler(req)


def answer(resp: Response) -> tuple[int, Any]:
    return resp.status, orjson.loads(resp.body)


def error_code(resp: Response) -> str:
    return str(orjson.loads(resp.body)["error"]["code"])


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


# --- POST /api/publish -----------------------------------------------------------------------


async def test_publish_puts_the_publication_in_the_hub() -> None:
    site = Site()
    assert answer(await post(site, {"topic": "t", "data": {"n": [1, 2]}})) == (
        200, {"ok": True, "offset": 1, "subscribers": 0})
    assert answer(await post(site, {"topic": "t", "data": None}))[1]["offset"] == 2  # null is data too
    async with trio.open_nursery() as nursery:
        await nursery.start(site.hub.run)
        await site.hub.flush()
        nursery.cancel_scope.cancel()
    held, _ = site.hub.history_after("t", 0, 10)
    assert [orjson.loads(p)["data"] for p in held] == [{"n": [1, 2]}, None]


@pytest.mark.parametrize(("body", "message"), [
    (b"7", 'body must be {"topic": "...", "data": <any JSON>}'),
    # An array is a batch: checked whole before anything is published.
    (b'[{"topic": "t", "data": 1}, 2]', 'publications[1] must be {"topic": ..., "data": ...}'),
    ({"data": 1}, "topic must be 1-200 characters of A-Z a-z 0-9 _ . : / -"),
    ({"topic": 7, "data": 1}, "topic must be 1-200 characters of A-Z a-z 0-9 _ . : / -"),
    (b'{"topic": "t", "data": 1', None),
])
async def test_a_bad_body_is_400_and_publishes_nothing(body: Any, message: str | None) -> None:
    site = Site()
    status, reply = answer(await post(site, body))
    assert status == 400 and reply["ok"] is False and reply["error"]["code"] == "bad_request"
    if message is None:
        assert reply["error"]["message"].startswith("invalid JSON: ")
    else:
        assert reply["error"]["message"] == message
    assert site.hub.statistics().publications == 0


async def test_an_overloaded_hub_answers_503_with_retry_after() -> None:
    site = Site(hub=Hub(max_pending=1))
    site.hub.publish_nowait("t", 0)
    resp = await post(site, {"topic": "t", "data": 1})
    assert resp.status == 503 and error_code(resp) == "unavailable"
    assert (b"retry-after", b"1") in resp.headers


async def test_a_draining_hub_answers_503_without_retry_after() -> None:
    # The server is going away: retrying here is pointless.
    site = Site()
    site.hub.close()
    resp = await post(site, {"topic": "t", "data": 1})
    assert answer(resp) == (503, {"ok": False, "error": {"code": "unavailable",
                                                         "message": "server is draining"}})
    assert not any(name == b"retry-after" for name, _ in resp.headers)


async def test_a_broker_that_is_down_answers_503_with_retry_after() -> None:
    site = Site(hub=Hub(broker=RemoteBroker(down=True)))
    resp = await post(site, {"topic": "t", "data": 1})
    assert answer(resp)[1]["error"]["message"] == "broker unavailable: connection refused"
    assert (b"retry-after", b"1") in resp.headers


# --- the API key -----------------------------------------------------------------------------


async def test_without_an_api_key_configured_anyone_may_publish() -> None:
    site = Site()
    assert (await post(site, {"topic": "t", "data": 1}, bearer("anything"))).status == 200
    assert site.auth_failures == 0


async def test_a_missing_or_wrong_key_is_401_and_counted_on_both_routes() -> None:
    site = Site(config=Config(api_key=KEY))
    refusals = [
        await post(site, {"topic": "t", "data": 1}),
        await post(site, {"topic": "t", "data": 1}, bearer(KEY + "x")),
        await post(site, {"topic": "t", "data": 1}, [(b"authorization", KEY.encode())]),  # no scheme
        await get_history(site, topic="t"),
    ]
    for resp in refusals:
        assert resp.status == 401 and error_code(resp) == "unauthorized"
        assert (b"www-authenticate", b"Bearer") in resp.headers
    assert site.auth_failures == 4
    assert site.hub.statistics().publications == 0
    assert (await post(site, {"topic": "t", "data": 1}, bearer(KEY))).status == 200
    assert (await get_history(site, bearer(KEY), topic="t")).status == 200
    assert site.auth_failures == 4


# HTTP auth schemes are case-insensitive (RFC 9110 section 11.1), as the WebSocket
# upgrade's token check already takes them.
async def test_the_auth_scheme_is_case_insensitive() -> None:
    site = Site(config=Config(api_key=KEY))
    resp = await post(site, {"topic": "t", "data": 1}, [(b"authorization", f"bearer {KEY}".encode())])
    assert resp.status == 200


# --- GET /api/history ------------------------------------------------------------------------


async def test_history_embeds_each_publication_as_json() -> None:
    site = Site()
    async with trio.open_nursery() as nursery:
        await nursery.start(site.hub.run)
        for i in range(3):
            site.hub.publish_nowait("t", {"i": i})
        await site.hub.flush()
        nursery.cancel_scope.cancel()
    status, page = answer(await get_history(site, topic="t", since="1", limit="1"))
    assert status == 200
    # Objects, not JSON strings: each stored payload goes out as it is.
    assert page == {"ok": True, "topic": "t", "epoch": site.hub.epoch_of("t"), "offset": 3,
                    "complete": True, "publications": [{"op": "pub", "topic": "t", "offset": 2,
                                                        "data": {"i": 1}}]}


@pytest.mark.parametrize(("since", "limit", "ok"), [
    ("0", "1", True), ("0", "1000", True),
    ("0", "0", False), ("0", "1001", False), ("x", "10", False), ("0", "ten", False),
])
async def test_history_checks_since_and_limit(since: str, limit: str, ok: bool) -> None:
    resp = await get_history(Site(), topic="t", since=since, limit=limit)
    if ok:
        assert resp.status == 200
    else:
        assert answer(resp) == (400, {"ok": False, "error": {
            "code": "bad_request", "message": "since must be an integer >= 0 and limit 1-1000"}})


async def test_history_from_a_broker_that_is_down_is_503() -> None:
    site = Site(hub=Hub(broker=RemoteBroker(down=True)))
    resp = await get_history(site, topic="t")
    assert answer(resp) == (503, {"ok": False, "error": {
        "code": "unavailable", "message": "broker unavailable: connection refused"}})


async def test_history_from_an_asynchronous_broker_asks_the_broker() -> None:
    broker = RemoteBroker()
    site = Site(hub=Hub(broker=broker))
    for i in range(3):
        await site.hub.publish("t", i)
    status, page = answer(await get_history(site, topic="t", since="1"))
    assert status == 200 and (page["epoch"], page["offset"], page["complete"]) == ("remote", 3, True)
    assert [p["data"] for p in page["publications"]] == [1, 2]
