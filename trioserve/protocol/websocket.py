"""WebSocket wire format for the server side (RFC 6455), without I/O.

Parsing of client frames is wsproto's job; this module adds what the hot path
needs and wsproto does not offer: frames built once as plain ``bytes`` and
handed to every subscriber, and batches of frames joined into one buffer.
Server frames are unmasked and, without permessage-deflate, identical for every
client, which is what makes encode-once fan-out possible.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable, Sequence

from wsproto.connection import Connection as WSConnection
from wsproto.frame_protocol import Opcode

__all__ = [
    "HandshakeError",
    "accept_key",
    "announced_remainder",
    "check_upgrade",
    "close_frame",
    "frame_batch",
    "frame_header",
    "is_upgrade",
    "switching_protocols",
    "text_frame",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_TEXT = 0x81  # FIN + text
_OP_CLOSE = 0x88  # FIN + close
_U16 = struct.Struct("!BBH").pack
_U64 = struct.Struct("!BBQ").pack
_CODE = struct.Struct("!H").pack


class HandshakeError(Exception):
    """An upgrade request we refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str, headers: Sequence[tuple[bytes, bytes]] = ()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


def accept_key(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def _header_tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    tokens: set[bytes] = set()
    for k, v in headers:
        if k == name:
            tokens.update(t.strip().lower() for t in v.split(b","))
    return tokens


def is_upgrade(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when the request asks to switch to WebSocket (``Upgrade: websocket``).

    ``headers`` are h11's: lower-cased names.
    """
    return b"websocket" in _header_tokens(headers, b"upgrade")


def check_upgrade(
    method: bytes, http_version: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """Validate an upgrade request; return the headers of the 101 response.

    Raises :class:`HandshakeError` naming what is wrong, so the client learns
    what to fix from the 400's body instead of a bare refusal.
    """
    if method != b"GET":
        raise HandshakeError(400, "WebSocket upgrade must use GET")
    if http_version != b"1.1":
        raise HandshakeError(400, "WebSocket upgrade needs HTTP/1.1")
    if b"upgrade" not in _header_tokens(headers, b"connection"):
        raise HandshakeError(400, "missing 'Connection: Upgrade' header")
    versions = [v for k, v in headers if k == b"sec-websocket-version"]
    if versions != [b"13"]:
        # RFC 6455 4.2.2: an unsupported version gets 426 and the versions we speak.
        raise HandshakeError(
            426,
            "unsupported Sec-WebSocket-Version (need 13)",
            [(b"sec-websocket-version", b"13")],
        )
    keys = [v for k, v in headers if k == b"sec-websocket-key"]
    if len(keys) != 1:
        raise HandshakeError(400, "missing or repeated Sec-WebSocket-Key header")
    try:
        raw = base64.b64decode(keys[0], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes, base64-encoded")
    return [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_key(keys[0])),
    ]


def switching_protocols(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The bytes of a 101 response with *headers* (from :func:`check_upgrade`)."""
    lines = [b"HTTP/1.1 101 Switching Protocols"]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def frame_header(length: int, first: int) -> bytes:
    """The header of an unmasked frame: *first* is FIN, RSV and opcode bits."""
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _U16(first, 126, length)
    return _U64(first, 127, length)


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame carrying *payload* (UTF-8 bytes)."""
    return frame_header(len(payload), _OP_TEXT) + payload


def frame_batch(payloads: Sequence[bytes]) -> bytes:
    """Text frames for *payloads*, joined into one buffer for one ``send()``."""
    if len(payloads) == 1:
        return text_frame(payloads[0])
    parts: list[bytes] = []
    append = parts.append
    for p in payloads:
        append(frame_header(len(p), _OP_TEXT))
        append(p)
    return b"".join(parts)


def close_frame(code: int, reason: str = "") -> bytes:
    """An unmasked close frame; the reason is cut to fit the 125-byte control limit."""
    data = reason.encode("utf-8")[:123]
    # Cutting may split a multi-byte character; drop the broken tail.
    data = data.decode("utf-8", "ignore").encode("utf-8")
    payload = _CODE(code) + data
    return bytes((_OP_CLOSE, len(payload))) + payload


def announced_remainder(ws: WSConnection, in_message: bool) -> int:
    """Payload bytes still to come of the data frame that *ws* is in the middle of
    (0 between frames, and for control frames, which are at most 125 bytes).

    *in_message*: whether a fragmented message is under way. A frame that does
    not fit the sequence (a continuation with no message under way, a new
    message inside one) counts 0: wsproto refuses it with 1002 when its payload
    arrives, and the close code must not depend on how the bytes were chunked.

    wsproto reads a frame's header before its payload but reports nothing until
    payload arrives. The server refuses an oversized message as soon as the
    header announces it, as the websockets library does, rather than after
    reading ``max_message_size`` bytes of it. wsproto offers no public accessor,
    so this reads its decoder's state; tests/protocol checks it against the
    installed wsproto.
    """
    decoder = ws._proto._frame_decoder
    header = decoder.header
    if header is None or header.opcode.iscontrol():
        return 0
    if not decoder.payload_consumed and (header.opcode is Opcode.CONTINUATION) != in_message:
        return 0
    return header.payload_len - decoder.payload_consumed
