#!/usr/bin/env python3
"""atheris target: arbitrary bytes as the client side of an upgraded WebSocket.

The bytes go through a real ``trioserve.WebSocketConnection`` (wsproto's
parser, the server's size and UTF-8 checks, ping answers, the close
handshake) via its ``receive()`` over a fake transport; see fuzz/harness.py
for the oracles. Run it with fuzz/run.sh, or directly:

    .venv/bin/python fuzz/fuzz_websocket.py -max_total_time=60 /tmp/new-inputs fuzz/corpus/websocket
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["trioserve", "wsproto", "fuzz"]):
    from fuzz.harness import websocket_one_input


def test_one_input(data: bytes) -> None:
    websocket_one_input(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
