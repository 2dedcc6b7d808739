"""The assets module on its own: the routes it declares, what they answer, and
``If-None-Match``. tests/system/test_assets.py fetches the files from a real
server; tests/clients runs the client itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioserve.net.httpd import Request
from trioserve.server import assets

CLIENTS_JS = Path(__file__).resolve().parents[3] / "clients" / "js"


def request(path: str, *headers: tuple[bytes, bytes]) -> Request:
    return Request("GET", path, {}, list(headers), b"", None)


def test_the_routes() -> None:
    assert set(assets.asset_routes()) == {("GET", "/trioserve.js"), ("GET", "/trioserve.d.ts"),
                                          ("GET", "/admin")}


async def test_the_status_page_is_one_self_contained_html_file() -> None:
    resp = await assets.asset_routes()[("GET", "/admin")](request("/admin"))
    assert resp.status == 200 and resp.content_type == b"text/html; charset=utf-8"
    assert b'data-testid="connections"' in resp.body and b"/admin/ws" in resp.body
    # No CDN, no external script or style: everything it needs is in the file.
    assert b"http://" not in resp.body and b"https://" not in resp.body


@pytest.mark.parametrize(("path", "name"), [("/trioserve.js", "trioserve.js"),
                                            ("/trioserve.d.ts", "trioserve.d.ts")])
async def test_the_files_are_the_clients(path: str, name: str) -> None:
    resp = await assets.asset_routes()[("GET", path)](request(path))
    assert resp.status == 200
    assert resp.body == (CLIENTS_JS / name).read_bytes()
    assert resp.content_type == assets.ASSETS[path][1]


@pytest.mark.parametrize(("header", "matches"), [
    (None, False),
    (b'"abc"', True),
    (b'W/"abc"', True),
    (b'"x", "abc"', True),
    (b'"x","abc"', True),
    (b"*", True),
    (b'"abcd"', False),
    (b"abc", False),
    (b"", False),
])
def test_if_none_match(header: bytes | None, matches: bool) -> None:
    assert assets._matches(header, b'"abc"') is matches


async def test_not_modified() -> None:
    route = assets.asset_routes()[("GET", "/trioserve.js")]
    first = await route(request("/trioserve.js"))
    etag = dict(first.headers)[b"etag"]
    again = await route(request("/trioserve.js", (b"if-none-match", etag)))
    assert (again.status, again.body) == (304, b"")
    assert dict(again.headers)[b"etag"] == etag
