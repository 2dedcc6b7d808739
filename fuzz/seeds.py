#!/usr/bin/env python3
"""Write the seed corpus: valid (and a few classic invalid) requests and frames.

    .venv/bin/python fuzz/seeds.py     # rewrites fuzz/corpus/{http,websocket}/seed-* and repro-*

Seeds are named for what they are; ``repro-*`` files are inputs that found a
bug; ``cov-*`` files are inputs a long run found that reach new code, folded in
with libFuzzer's ``-merge=1`` (see fuzz/run.sh). This script touches only
``seed-*`` and ``repro-*``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
HOST = b"Host: 127.0.0.1:8000\r\n"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
# A fixed mask key: seeds must be the same bytes on every run.
MASK = b"\x37\xfa\x21\x3d"


def upgrade(path: bytes = b"/ws", extra: bytes = b"", version: bytes = b"13", key: bytes = KEY) -> bytes:
    return (b"GET " + path + b" HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: " + version + b"\r\n" + extra
            + b"\r\n")


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def publish(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /api/publish HTTP/1.1\r\n" + HOST + b"Authorization: Bearer fuzz-key\r\n"
            b"Content-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


HTTP = {
    "healthz": b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n",
    "readyz-close": b"GET /readyz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n",
    "metrics": b"GET /metrics HTTP/1.1\r\n" + HOST + b"Accept: application/openmetrics-text\r\n\r\n",
    "history": (b"GET /api/history?topic=news&since=0&limit=10 HTTP/1.1\r\n" + HOST
                + b"Authorization: Bearer fuzz-key\r\n\r\n"),
    "history-no-key": b"GET /api/history?topic=news&since=x HTTP/1.1\r\n" + HOST + b"\r\n",
    "publish": publish(b'{"topic":"news","data":{"headline":"hello"}}'),
    "publish-bad-json": publish(b'{"topic":"news","data":'),
    "publish-too-large": publish(b'{"topic":"t","data":"' + b"x" * 600 + b'"}'),
    "publish-chunked": (b"POST /api/publish HTTP/1.1\r\n" + HOST + b"Authorization: Bearer fuzz-key\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n10\r\n{\"topic\":\"t\",\"da\r\n"
                        b"9\r\nta\":[1,2]}\r\n0\r\n\r\n"),
    "publish-expect-100": publish(b'{"topic":"t","data":1}', b"Expect: 100-continue\r\n"),
    "publish-cl-te": (b"POST /api/publish HTTP/1.1\r\n" + HOST + b"Content-Length: 4\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "pipelined": (b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n") * 2 + b"GET /readyz HTTP/1.1\r\n" + HOST
                 + b"\r\n",
    "keepalive-then-upgrade": b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n" + upgrade(),
    "http10": b"GET /healthz HTTP/1.0\r\n\r\n",
    "wrong-method": b"DELETE /api/publish HTTP/1.1\r\n" + HOST + b"\r\n",
    "not-found": b"GET /nowhere?a=b HTTP/1.1\r\n" + HOST + b"\r\n",
    "upgrade": upgrade(),
    "upgrade-token": upgrade(b"/ws?token=abc.def.ghi"),
    "upgrade-bearer": upgrade(extra=b"Authorization: Bearer abc.def.ghi\r\nOrigin: https://a.example\r\n"),
    "upgrade-with-frame": upgrade() + frame(0x1, b'{"op":"ping"}'),
    "upgrade-version-8": upgrade(version=b"8"),
    "upgrade-bad-key": upgrade(key=b"c2hvcnQ="),
    "upgrade-wrong-path": upgrade(b"/elsewhere"),
    "upgrade-http10": upgrade().replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    "upgrade-post": upgrade().replace(b"GET", b"POST", 1),
    "upgrade-body": upgrade(extra=b"Content-Length: 3\r\n").rstrip(b"\r\n") + b"\r\n\r\nabc",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "obs-fold": b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-A: 1\r\n  continued\r\n\r\n",
}

#: Inputs that found bugs, kept so the corpus replay tests them for good.
REPRODUCERS = {
    # Any HEAD request: h11 refuses the body _respond sends, and the exception stops the server.
    "head-request": b"HEAD /healthz HTTP/1.1\r\n" + HOST + b"\r\n",
    # An upgrade with a broken chunked body: RemoteProtocolError escapes _upgrade, same result.
    "upgrade-bad-chunk": upgrade(extra=b"Transfer-Encoding: chunked\r\n") + b"zz\r\n",
}

WEBSOCKET = {
    "ping-op": frame(0x1, b'{"op":"ping","id":1}'),
    "subscribe": frame(0x1, b'{"op":"subscribe","topic":"news","id":"s"}'),
    "binary": frame(0x2, b"\x00\x01\x02binary"),
    "fragmented": (frame(0x1, b'{"op":', fin=False) + frame(0x0, b'"ping"', fin=False)
                   + frame(0x0, b"}")),
    "ping-inside-fragments": (frame(0x1, b'{"op":', fin=False) + frame(0x9, b"hb")
                              + frame(0x0, b'"ping"}')),
    "ping-pong": frame(0x9, b"hello") + frame(0xA, b"unsolicited"),
    "close-1000": frame(0x8, struct.pack("!H", 1000) + b"bye"),
    "close-empty": frame(0x8, b""),
    "close-4000": frame(0x8, struct.pack("!H", 4000)),
    "len16": frame(0x1, b"a" * 200),
    "len64-over-limit": frame(0x1, b"b" * 70_000),
    "over-limit": frame(0x1, b"c" * 600),
    "utf8-split": frame(0x1, b'"\xe6\x97', fin=False) + frame(0x0, b'\xa5"'),
    "utf8-bad": frame(0x1, b"\xff\xfe"),
    "unmasked": frame(0x1, b"x", masked=False),
    "rsv1": bytes((0xC1,)) + frame(0x1, b"x")[1:],
    "messages-then-close": (frame(0x1, b"one") + frame(0x2, b"two") + frame(0x9, b"")
                            + frame(0x8, struct.pack("!H", 1001))),
}


def main() -> None:
    for name, seeds in (("http", HTTP), ("websocket", WEBSOCKET)):
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for seed, data in seeds.items():
            (folder / f"seed-{seed}").write_bytes(data)
    for name, data in REPRODUCERS.items():
        (CORPUS / "http" / f"repro-{name}").write_bytes(data)
    print(f"wrote {len(HTTP)} HTTP and {len(WEBSOCKET)} WebSocket seeds and {len(REPRODUCERS)} "
          f"reproducers under {os.path.relpath(CORPUS)}")


if __name__ == "__main__":
    main()
