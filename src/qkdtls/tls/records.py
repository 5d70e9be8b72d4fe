"""TLS 1.3 record layer (RFC 8446 §5): framing, size limits, protection and handshake reassembly.

Record protection is pluggable (:class:`RecordProtection`) so the reference profile's 0x0E00 records use
the same framing as standard AEAD records. Limits enforced here: a plaintext record body ≤ 2^14 bytes, a
protected body ≤ 2^14 + 256 and its inner plaintext ≤ 2^14 + 1 (record_overflow); unknown content types
and misplaced change_cipher_spec records are unexpected_message; zero-length handshake and alert records
are rejected (§5.1, §5.4).

Bulk data is the hot path, so copies and large allocations are counted: each AEAD record is sealed straight
into its own buffer and queued as it is (:class:`Outgoing`; adapters write the buffers with one scatter/gather
call), and received bytes are parsed in place (:meth:`RecordLayer.borrowing`): only an incomplete record at
the end of a read is copied, and plaintext is decrypted into a buffer the receiver then owns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from cryptography.exceptions import InvalidTag

from .alerts import BadRecordMac, DecodeError, InternalError, RecordOverflow, UnexpectedMessage
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
_TAG_LENGTH = 16
# Header, content type byte and tag around each record's plaintext.
_RECORD_OVERHEAD = HEADER_LENGTH + 1 + _TAG_LENGTH
_APPLICATION_DATA_TLS12 = bytes((23, 3, 3))

Bytes = bytes | bytearray | memoryview


def record_header(content_type: int, version: int, length: int) -> bytes:
    return bytes((content_type,)) + version.to_bytes(2, "big") + length.to_bytes(2, "big")


class RecordProtection(Protocol):
    """One direction's record protection."""

    def seal(self, content_type: int, data: bytes) -> bytes:
        """A whole record (header included) carrying ``data`` of ``content_type``."""
        ...

    def open(self, outer_type: int, version: int, body: bytes) -> tuple[int, bytes | bytearray]:
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

    def seal(self, content_type: int, data: Bytes) -> bytes:
        """One record; the path of handshake messages and alerts, which are small (no scratch buffers)."""
        length = len(data)
        if length > MAX_PLAINTEXT:
            raise InternalError("record plaintext longer than 2^14")
        header = _APPLICATION_DATA_TLS12 + (length + 1 + _TAG_LENGTH).to_bytes(2, "big")
        return header + self._aead.encrypt(self._next_nonce(), bytes(data) + bytes((content_type,)), header)

    def seal_records(self, content_type: int, data: Bytes) -> list[bytearray]:
        """Records carrying ``data`` (fragmented to 2^14 bytes), each sealed straight into its own buffer."""
        view = memoryview(data).cast("B")
        size = len(view)
        # The inner plaintext (content, then its type) is assembled in a scratch buffer so that encrypt_into
        # never reads and writes the same memory.
        scratch = bytearray(min(size, MAX_PLAINTEXT) + 1)
        scratch_view = memoryview(scratch)
        encrypt_into = self._aead.encrypt_into
        records = []
        for start in range(0, max(size, 1), MAX_PLAINTEXT):
            piece = view[start : start + MAX_PLAINTEXT]
            length = len(piece)
            header = _APPLICATION_DATA_TLS12 + (length + 1 + _TAG_LENGTH).to_bytes(2, "big")
            scratch_view[:length] = piece
            scratch[length] = content_type
            record = bytearray(length + _RECORD_OVERHEAD)
            record[:HEADER_LENGTH] = header
            encrypt_into(
                self._next_nonce(), scratch_view[: length + 1], header, memoryview(record)[HEADER_LENGTH:]
            )
            records.append(record)
        return records

    def open(self, outer_type: int, version: int, body: Bytes) -> tuple[int, bytes | bytearray]:
        if outer_type != APPLICATION_DATA:
            raise UnexpectedMessage("unprotected record after keys were established")
        if len(body) > MAX_CIPHERTEXT:
            raise RecordOverflow("protected record longer than 2^14 + 256")
        if len(body) < 17:
            raise BadRecordMac("protected record too short")
        return self.open_record(record_header(outer_type, version, len(body)), body)

    def open_record(self, header: Bytes, body: Bytes) -> tuple[int, bytes | bytearray]:
        """:meth:`open` given the record's 5-byte header as received (it is the AEAD's additional data);
        the caller has checked that the body is 17 to 2^14 + 256 bytes long."""
        inner = bytearray(len(body) - _TAG_LENGTH)
        try:
            self._aead.decrypt_into(self._next_nonce(), body, header, inner)
        except InvalidTag:
            raise BadRecordMac("record authentication failed") from None
        content_type = inner[-1]
        if content_type:
            # No padding (what every peer we know sends): drop the type byte in place, no copy.
            del inner[-1]
            if len(inner) > MAX_PLAINTEXT:
                raise RecordOverflow("inner plaintext longer than 2^14 + 1")
            return content_type, inner
        return split_inner_plaintext(bytes(inner))


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
    to the caller without going through the read protection (the reference profile's 0x50 record), each
    with the record version it must carry (decode_error otherwise).

    Incoming bytes are either copied in (:meth:`feed`) or lent for the duration of a ``with``
    (:meth:`borrowing`); whatever is not consumed when the loan ends is copied then.
    """

    def __init__(self) -> None:
        # Owned bytes not yet framed: an incomplete record, or records the caller has not asked for yet.
        self._incoming = bytearray()
        # Lent bytes (see borrowing) and how far they are consumed; always after _incoming in stream order.
        self._lent: memoryview = memoryview(b"")
        self._lent_at = 0
        # A record application_data_run decrypted but did not return (not application data inside).
        self._opened: tuple[int, bytes | bytearray] | None = None
        self.read: RecordProtection = PlaintextProtection()
        self.write: RecordProtection = PlaintextProtection()
        self.allow_ccs = False
        self.allow_plaintext_alerts = True
        self.raw_types: dict[int, int] = {}   # content type -> the one record version it may carry
        # (type, version, body) of every framed record, for tracing
        self.on_record: Callable[[int, int, bytes], None] | None = None

    @property
    def buffered(self) -> int:
        return len(self._incoming) + len(self._lent) - self._lent_at

    def feed(self, data: Bytes) -> None:
        """Buffer a copy of ``data``."""
        self._keep_lent()
        self._incoming += data

    @contextmanager
    def borrowing(self, data: Bytes) -> Iterator[None]:
        """Frame records straight out of ``data`` (no copy) inside the ``with``; the rest is copied at exit.

        The caller may reuse ``data``'s memory afterwards: no record handed out refers to it (protected
        records are decrypted into fresh buffers, anything else is copied).
        """
        self._keep_lent()
        self._lent = memoryview(data).cast("B")
        self._lent_at = 0
        try:
            yield
        finally:
            self._keep_lent()

    def _keep_lent(self) -> None:
        if self._lent_at < len(self._lent):
            self._incoming += self._lent[self._lent_at :]
        self._lent = memoryview(b"")
        self._lent_at = 0

    def _next_frame(self) -> tuple[int, int, Bytes] | None:
        """(type, version, body) of the next whole record; the body may be a view of lent memory."""
        incoming = self._incoming
        if incoming:
            # Complete the owned partial record from the lent bytes, taking no more than it needs.
            if len(incoming) < HEADER_LENGTH:
                self._take_lent(HEADER_LENGTH - len(incoming))
                if len(incoming) < HEADER_LENGTH:
                    return None
            length = self._check_header(incoming[0], incoming[3] << 8 | incoming[4])
            missing = HEADER_LENGTH + length - len(incoming)
            if missing > 0:
                self._take_lent(missing)
                if len(incoming) < HEADER_LENGTH + length:
                    return None
            version = incoming[1] << 8 | incoming[2]
            outer_type = incoming[0]
            body = bytes(incoming[HEADER_LENGTH : HEADER_LENGTH + length])
            del incoming[: HEADER_LENGTH + length]
            return outer_type, version, body
        lent, at = self._lent, self._lent_at
        if len(lent) - at < HEADER_LENGTH:
            return None
        length = self._check_header(lent[at], lent[at + 3] << 8 | lent[at + 4])
        end = at + HEADER_LENGTH + length
        if end > len(lent):
            return None
        self._lent_at = end
        return lent[at], lent[at + 1] << 8 | lent[at + 2], lent[at + HEADER_LENGTH : end]

    def _take_lent(self, limit: int) -> None:
        taken = self._lent[self._lent_at : self._lent_at + limit]
        self._incoming += taken
        self._lent_at += len(taken)

    def _check_header(self, outer_type: int, length: int) -> int:
        if outer_type not in STANDARD_TYPES and outer_type not in self.raw_types:
            raise UnexpectedMessage(f"unknown record content type {outer_type}")
        if length > MAX_CIPHERTEXT:
            raise RecordOverflow("record longer than 2^14 + 256")
        return length

    def application_data_run(self) -> list[bytes | bytearray]:
        """Plaintexts of the protected application-data records at the head of the lent bytes (bulk path).

        Stops at the first record that is incomplete, not protected application data outside, or something
        else inside; a record it decrypted but did not return is kept for :meth:`next_record`. Call it only
        where application data is acceptable; other records and every error go the general way.
        """
        read = self.read
        if self._incoming or self._opened is not None or type(read) is not AeadProtection:
            return []
        if self.on_record is not None:
            return []
        lent, at = self._lent, self._lent_at
        available = len(lent)
        plaintexts: list[bytes | bytearray] = []
        # Bounded by the lent bytes: each pass consumes one whole record.
        while available - at >= HEADER_LENGTH and lent[at] == APPLICATION_DATA:
            length = lent[at + 3] << 8 | lent[at + 4]
            end = at + HEADER_LENGTH + length
            if end > available or not 17 <= length <= MAX_CIPHERTEXT:
                break
            self._lent_at = end
            header, body = lent[at : at + HEADER_LENGTH], lent[at + HEADER_LENGTH : end]
            content_type, plaintext = read.open_record(header, body)
            at = end
            if content_type != APPLICATION_DATA:
                self._opened = self._checked(content_type, plaintext)
                break
            plaintexts.append(plaintext)
        return plaintexts

    def next_record(self) -> tuple[int, bytes | bytearray] | None:
        """The next (content type, plaintext), or None until a whole record is buffered."""
        if self._opened is not None:
            record, self._opened = self._opened, None
            return record
        # Bounded: every pass either returns or consumes one whole record from the buffer.
        while (frame := self._next_frame()) is not None:
            outer_type, version, lent_body = frame
            read = self.read
            if isinstance(read, AeadProtection) and outer_type == APPLICATION_DATA and self.on_record is None:
                # The bulk path: decrypted from the (possibly lent) bytes into a fresh buffer.
                return self._checked(*read.open(outer_type, version, lent_body))
            body = bytes(lent_body)
            if self.on_record is not None:
                self.on_record(outer_type, version, body)
            if outer_type == CHANGE_CIPHER_SPEC:
                if self.allow_ccs and body == b"\x01":
                    continue
                raise UnexpectedMessage("change_cipher_spec outside the handshake")
            if outer_type in self.raw_types:
                if version != self.raw_types[outer_type]:
                    # As rustls (and so the fork) treats a record version it does not accept.
                    raise DecodeError(f"record of type {outer_type:#x} with version {version:#06x}")
                return outer_type, body
            if outer_type == ALERT and getattr(read, "protected", True):
                # A peer that failed before it had our keys alerts in plaintext; report what it said.
                if self.allow_plaintext_alerts and len(body) == 2:
                    return ALERT, body
                raise UnexpectedMessage("unprotected alert after keys were established")
            return self._checked(*read.open(outer_type, version, body))
        return None

    @staticmethod
    def _checked(content_type: int, plaintext: bytes | bytearray) -> tuple[int, bytes | bytearray]:
        if content_type not in STANDARD_TYPES or content_type == CHANGE_CIPHER_SPEC:
            raise UnexpectedMessage(f"unexpected inner content type {content_type}")
        if not plaintext and content_type in (HANDSHAKE, ALERT):
            raise UnexpectedMessage("zero-length handshake or alert record")
        return content_type, plaintext

    def seal(self, content_type: int, data: Bytes) -> bytes | bytearray:
        """Records carrying ``data``, fragmented to 2^14 bytes each, in one buffer."""
        write = self.write
        if type(write) is AeadProtection and 0 < len(data) <= MAX_PLAINTEXT:
            return write.seal(content_type, data)   # one record: no fragmenting, no scratch buffer
        records = self.seal_each(content_type, data)
        return records[0] if len(records) == 1 else b"".join(records)

    def seal_each(self, content_type: int, data: Bytes) -> list[bytes | bytearray]:
        """Records carrying ``data``, each in its own buffer (for scatter/gather sending)."""
        write = self.write
        if isinstance(write, AeadProtection):
            return list(write.seal_records(content_type, data))
        if not data:
            return [write.seal(content_type, b"")]
        view = memoryview(data).cast("B")
        return [
            write.seal(content_type, bytes(view[start : start + MAX_PLAINTEXT]))
            for start in range(0, len(view), MAX_PLAINTEXT)
        ]


class Outgoing:
    """Bytes queued for the peer, kept in the buffers they were sealed in.

    Bulk data is sealed record by record into buffers of about 16 KiB; joining them into one large buffer
    would cost an allocation the size of the batch (page faults, on this kind of machine more than the
    encryption). Adapters that can write several buffers at once take them as they are (:meth:`take`).
    """

    def __init__(self) -> None:
        self._parts: list[bytes | bytearray] = []

    def __bool__(self) -> bool:
        return bool(self._parts)

    def __iadd__(self, data: Bytes) -> Outgoing:
        if data:
            self._parts.append(data if not isinstance(data, memoryview) else bytes(data))
        return self

    def extend(self, parts: list[bytes | bytearray]) -> None:
        self._parts.extend(parts)

    def take(self) -> list[bytes | bytearray]:
        """Everything queued, in order; the caller owns the buffers."""
        parts, self._parts = self._parts, []
        return parts

    def take_joined(self) -> bytes:
        parts = self.take()
        return b"".join(parts)


def encode_handshake(msg_type: int, body: bytes) -> bytes:
    if len(body) >= 1 << 24:
        raise ValueError("handshake message body longer than 2^24 - 1 bytes")
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


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
