#!/usr/bin/env python3
"""atheris target: arbitrary bytes as a client's stream on the HTTP + WebSocket port.

The bytes go through the real ``trioserve.net.httpd.serve_http`` (h11 parsing, the
upgrade checks, the routes, refusals) over a fake transport; see
fuzz/harness.py for the oracles. Run it with fuzz/run.sh, or directly:

    .venv/bin/python fuzz/fuzz_http.py -max_total_time=60 /tmp/new-inputs fuzz/corpus/http
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["trioserve", "h11", "fuzz"]):
    from fuzz.harness import http_one_input


def test_one_input(data: bytes) -> None:
    http_one_input(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
