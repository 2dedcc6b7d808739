"""``GET /trioserve.js`` and ``/trioserve.d.ts``: the JavaScript client, served by the server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from trioserve import __version__

from ..peers import http_request

pytestmark = pytest.mark.system

CLIENTS_JS = Path(__file__).resolve().parents[2] / "clients" / "js"
LIMIT = 10


@pytest.mark.parametrize(("path", "content_type"), [
    ("/trioserve.js", "text/javascript; charset=utf-8"),
    ("/trioserve.d.ts", "application/typescript; charset=utf-8"),
])
async def test_the_client_files_with_etag_and_cors(start_server: Any, path: str, content_type: str) -> None:
    rs = await start_server()
    with trio.fail_after(LIMIT):
        resp = await http_request(rs.port, "GET", path)
        assert resp.status == 200
        assert resp.body == (CLIENTS_JS / path.lstrip("/")).read_bytes()
        assert resp.headers["content-type"] == content_type
        assert resp.headers["cache-control"] == "no-cache"
        assert resp.headers["access-control-allow-origin"] == "*"
        assert resp.headers["x-content-type-options"] == "nosniff"
        etag = resp.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"') and len(etag) == 34

        # Revalidation: unchanged, so 304 with no body (and no Content-Length of its own).
        for tags in (etag, f'"other", W/{etag}', "*"):
            cached = await http_request(rs.port, "GET", path, headers=[("If-None-Match", tags)])
            assert cached.status == 304, tags
            assert cached.body == b""
            assert cached.headers["etag"] == etag
            assert "content-length" not in cached.headers
        stale = await http_request(rs.port, "GET", path, headers=[("If-None-Match", '"other"')])
        assert stale.status == 200 and stale.body == resp.body


async def test_only_get(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(LIMIT):
        resp = await http_request(rs.port, "POST", "/trioserve.js")
        assert resp.status == 405


def test_the_versions_agree() -> None:
    """The npm package, the module's VERSION and the Python package are one release."""
    package = json.loads((CLIENTS_JS / "package.json").read_text())
    assert package["version"] == __version__
    assert package["license"] == "MIT"
    match = re.search(r'^export const VERSION = "([^"]+)";$', (CLIENTS_JS / "trioserve.js").read_text(), re.M)
    assert match is not None and match.group(1) == __version__
