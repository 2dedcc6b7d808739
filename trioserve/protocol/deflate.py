"""permessage-deflate (RFC 7692), compressed once for every subscriber; no I/O.

The server always answers an acceptable offer with ``server_no_context_takeover``
and ``client_no_context_takeover``. Each compressed message then stands alone
in both directions, which is what lets the hub compress a publication once and
send the same bytes to every subscriber that negotiated compression, and lets
an idle connection hold no zlib object at all:

* outbound, :func:`frame_batch` deflates each message with a fresh compressor
  (creating one costs ~2 µs, less than resetting a shared one with
  ``Z_FULL_FLUSH``) and frames it with RSV1 set;
* inbound, :class:`InboundDeflate` (a wsproto extension) inflates a compressed
  message with a decompressor made for that message and dropped after it, and
  never produces more than ``max_message_size`` bytes: a zip bomb is refused
  with 1009 after at most that much output.

Messages under :data:`COMPRESS_THRESHOLD` bytes go uncompressed (RSV1 is per
message): their deflate output would be about as long, and cost CPU for nothing.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence

from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

from .websocket import frame_header

__all__ = [
    "COMPRESS_THRESHOLD",
    "EXTENSION_NAME",
    "InboundDeflate",
    "Inflater",
    "client_offer",
    "compressed_text_frame",
    "deflate",
    "frame_batch",
    "negotiate",
    "parse_extensions",
]

EXTENSION_NAME = "permessage-deflate"
#: Payloads shorter than this many bytes are sent uncompressed.
COMPRESS_THRESHOLD = 256
#: The answer to every accepted offer (plus ``server_max_window_bits=15`` when asked).
_RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
#: The server's window: 15 bits. Standalone messages of a few KB gain nothing
#: from a smaller one, and one window size means one compressed copy for everyone.
_WBITS = 15
# Level 6 (zlib's default) with memLevel 5: the same ratio as memLevel 8 on
# messages of a few KB, and a smaller hash table to set up per message.
_LEVEL = 6
_MEM_LEVEL = 5
_TAIL = b"\x00\x00\xff\xff"
_OP_TEXT_RSV1 = 0xC1  # FIN + RSV1 + text
_OP_TEXT = 0x81

# RFC 7230 token and quoted-string, for the Sec-WebSocket-Extensions grammar (RFC 6455 9.1).
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_ITEM = re.compile(rf'\s*({_TOKEN})\s*(?:=\s*({_TOKEN}|"(?:[^"\\]|\\.)*"))?\s*')
_BITS = re.compile(r"(?:[89]|1[0-5])\Z")


def _split(value: str, sep: str) -> list[str]:
    """Split *value* at *sep* outside quoted strings."""
    if '"' not in value:
        return value.split(sep)  # the usual header: no quoted strings
    parts: list[str] = []
    start = 0
    quoted = escaped = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def parse_extensions(values: Iterable[bytes]) -> list[tuple[str, list[tuple[str, str | None]]] | None]:
    """Parse ``Sec-WebSocket-Extensions`` header values into offers, in order.

    Each offer is ``(name, [(param, value or None), ...])`` with quoted values
    unquoted; an element that does not follow the grammar is ``None`` (so one
    malformed offer can be declined without refusing the handshake).
    """
    offers: list[tuple[str, list[tuple[str, str | None]]] | None] = []
    for raw in values:
        text = raw.decode("latin-1")
        for element in _split(text, ","):
            if not element.strip():
                continue  # RFC 7230 7: empty list elements are allowed and ignored
            pieces = _split(element, ";")
            offer: tuple[str, list[tuple[str, str | None]]] | None = None
            name = pieces[0].strip()
            if re.fullmatch(_TOKEN, name):
                params: list[tuple[str, str | None]] | None = []
                for piece in pieces[1:]:
                    m = _ITEM.fullmatch(piece)
                    if m is None or params is None:
                        params = None
                        break
                    val = m.group(2)
                    if val is not None and val.startswith('"'):
                        val = re.sub(r"\\(.)", r"\1", val[1:-1])
                    params.append((m.group(1).lower(), val))
                if params is not None:
                    offer = (name.lower(), params)
            offers.append(offer)
    return offers


def _accept(params: list[tuple[str, str | None]]) -> str | None:
    """The response to one permessage-deflate offer, or None to decline it."""
    seen: set[str] = set()
    response = _RESPONSE
    for name, value in params:
        if name in seen:
            return None  # RFC 7692 7: a repeated parameter makes the offer invalid
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif name == "client_max_window_bits":
            # The client may limit its own window; any window inflates with 15
            # bits, so the response need not mention it.
            if value is not None and not _BITS.match(value):
                return None
        elif name == "server_max_window_bits":
            if value is None or not _BITS.match(value):
                return None
            if int(value) < _WBITS:
                # A smaller window would mean a second compressed copy of every
                # publication; decline (RFC 7692 7.1.2.1 allows that).
                return None
            response += "; server_max_window_bits=15"
        else:
            return None  # unknown parameter
    return response


def negotiate(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The ``Sec-WebSocket-Extensions`` response value for a request's headers
    (h11's: lower-cased names), or None when no permessage-deflate offer is
    acceptable. Offers are tried in the client's order of preference;
    malformed ones are declined, never a reason to refuse the handshake."""
    values = [v for k, v in headers if k == b"sec-websocket-extensions"]
    if not values:
        return None
    for offer in parse_extensions(values):
        if offer is not None and offer[0] == EXTENSION_NAME:
            response = _accept(offer[1])
            if response is not None:
                return response.encode()
    return None


def client_offer() -> str:
    """What a client of this package offers: it needs no context of its own either."""
    return "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


# --- outbound ----------------------------------------------------------------------


def deflate(payload: bytes) -> bytes:
    """*payload* as one standalone permessage-deflate message body (raw deflate,
    sync-flushed, without the 00 00 ff ff tail, RFC 7692 7.2.1)."""
    c = zlib.compressobj(_LEVEL, zlib.DEFLATED, -_WBITS, _MEM_LEVEL)
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4] if data.endswith(_TAIL) else data


def compressed_text_frame(payload: bytes) -> bytes:
    """One unmasked text frame for *payload*: compressed (RSV1) when it is at
    least :data:`COMPRESS_THRESHOLD` bytes and deflate makes it shorter."""
    if len(payload) >= COMPRESS_THRESHOLD:
        body = deflate(payload)
        if len(body) < len(payload):
            return frame_header(len(body), _OP_TEXT_RSV1) + body
    return frame_header(len(payload), _OP_TEXT) + payload


def frame_batch(payloads: Sequence[bytes]) -> bytes:
    """Frames for *payloads*, each compressed on its own, joined into one buffer.

    Called once per batch by the hub for all subscribers that negotiated
    permessage-deflate: the compression is shared, not per connection.
    """
    if len(payloads) == 1:
        return compressed_text_frame(payloads[0])
    return b"".join([compressed_text_frame(p) for p in payloads])


# --- inbound -----------------------------------------------------------------------


class Inflater:
    """Inflate one standalone compressed message, never past *limit* bytes.

    Made per message and dropped after it; ``feed`` returns None once the
    output would exceed the limit (the caller closes with 1009) and raises
    ``zlib.error`` on corrupt data.
    """

    __slots__ = ("_d", "_left")

    def __init__(self, limit: int):
        self._d = zlib.decompressobj(-_WBITS)
        self._left = limit

    def feed(self, data: bytes, final: bool = False) -> bytes | None:
        if final:
            data += _TAIL
        # One byte more than allowed is enough to know the limit is broken.
        out = self._d.decompress(data, self._left + 1)
        if len(out) > self._left or self._d.unconsumed_tail:
            return None
        self._left -= len(out)
        return out


class InboundDeflate(Extension):
    """wsproto extension for a connection that negotiated permessage-deflate with
    this server: inflates compressed client messages, bounded by *limit*.

    It compresses nothing: outbound messages are compressed by :func:`frame_batch`
    once for all subscribers. Between messages it holds no zlib object, so an
    idle compressed connection costs this object's few slots.
    """

    name = EXTENSION_NAME

    __slots__ = ("_control", "_frame_compressed", "_inflater", "_limit", "_message")

    def __init__(self, limit: int):
        self._limit = limit
        self._inflater: Inflater | None = None
        # None between messages, else whether the current message is compressed.
        self._message: bool | None = None
        # Whether the current frame is a data frame of a compressed message.
        self._frame_compressed = False
        # Whether the current frame is a control frame (which may come between
        # the fragments of a message and must not end it).
        self._control = False

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool | str:
        return client_offer()

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR  # RFC 7692 6.1: never on control frames
            self._frame_compressed = False
            self._control = True
            return RsvBits(False, False, False)
        self._control = False
        if opcode is Opcode.CONTINUATION:
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR  # RSV1 only on a message's first frame
        else:
            # A new message (wsproto itself refuses one that interrupts another).
            self._message = rsv.rsv1
            if rsv.rsv1:
                self._inflater = Inflater(self._limit)
        self._frame_compressed = bool(self._message)
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes,
    ) -> bytes | CloseReason:
        if not self._frame_compressed or self._inflater is None:
            return data
        try:
            out = self._inflater.feed(data)
        except zlib.error:
            self._inflater = None
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if out is None:
            self._inflater = None
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool,
    ) -> bytes | CloseReason | None:
        if self._control:
            self._control = False
            return None
        if not fin or not self._frame_compressed:
            if fin:
                self._message = None
            return None
        inflater, self._inflater, self._message = self._inflater, None, None
        if inflater is None:
            return None
        try:
            out = inflater.feed(b"", final=True)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if out is None:
            return CloseReason.MESSAGE_TOO_BIG
        return out
