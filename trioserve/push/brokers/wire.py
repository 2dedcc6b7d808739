"""The frames between the supervisor's sequencer and its workers (the embedded broker).

One frame is an 8-byte head, a small orjson header and a raw payload:

    >II  header length, payload length
    header   a JSON array, e.g. ["pub", 7, "news"] or ["m", "news", 42]
    payload  raw bytes, never re-encoded: a publication's JSON, or its data's

The payload rides beside the header so that a publication is encoded once,
by the sequencer, and the workers hand those very bytes to their hubs.
Frames are bounded (:data:`MAX_FRAME`); a larger one is a protocol error and
ends the connection. Pure: no I/O, tested byte by byte.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

__all__ = ["MAX_FRAME", "MAX_HEADER", "FrameError", "FrameReader", "encode_frame"]

_HEAD = struct.Struct(">II")
#: Largest header (topic names and ids; a fetch reply's list of lengths).
MAX_HEADER = 4 * 1024 * 1024
#: Largest payload: a publication, or a fetch reply's run of them.
MAX_FRAME = 64 * 1024 * 1024


class FrameError(Exception):
    """The peer sent something that is not a frame: the connection cannot go on."""


def encode_frame(header: Any, payload: bytes = b"") -> bytes:
    head = orjson.dumps(header)
    if len(head) > MAX_HEADER or len(payload) > MAX_FRAME:
        raise FrameError(f"frame too large: header {len(head)} bytes, payload {len(payload)}")
    return _HEAD.pack(len(head), len(payload)) + head + payload


class FrameReader:
    """Bytes in, ``(header, payload)`` frames out, whatever the chunking."""

    __slots__ = ("_buf", "_need")

    def __init__(self) -> None:
        self._buf = bytearray()
        # Bytes the buffer must hold before a parse can yield a frame: a large
        # frame arriving in many chunks is parsed once, not once per chunk.
        self._need = _HEAD.size

    def feed(self, chunk: bytes) -> list[tuple[Any, bytes]]:
        buf = self._buf
        buf += chunk
        if len(buf) < self._need:
            return []
        data = bytes(buf)
        buf.clear()
        frames = []
        pos = 0
        end_of_data = len(data)
        need = _HEAD.size
        while end_of_data - pos >= _HEAD.size:
            hlen, plen = _HEAD.unpack_from(data, pos)
            if hlen > MAX_HEADER or plen > MAX_FRAME:
                raise FrameError(f"frame too large: header {hlen} bytes, payload {plen}")
            start = pos + _HEAD.size
            end = start + hlen + plen
            if end > end_of_data:
                need = end - pos
                break
            try:
                header = orjson.loads(data[start:start + hlen])
            except orjson.JSONDecodeError as exc:
                raise FrameError(f"bad frame header: {exc}") from None
            if not isinstance(header, list) or not header:
                raise FrameError(f"bad frame header: {header!r:.100}")
            frames.append((header, data[start + hlen:end]))
            pos = end
        if pos < end_of_data:
            buf += data[pos:] if pos else data
        self._need = need
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)
