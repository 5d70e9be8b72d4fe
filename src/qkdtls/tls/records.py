"""TLS 1.3 record layer (RFC 8446 §5): framing, size limits, protection and handshake reassembly.

Record protection is pluggable (:class:`RecordProtection`) so the reference profile's 0x0E00 records use
the same framing as standard AEAD records. Limits enforced here: a plaintext record body ≤ 2^14 bytes, a
protected body ≤ 2^14 + 256 and its inner plaintext ≤ 2^14 + 1 (record_overflow); unknown content types
and misplaced change_cipher_spec records are unexpected_message; zero-length handshake and alert records
are rejected (§5.1, §5.4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidTag

from .alerts import BadRecordMac, DecodeError, InternalError, RecordOverflow, UnexpectedMessage
from .buffer import Writer
from .suites import CipherSuite, params

CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23
STANDARD_TYPES = frozenset({CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA})

MAX_PLAINTEXT = 1 << 14
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256
HEADER_LENGTH = 5
TLS12 = 0x0303
TLS10 = 0x0301
# The single record a TLS 1.3 peer in middlebox-compatibility mode sends once (§D.4).
COMPAT_CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"
# A handshake message larger than this is refused: certificate chains of a few certificates fit easily.
MAX_HANDSHAKE_MESSAGE = 1 << 17
_SEQUENCE_LIMIT = (1 << 64) - 1


def record_header(content_type: int, version: int, length: int) -> bytes:
    return bytes((content_type,)) + version.to_bytes(2, "big") + length.to_bytes(2, "big")


class RecordProtection(Protocol):
    """One direction's record protection."""

    def seal(self, content_type: int, data: bytes) -> bytes:
        """A whole record (header included) carrying ``data`` of ``content_type``."""
        ...

    def open(self, outer_type: int, version: int, body: bytes) -> tuple[int, bytes]:
        """(inner content type, plaintext) of a received record."""
        ...


class PlaintextProtection:
    """No protection: the initial state of both directions."""

    protected = False

    def __init__(self, version: int = TLS12) -> None:
        self.version = version

    def seal(self, content_type: int, data: bytes) -> bytes:
        return record_header(content_type, self.version, len(data)) + data

    def open(self, outer_type: int, version: int, body: bytes) -> tuple[int, bytes]:
        if len(body) > MAX_PLAINTEXT:
            raise RecordOverflow("plaintext record longer than 2^14")
        if outer_type == APPLICATION_DATA:
            raise UnexpectedMessage("application data before keys are established")
        return outer_type, body


class AeadProtection:
    """Standard TLS 1.3 AEAD protection (§5.2, §5.3) with an implicit per-direction sequence number.

    The sequence number never wraps: the last value is refused so no nonce can repeat under one key.
    """

    protected = True

    def __init__(self, suite: CipherSuite, key: bytes, iv: bytes) -> None:
        suite_params = params(suite)
        if len(key) != suite_params.key_length or len(iv) != suite_params.iv_length:
            raise InternalError("traffic key or IV of the wrong length")
        self.suite = suite_params.suite
        self._aead = suite_params.aead(key)
        self._iv = int.from_bytes(iv, "big")
        self._iv_length = len(iv)
        self.sequence = 0

    def __repr__(self) -> str:
        return f"AeadProtection({self.suite.name}, sequence={self.sequence})"

    def _next_nonce(self) -> bytes:
        if self.sequence >= _SEQUENCE_LIMIT:
            raise InternalError("record sequence number exhausted; a KeyUpdate was due")
        nonce = (self._iv ^ self.sequence).to_bytes(self._iv_length, "big")
        self.sequence += 1
        return nonce

    def seal(self, content_type: int, data: bytes) -> bytes:
        if len(data) > MAX_PLAINTEXT:
            raise InternalError("record plaintext longer than 2^14")
        inner = data + bytes((content_type,))
        header = record_header(APPLICATION_DATA, TLS12, len(inner) + 16)
        return header + self._aead.encrypt(self._next_nonce(), inner, header)

    def open(self, outer_type: int, version: int, body: bytes) -> tuple[int, bytes]:
        if outer_type != APPLICATION_DATA:
            raise UnexpectedMessage("unprotected record after keys were established")
        if len(body) > MAX_CIPHERTEXT:
            raise RecordOverflow("protected record longer than 2^14 + 256")
        if len(body) < 17:
            raise BadRecordMac("protected record too short")
        header = record_header(outer_type, version, len(body))
        try:
            inner = self._aead.decrypt(self._next_nonce(), body, header)
        except InvalidTag:
            raise BadRecordMac("record authentication failed") from None
        return split_inner_plaintext(inner)


def split_inner_plaintext(inner: bytes) -> tuple[int, bytes]:
    """TLSInnerPlaintext → (content type, content): strip zero padding (§5.4)."""
    stripped = inner.rstrip(b"\x00")
    if not stripped:
        raise UnexpectedMessage("protected record without a content type")
    if len(stripped) > MAX_PLAINTEXT + 1:
        raise RecordOverflow("inner plaintext longer than 2^14 + 1")
    return stripped[-1], stripped[:-1]


class RecordLayer:
    """Frames the incoming byte stream into records and protects outgoing data.

    ``allow_ccs`` is True while a TLS 1.3 handshake is in progress: an unprotected ``14 03 03 00 01 01``
    is then dropped, anything else of type 20 is unexpected_message. ``raw_types`` are content types handed
    to the caller without going through the read protection (the reference profile's 0x50 record).
    """

    def __init__(self) -> None:
        self._incoming = bytearray()
        self.read: RecordProtection = PlaintextProtection()
        self.write: RecordProtection = PlaintextProtection()
        self.allow_ccs = False
        self.allow_plaintext_alerts = True
        self.raw_types: frozenset[int] = frozenset()
        # (type, version, body) of every framed record, for tracing
        self.on_record: Callable[[int, int, bytes], None] | None = None

    @property
    def buffered(self) -> int:
        return len(self._incoming)

    def feed(self, data: bytes) -> None:
        self._incoming += data

    def next_record(self) -> tuple[int, bytes] | None:
        """The next (content type, plaintext), or None until a whole record is buffered."""
        # Bounded: every pass either returns or consumes one whole record from the buffer.
        while len(self._incoming) >= HEADER_LENGTH:
            outer_type = self._incoming[0]
            version = int.from_bytes(self._incoming[1:3], "big")
            length = int.from_bytes(self._incoming[3:5], "big")
            if outer_type not in STANDARD_TYPES and outer_type not in self.raw_types:
                raise UnexpectedMessage(f"unknown record content type {outer_type}")
            if length > MAX_CIPHERTEXT:
                raise RecordOverflow("record longer than 2^14 + 256")
            if len(self._incoming) < HEADER_LENGTH + length:
                return None
            body = bytes(self._incoming[HEADER_LENGTH : HEADER_LENGTH + length])
            del self._incoming[: HEADER_LENGTH + length]
            if self.on_record is not None:
                self.on_record(outer_type, version, body)
            if outer_type == CHANGE_CIPHER_SPEC:
                if self.allow_ccs and body == b"\x01":
                    continue
                raise UnexpectedMessage("change_cipher_spec outside the handshake")
            if outer_type in self.raw_types:
                return outer_type, body
            if outer_type == ALERT and getattr(self.read, "protected", True):
                # A peer that failed before it had our keys alerts in plaintext; report what it said.
                if self.allow_plaintext_alerts and len(body) == 2:
                    return ALERT, body
                raise UnexpectedMessage("unprotected alert after keys were established")
            content_type, plaintext = self.read.open(outer_type, version, body)
            if content_type not in STANDARD_TYPES or content_type == CHANGE_CIPHER_SPEC:
                raise UnexpectedMessage(f"unexpected inner content type {content_type}")
            if not plaintext and content_type in (HANDSHAKE, ALERT):
                raise UnexpectedMessage("zero-length handshake or alert record")
            return content_type, plaintext
        return None

    def seal(self, content_type: int, data: bytes) -> bytes:
        """Records carrying ``data``, fragmented to 2^14 bytes each."""
        if not data:
            return self.write.seal(content_type, b"")
        out = bytearray()
        for start in range(0, len(data), MAX_PLAINTEXT):
            out += self.write.seal(content_type, data[start : start + MAX_PLAINTEXT])
        return bytes(out)


def encode_handshake(msg_type: int, body: bytes) -> bytes:
    return Writer().u8(msg_type).opaque24(body).getvalue()


class HandshakeBuffer:
    """Reassembles handshake messages that records split or coalesce (§5.1)."""

    def __init__(self, max_message: int = MAX_HANDSHAKE_MESSAGE) -> None:
        self._buffer = bytearray()
        self._max = max_message

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def add(self, fragment: bytes) -> None:
        self._buffer += fragment

    def next_message(self) -> tuple[int, bytes, bytes] | None:
        """(type, body, whole message with its header), or None until one is complete."""
        if len(self._buffer) < 4:
            return None
        length = int.from_bytes(self._buffer[1:4], "big")
        if length > self._max:
            raise DecodeError(f"handshake message of {length} bytes exceeds the limit")
        if len(self._buffer) < 4 + length:
            return None
        raw = bytes(self._buffer[: 4 + length])
        del self._buffer[: 4 + length]
        return raw[0], raw[4:], raw

    def require_empty(self) -> None:
        """Handshake messages must not span a key change (§5.1)."""
        if self._buffer:
            raise UnexpectedMessage("handshake message spans a key change")
