"""Server-Sent Events framing and the stream's resume cursor, without I/O.

An SSE stream (``text/event-stream``) is a run of events; an event is lines
of ``field: value`` ended by a blank line. Every publication is one event whose
``data:`` is the publication's JSON payload (which never holds a newline), the
same bytes a WebSocket subscriber gets.

The cursor (an event's ``id:``) resumes every topic of one stream. Its format
is opaque to clients and documented only here::

    cursor = "1" *( "." entry )          ; "1": the format's version
    entry  = topic-tag epoch-tag offset  ; one per topic of the stream
    topic-tag, epoch-tag = 6 base64url characters (36 bits of BLAKE2b)
    offset = decimal digits              ; the last offset the stream delivered

Tags keep the cursor short and URL-safe whatever the topic or epoch; an entry
is found by its topic's tag, so a cursor also serves a stream with more or
fewer topics than the one that produced it. An epoch is compared by its tag:
a cursor from another epoch is a gap, never a wrong recovery (but for a
2^-36 chance).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence

import orjson

__all__ = [
    "COMMENT",
    "CURSOR_VERSION",
    "CursorError",
    "close_event",
    "decode_cursor",
    "encode_cursor",
    "entry_tag",
    "event",
    "frame_batch",
    "frame_open",
    "id_line",
    "retry_field",
    "tag",
]

#: A heartbeat: a comment line, which EventSource ignores.
COMMENT = b":\n\n"
CURSOR_VERSION = "1"
_TAG_CHARS = 6
_ENTRY = re.compile(r"([A-Za-z0-9_-]{6})([A-Za-z0-9_-]{6})(0|[1-9][0-9]{0,18})")
#: Longest cursor accepted (a stream has at most a few hundred topics).
MAX_CURSOR = 16 * 1024


class CursorError(ValueError):
    """A ``Last-Event-ID`` or ``since`` that is not a cursor of this server."""


def frame_batch(payloads: Sequence[bytes]) -> bytes:
    """Complete events for *payloads* (replies, presence events), one buffer."""
    if len(payloads) == 1:
        return b"data: " + payloads[0] + b"\n\n"
    return b"".join([b"data: " + p + b"\n\n" for p in payloads])


def frame_open(payloads: Sequence[bytes]) -> bytes:
    """Events for a batch of publications, the last one left open: each
    subscriber ends it with its own ``id:`` line (:func:`id_line`), so the
    events are framed once for every subscriber."""
    if len(payloads) == 1:
        return b"data: " + payloads[0] + b"\n"
    return b"\n".join([b"data: " + p + b"\n" for p in payloads])


def id_line(cursor: bytes) -> bytes:
    """The line that ends an event :func:`frame_open` left open."""
    return b"id: " + cursor + b"\n\n"


def event(name: str, payload: bytes, cursor: bytes | None = None) -> bytes:
    """A named event (``event: gap``...), with an ``id:`` if *cursor* is given."""
    out = b"event: " + name.encode() + b"\ndata: " + payload + b"\n"
    if cursor is not None:
        out += b"id: " + cursor + b"\n"
    return out + b"\n"


def retry_field(milliseconds: int) -> bytes:
    """How long EventSource waits before it reconnects (an event of its own)."""
    return b"retry: %d\n\n" % milliseconds


def close_event(code: int, reason: str, retry_ms: int) -> bytes:
    """The last event of a stream the server ends: why, and when to come back."""
    payload = orjson.dumps({"code": code, "reason": reason})
    return b"event: close\ndata: " + payload + b"\nretry: %d\n\n" % retry_ms


# --- the cursor ---------------------------------------------------------------------


def tag(text: str) -> bytes:
    """The 6-character tag of a topic or an epoch."""
    digest = hashlib.blake2b(text.encode(), digest_size=6).digest()
    return base64.urlsafe_b64encode(digest)[:_TAG_CHARS]


def entry_tag(topic: str, epoch: str) -> bytes:
    """The fixed part of a topic's cursor entry: its topic tag and epoch tag."""
    return tag(topic) + tag(epoch)


def encode_cursor(tags: Sequence[bytes], offsets: Sequence[int]) -> bytes:
    """The cursor of entries ``tags[i]`` (from :func:`entry_tag`) at ``offsets[i]``."""
    if len(tags) == 1:  # the usual stream, and the fan-out's path: no list to build
        return b"1." + tags[0] + b"%d" % offsets[0]
    return b"1" + b"".join([b"." + t + b"%d" % o for t, o in zip(tags, offsets, strict=True)])


def decode_cursor(text: str) -> dict[bytes, tuple[bytes, int]]:
    """A cursor's entries: topic tag -> (entry tag, offset). Raises :class:`CursorError`.

    The entry tag (topic tag + epoch tag) is what :func:`entry_tag` gives for the
    topic in the epoch the cursor was made in: equal tags, same epoch."""
    if len(text) > MAX_CURSOR:
        raise CursorError(f"cursor over {MAX_CURSOR} characters")
    version, dot, rest = text.partition(".")
    if version != CURSOR_VERSION:
        raise CursorError("not a cursor of this server (unknown version); "
                          "send the id: of an event this server sent")
    entries: dict[bytes, tuple[bytes, int]] = {}
    if not dot:
        return entries
    for part in rest.split("."):
        match = _ENTRY.fullmatch(part)
        if match is None:
            raise CursorError(f"malformed cursor entry {part[:40]!r}")
        entries[match[1].encode()] = ((match[1] + match[2]).encode(), int(match[3]))
    return entries
