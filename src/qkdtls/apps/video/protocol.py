"""The call's framing, sans-I/O: a fixed header before every media unit, no acknowledgements.

Header (20 bytes, network order): magic ``QV``, version (1), type, sequence (u32, per type, +1 per frame
sent), capture timestamp (u64, microseconds since the Unix epoch), payload length (u32). The reference
client sent a header, 8 KiB chunks and then waited for an ``ACK`` per frame; that round trip capped it at
10 fps. Here frames follow each other without waiting; the sender drops stale frames instead.

Types: ``HELLO`` (JSON stream description), ``VIDEO`` (one JPEG), ``AUDIO`` (PCM16 little-endian, mono),
``BYE`` (end of call, empty).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"QV"
VERSION = 1
HEADER = struct.Struct("!2sBBIQI")


class FrameType(enum.IntEnum):
    HELLO = 1
    VIDEO = 2
    AUDIO = 3
    BYE = 4


# Bounds a peer cannot exceed: the decoder never buffers more than one such payload.
MAX_PAYLOAD = {
    FrameType.HELLO: 64 * 1024,
    FrameType.VIDEO: 16 * 1024 * 1024,
    FrameType.AUDIO: 1024 * 1024,
    FrameType.BYE: 0,
}


class VideoProtocolError(ValueError):
    """The peer sent something that is not a valid frame (bad magic, version, type or length)."""


@dataclass(frozen=True)
class Frame:
    type: FrameType
    sequence: int
    capture_us: int
    payload: bytes

    def __repr__(self) -> str:
        return f"Frame({self.type.name}, seq={self.sequence}, {len(self.payload)} bytes)"

    def json(self) -> Any:
        """The payload of a HELLO frame."""
        try:
            return json.loads(self.payload)
        except ValueError:
            raise VideoProtocolError("HELLO payload is not JSON") from None


def encode_header(ftype: FrameType, sequence: int, capture_us: int, length: int) -> bytes:
    if length > MAX_PAYLOAD[ftype]:
        raise ValueError(f"{ftype.name} payload of {length} bytes exceeds {MAX_PAYLOAD[ftype]}")
    return HEADER.pack(MAGIC, VERSION, ftype, sequence & 0xFFFFFFFF, capture_us, length)


def encode_frame(ftype: FrameType, sequence: int, capture_us: int, payload: bytes = b"") -> bytes:
    return encode_header(ftype, sequence, capture_us, len(payload)) + payload


def hello(description: dict[str, Any]) -> bytes:
    return encode_frame(FrameType.HELLO, 0, 0, json.dumps(description).encode())


class FrameDecoder:
    """Turns received bytes into frames; raises :class:`VideoProtocolError` on the first invalid header."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: tuple[FrameType, int, int, int] | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            if self._header is None:
                if len(self._buffer) < HEADER.size:
                    return frames
                self._header = self._parse(bytes(self._buffer[: HEADER.size]))
                del self._buffer[: HEADER.size]
            ftype, sequence, capture_us, length = self._header
            if len(self._buffer) < length:
                return frames
            payload = bytes(self._buffer[:length])
            del self._buffer[:length]
            self._header = None
            frames.append(Frame(ftype, sequence, capture_us, payload))

    @staticmethod
    def _parse(header: bytes) -> tuple[FrameType, int, int, int]:
        magic, version, raw_type, sequence, capture_us, length = HEADER.unpack(header)
        if magic != MAGIC:
            raise VideoProtocolError("bad magic: not a qkdtls video stream")
        if version != VERSION:
            raise VideoProtocolError(f"unsupported version {version}")
        try:
            ftype = FrameType(raw_type)
        except ValueError:
            raise VideoProtocolError(f"unknown frame type {raw_type}") from None
        if length > MAX_PAYLOAD[ftype]:
            raise VideoProtocolError(f"{ftype.name} frame of {length} bytes exceeds {MAX_PAYLOAD[ftype]}")
        return ftype, sequence, capture_us, length
