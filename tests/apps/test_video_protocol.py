"""The call's framing is a total decoder; the synthetic source draws what receivers and screenshots check."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdtls.apps.video.protocol import (
    HEADER,
    MAX_PAYLOAD,
    FrameDecoder,
    FrameType,
    VideoProtocolError,
    encode_frame,
    hello,
)
from qkdtls.apps.video.sources import BARS, CountingSink, JpegEncoder, TestPattern, ToneSource, decode_jpeg


def test_frames_round_trip_in_any_split() -> None:
    stream = hello({"width": 4}) + encode_frame(FrameType.VIDEO, 7, 123, b"jpeg") + encode_frame(
        FrameType.AUDIO, 0, 456, b"\x01\x02"
    ) + encode_frame(FrameType.BYE, 0, 789)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [f.type for f in frames] == [FrameType.HELLO, FrameType.VIDEO, FrameType.AUDIO, FrameType.BYE]
        assert frames[0].json() == {"width": 4}
        assert (frames[1].sequence, frames[1].capture_us, frames[1].payload) == (7, 123, b"jpeg")
        assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (HEADER.pack(b"XX", 1, 2, 0, 0, 0), "magic"),
        (HEADER.pack(b"QV", 9, 2, 0, 0, 0), "version"),
        (HEADER.pack(b"QV", 1, 77, 0, 0, 0), "type"),
        (HEADER.pack(b"QV", 1, 3, 0, 0, MAX_PAYLOAD[FrameType.AUDIO] + 1), "exceeds"),
        (HEADER.pack(b"QV", 1, 4, 0, 0, 1), "exceeds"),
    ],
)
def test_invalid_headers_are_rejected_before_buffering(header: bytes, message: str) -> None:
    with pytest.raises(VideoProtocolError, match=message):
        FrameDecoder().feed(header)


def test_hello_must_be_json() -> None:
    (frame,) = FrameDecoder().feed(encode_frame(FrameType.HELLO, 0, 0, b"{not json"))
    with pytest.raises(VideoProtocolError):
        frame.json()


def test_encoder_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError):
        encode_frame(FrameType.BYE, 0, 0, b"x")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_decoder_is_total(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        for chunk in chunks:
            decoder.feed(chunk)
    except VideoProtocolError:
        pass


def test_pattern_shows_bars_and_moves() -> None:
    pattern = TestPattern()
    first, later = pattern.grab(0, 0.0), pattern.grab(30, 1.0)
    assert first.size == (1280, 720)
    for (x, y), colour in zip(pattern.bar_centres(), BARS, strict=True):
        assert first.getpixel((x, y)) == colour
    assert first.tobytes() != later.tobytes()  # box and counter moved


def test_jpeg_round_trip_keeps_the_bars() -> None:
    pattern = TestPattern()
    picture = decode_jpeg(JpegEncoder(quality=50).encode(pattern.grab(5, 0.0)))
    assert picture.size == (1280, 720)
    for (x, y), colour in zip(pattern.bar_centres(), BARS, strict=True):
        assert max(abs(a - b) for a, b in zip(picture.getpixel((x, y)), colour, strict=True)) <= 8
    with pytest.raises(ValueError):
        decode_jpeg(b"\xff\xd8 not really a jpeg")


def test_tone_is_real_time_pcm16() -> None:
    tone = ToneSource(rate=8000, chunk_ms=10)
    chunks = [tone.read() for _ in range(5)]
    assert all(len(c) == 160 for c in chunks)
    sink = CountingSink()
    for chunk in chunks:
        sink.play(chunk)
    assert sink.chunks == 5
    assert 0.15 * 32767 < sink.peak <= 0.2 * 32767 + 1
