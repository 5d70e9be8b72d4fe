"""TLS 1.3 handshake messages (RFC 8446 §4). ``encode()`` gives the body, ``decode(body)`` is total
(DecodeError / IllegalParameter), ``to_bytes()`` adds the 4-byte handshake header the transcript hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Self

from .alerts import DecodeError, IllegalParameter
from .buffer import Reader, Writer
from .extensions import Extension, decode_extensions, encode_extensions
from .records import encode_handshake


class HandshakeType(IntEnum):
    client_hello = 1
    server_hello = 2
    new_session_ticket = 4
    end_of_early_data = 5
    encrypted_extensions = 8
    certificate = 11
    certificate_request = 13
    certificate_verify = 15
    finished = 20
    key_update = 24
    qkd_rekey = 0xFE   # secure-profile post-handshake message (only once 0xFEA8 was negotiated)
    # message_hash (§4.4.1) is also 254 but never appears on the wire, only in the transcript.


# SHA-256("HelloRetryRequest"), the ServerHello.random of a HelloRetryRequest (§4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
# Last 8 bytes of a TLS 1.3 server's random when it negotiated an older version (§4.1.3).
DOWNGRADE_TLS12 = bytes.fromhex("444f574e47524401")
DOWNGRADE_TLS11 = bytes.fromhex("444f574e47524400")
LEGACY_VERSION = 0x0303


class HandshakeMessage:
    msg_type: ClassVar[int]

    def encode(self) -> bytes:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return encode_handshake(self.msg_type, self.encode())


@dataclass
class ClientHello(HandshakeMessage):
    msg_type: ClassVar[int] = HandshakeType.client_hello
    random: bytes
    legacy_session_id: bytes
    cipher_suites: list[int]
    extensions: list[Extension]
    legacy_version: int = LEGACY_VERSION
    legacy_compression_methods: bytes = b"\x00"

    def encode(self) -> bytes:
        w = Writer().u16(self.legacy_version).raw(self.random).opaque8(self.legacy_session_id)
        w.u16_list(self.cipher_suites).opaque8(self.legacy_compression_methods)
        encode_extensions(w, self.extensions)
        return w.getvalue()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = Reader(body)
        legacy_version = r.u16()
        random = r.raw(32)
        session_id = r.opaque8(max_len=32)
        suites = r.u16_list(min_items=1)
        compression = r.opaque8(min_len=1)
        # A ClientHello without extensions is a pre-TLS 1.3 hello; it still decodes.
        extensions = [] if r.eof() else decode_extensions(r)
        r.expect_end("ClientHello")
        return cls(random, session_id, suites, extensions, legacy_version, compression)


@dataclass
class ServerHello(HandshakeMessage):
    """ServerHello, or a HelloRetryRequest when ``random`` is :data:`HRR_RANDOM`."""

    msg_type: ClassVar[int] = HandshakeType.server_hello
    random: bytes
    legacy_session_id_echo: bytes
    cipher_suite: int
    extensions: list[Extension]
    legacy_version: int = LEGACY_VERSION
    legacy_compression_method: int = 0

    @property
    def is_hello_retry_request(self) -> bool:
        return self.random == HRR_RANDOM

    def encode(self) -> bytes:
        w = Writer().u16(self.legacy_version).raw(self.random).opaque8(self.legacy_session_id_echo)
        w.u16(self.cipher_suite).u8(self.legacy_compression_method)
        encode_extensions(w, self.extensions)
        return w.getvalue()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = Reader(body)
        legacy_version = r.u16()
        random = r.raw(32)
        session_id = r.opaque8(max_len=32)
        suite = r.u16()
        compression = r.u8()
        extensions = [] if r.eof() else decode_extensions(r)
        r.expect_end("ServerHello")
        return cls(random, session_id, suite, extensions, legacy_version, compression)


@dataclass
class EncryptedExtensions(HandshakeMessage):
    msg_type: ClassVar[int] = HandshakeType.encrypted_extensions
    extensions: list[Extension] = field(default_factory=list)

    def encode(self) -> bytes:
        w = Writer()
        encode_extensions(w, self.extensions)
        return w.getvalue()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = Reader(body)
        extensions = decode_extensions(r)
        r.expect_end("EncryptedExtensions")
        return cls(extensions)


@dataclass
class CertificateEntry:
    cert_data: bytes
    extensions: list[Extension] = field(default_factory=list)


@dataclass
class Certificate(HandshakeMessage):
    msg_type: ClassVar[int] = HandshakeType.certificate
    certificate_request_context: bytes = b""
    entries: list[CertificateEntry] = field(default_factory=list)

    def encode(self) -> bytes:
        entries = Writer()
        for entry in self.entries:
            entries.opaque24(entry.cert_data)
            encode_extensions(entries, entry.extensions)
        return Writer().opaque8(self.certificate_request_context).opaque24(entries.getvalue()).getvalue()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = Reader(body)
        context = r.opaque8()
        block = r.sub24()
        r.expect_end("Certificate")
        entries: list[CertificateEntry] = []
        while not block.eof():
            cert = block.opaque24(min_len=1)
            entries.append(CertificateEntry(cert, decode_extensions(block)))
        return cls(context, entries)


@dataclass
class CertificateRequest(HandshakeMessage):
    msg_type: ClassVar[int] = HandshakeType.certificate_request
    certificate_request_context: bytes = b""
    extensions: list[Extension] = field(default_factory=list)

    def encode(self) -> bytes:
        w = Writer().opaque8(self.certificate_request_context)
        encode_extensions(w, self.extensions)
        return w.getvalue()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = Reader(body)
        context = r.opaque8()
        extensions = decode_extensions(r)
        r.expect_end("CertificateRequest")
        return cls(context, extensions)


@dataclass
class CertificateVerify(HandshakeMessage):
    msg_type: ClassVar[int] = HandshakeType.certificate_verify
    algorithm: int
    signature: bytes

    def encode(self) -> bytes:
        return Writer().u16(self.algorithm).opaque16(self.signature).getvalue()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = Reader(body)
        algorithm = r.u16()
        signature = r.opaque16(min_len=1)
        r.expect_end("CertificateVerify")
        return cls(algorithm, signature)


@dataclass
class Finished(HandshakeMessage):
    msg_type: ClassVar[int] = HandshakeType.finished
    verify_data: bytes

    def __repr__(self) -> str:
        return f"Finished(<{len(self.verify_data)} bytes>)"

    def encode(self) -> bytes:
        return self.verify_data

    @classmethod
    def decode(cls, body: bytes, hash_length: int | None = None) -> Self:
        if hash_length is not None and len(body) != hash_length:
            raise DecodeError("Finished of the wrong length")
        if not body:
            raise DecodeError("empty Finished")
        return cls(body)


@dataclass
class NewSessionTicket(HandshakeMessage):
    msg_type: ClassVar[int] = HandshakeType.new_session_ticket
    ticket_lifetime: int
    ticket_age_add: int
    ticket_nonce: bytes
    ticket: bytes
    extensions: list[Extension] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"NewSessionTicket(lifetime={self.ticket_lifetime})"

    def encode(self) -> bytes:
        w = Writer().u32(self.ticket_lifetime).u32(self.ticket_age_add).opaque8(self.ticket_nonce)
        w.opaque16(self.ticket)
        encode_extensions(w, self.extensions)
        return w.getvalue()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = Reader(body)
        lifetime = r.u32()
        age_add = r.u32()
        nonce = r.opaque8()
        ticket = r.opaque16(min_len=1)
        extensions = decode_extensions(r)
        r.expect_end("NewSessionTicket")
        if lifetime > 604800:
            raise IllegalParameter("ticket lifetime above seven days")
        return cls(lifetime, age_add, nonce, ticket, extensions)


class KeyUpdateRequest(IntEnum):
    update_not_requested = 0
    update_requested = 1


@dataclass
class KeyUpdate(HandshakeMessage):
    msg_type: ClassVar[int] = HandshakeType.key_update
    request_update: KeyUpdateRequest = KeyUpdateRequest.update_not_requested

    def encode(self) -> bytes:
        return bytes((int(self.request_update),))

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = Reader(body)
        value = r.u8()
        r.expect_end("KeyUpdate")
        try:
            return cls(KeyUpdateRequest(value))
        except ValueError:
            raise IllegalParameter("KeyUpdate request_update out of range") from None
