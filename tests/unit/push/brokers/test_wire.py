"""The embedded broker's frames: byte for byte, whatever the chunking, and bounded."""

from __future__ import annotations

import struct

import pytest

from trioserve.push.brokers.wire import MAX_FRAME, MAX_HEADER, FrameError, FrameReader, encode_frame


def test_a_frame_is_two_lengths_a_json_header_and_the_raw_payload() -> None:
    frame = encode_frame(["m", "news", 42], b'{"op":"pub"}')
    head = b'["m","news",42]'
    assert frame == struct.pack(">II", len(head), 12) + head + b'{"op":"pub"}'


def test_frames_come_out_whole_whatever_the_chunks() -> None:
    frames = [(["pub", i, "t"], b'{"n":%d}' % i) for i in range(50)] + [(["sync", 99], b"")]
    data = b"".join(encode_frame(h, p) for h, p in frames)
    for size in (1, 3, 7, 64, len(data)):
        reader = FrameReader()
        out = []
        for i in range(0, len(data), size):
            out += reader.feed(data[i:i + size])
        assert out == frames, size
        assert reader.buffered == 0


def test_a_large_frame_in_many_chunks_is_parsed_once_it_is_complete() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = encode_frame(["m", "t", 1], payload)
    reader = FrameReader()
    for i in range(0, len(data) - 1, 65536):
        assert reader.feed(data[i:min(i + 65536, len(data) - 1)]) == []
    assert reader.feed(data[-1:]) == [(["m", "t", 1], payload)]


@pytest.mark.parametrize("head", [
    struct.pack(">II", MAX_HEADER + 1, 0),
    struct.pack(">II", 2, MAX_FRAME + 1),
])
def test_a_frame_over_the_limits_is_refused_before_it_is_buffered(head: bytes) -> None:
    with pytest.raises(FrameError, match="frame too large"):
        FrameReader().feed(head)


@pytest.mark.parametrize("header", [b"{not json", b"{}", b"[]", b"7"])
def test_a_header_that_is_not_a_json_array_is_refused(header: bytes) -> None:
    with pytest.raises(FrameError, match="bad frame header"):
        FrameReader().feed(struct.pack(">II", len(header), 0) + header)


def test_encoding_refuses_a_payload_over_the_limit() -> None:
    with pytest.raises(FrameError):
        encode_frame(["m", "t", 1], b"x" * (MAX_FRAME + 1))
