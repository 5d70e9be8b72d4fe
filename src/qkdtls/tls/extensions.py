"""TLS extensions (RFC 8446 §4.2): the ordered container and codecs of the extensions TLS 1.3 uses.

Extensions stay in wire order and unknown ones keep their raw bytes, so a message re-encodes to exactly
what was received (the transcript and the PSK binder depend on it). Every decoder is total.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from .alerts import DecodeError, IllegalParameter
from .buffer import Reader, Writer


class ExtensionType(IntEnum):
    server_name = 0
    max_fragment_length = 1
    status_request = 5
    supported_groups = 10
    ec_point_formats = 11
    signature_algorithms = 13
    use_srtp = 14
    heartbeat = 15
    application_layer_protocol_negotiation = 16
    signed_certificate_timestamp = 18
    padding = 21
    encrypt_then_mac = 22
    extended_master_secret = 23
    record_size_limit = 28
    session_ticket = 35
    pre_shared_key = 41
    early_data = 42
    supported_versions = 43
    cookie = 44
    psk_key_exchange_modes = 45
    certificate_authorities = 47
    oid_filters = 48
    post_handshake_auth = 49
    signature_algorithms_cert = 50
    key_share = 51
    renegotiation_info = 0xFF01
    qkd_reference_request = 0xFEA6     # reference profile, ClientHello: postcard(key_ID, SAE ID, IV)
    qkd_reference_ack = 0xFEA7         # reference profile, ServerHello: the encrypted challenge
    qkd_rekey = 0xFEA8                 # secure profile between qkdtls peers: in-connection QKD rekeying
    qkd_key_announce = 0xFEA9          # secure profile between qkdtls peers: keys announced for later


ET = ExtensionType
TLS13 = 0x0304
_EXT_HEADER = struct.Struct(">HH")
PSK_DHE_KE = 1
PSK_KE = 0


class Extension(NamedTuple):
    """One extension in wire order. A named tuple rather than a dataclass: a ClientHello carries about ten
    of them and each handshake decodes and builds them, so construction has to be cheap."""

    type: int
    data: bytes = b""

    def __repr__(self) -> str:
        try:
            name = ExtensionType(self.type).name
        except ValueError:
            name = hex(self.type)
        return f"Extension({name}, {len(self.data)} bytes)"


def decode_extensions(reader: Reader) -> list[Extension]:
    """The extensions<..2^16-1> vector; a repeated type is illegal_parameter (§4.2)."""
    block = reader.opaque16()
    end = len(block)
    out: list[Extension] = []
    seen: set[int] = set()
    pos = 0
    # Bounded: every pass consumes at least the four bytes of an extension header.
    while pos < end:
        if pos + 4 > end:
            raise DecodeError("truncated extension header")
        ext_type = block[pos] << 8 | block[pos + 1]
        start = pos + 4
        pos = start + (block[pos + 2] << 8 | block[pos + 3])
        if pos > end:
            raise DecodeError("extension longer than its vector")
        if ext_type in seen:
            raise IllegalParameter(f"duplicate extension {ext_type:#x}")
        seen.add(ext_type)
        out.append(Extension(ext_type, block[start:pos]))
    return out


def encode_extensions(writer: Writer, extensions: Iterable[Extension]) -> None:
    parts: list[bytes] = []
    for ext_type, data in extensions:
        if len(data) > 0xFFFF:
            raise ValueError("extension data longer than 2^16 - 1 bytes")
        parts.append(_EXT_HEADER.pack(ext_type, len(data)))
        parts.append(data)
    writer.opaque16(b"".join(parts))


def find(extensions: Sequence[Extension], ext_type: int) -> bytes | None:
    for ext in extensions:
        if ext.type == ext_type:
            return ext.data
    return None


def _done(reader: Reader, what: str) -> None:
    reader.expect_end(what)


# server_name (RFC 6066 §3)
def encode_server_name(host: str) -> bytes:
    name = Writer().u8(0).opaque16(host.encode("ascii")).getvalue()
    return Writer().opaque16(name).getvalue()


def decode_server_name(data: bytes) -> str | None:
    """The host_name of a ClientHello's server_name; empty data (a server's acknowledgment) → None."""
    if not data:
        return None
    reader = Reader(data)
    names = reader.sub16(min_len=1)
    _done(reader, "server_name")
    host: str | None = None
    while not names.eof():
        name_type = names.u8()
        name = names.opaque16(min_len=1)
        if name_type == 0:
            if host is not None:
                raise IllegalParameter("two host names in server_name")
            try:
                host = name.decode("ascii")
            except UnicodeDecodeError:
                raise DecodeError("server_name is not ASCII") from None
    return host


# uint16 lists: supported_groups, signature_algorithms(_cert)
def encode_u16_list(values: Sequence[int]) -> bytes:
    return Writer().u16_list(list(values)).getvalue()


def decode_u16_list(data: bytes) -> list[int]:
    reader = Reader(data)
    values = reader.u16_list(min_items=1)
    _done(reader, "list")
    return values


# supported_versions (§4.2.1)
def encode_supported_versions_client(versions: Sequence[int]) -> bytes:
    return Writer().u16_list(list(versions), prefix=1).getvalue()


def decode_supported_versions_client(data: bytes) -> list[int]:
    reader = Reader(data)
    values = reader.u16_list(prefix=1, min_items=1)
    _done(reader, "supported_versions")
    return values


def encode_supported_versions_server(version: int) -> bytes:
    return Writer().u16(version).getvalue()


def decode_supported_versions_server(data: bytes) -> int:
    reader = Reader(data)
    version = reader.u16()
    _done(reader, "supported_versions")
    return version


# key_share (§4.2.8)
def encode_key_share_client(shares: Sequence[tuple[int, bytes]]) -> bytes:
    entries = b"".join(encode_key_share_server(group, key) for group, key in shares)
    return Writer().opaque16(entries).getvalue()


def decode_key_share_client(data: bytes) -> list[tuple[int, bytes]]:
    reader = Reader(data)
    block = reader.sub16()
    _done(reader, "key_share")
    shares: list[tuple[int, bytes]] = []
    groups: set[int] = set()
    while not block.eof():
        group = block.u16()
        key = block.opaque16(min_len=1)
        if group in groups:
            raise IllegalParameter("two key shares for one group")
        groups.add(group)
        shares.append((group, key))
    return shares


def encode_key_share_server(group: int, key: bytes) -> bytes:
    """One KeyShareEntry (also each entry of the client's list)."""
    if len(key) > 0xFFFF:
        raise ValueError("key share longer than 2^16 - 1 bytes")
    return _EXT_HEADER.pack(group, len(key)) + key


def decode_key_share_server(data: bytes) -> tuple[int, bytes]:
    reader = Reader(data)
    group = reader.u16()
    key = reader.opaque16(min_len=1)
    _done(reader, "key_share")
    return group, key


def encode_key_share_hrr(group: int) -> bytes:
    return Writer().u16(group).getvalue()


def decode_key_share_hrr(data: bytes) -> int:
    reader = Reader(data)
    group = reader.u16()
    _done(reader, "key_share")
    return group


# psk_key_exchange_modes (§4.2.9)
def encode_psk_modes(modes: Sequence[int]) -> bytes:
    return Writer().opaque8(bytes(modes)).getvalue()


def decode_psk_modes(data: bytes) -> list[int]:
    reader = Reader(data)
    modes = reader.opaque8(min_len=1)
    _done(reader, "psk_key_exchange_modes")
    return list(modes)


# pre_shared_key (§4.2.11)
@dataclass(frozen=True)
class PskIdentity:
    identity: bytes
    obfuscated_ticket_age: int = 0


@dataclass(frozen=True)
class OfferedPsks:
    identities: tuple[PskIdentity, ...]
    binders: tuple[bytes, ...]

    def __repr__(self) -> str:
        return f"OfferedPsks({len(self.identities)} identities)"

    def encode(self) -> bytes:
        ids = Writer()
        for psk in self.identities:
            ids.opaque16(psk.identity).u32(psk.obfuscated_ticket_age)
        return Writer().opaque16(ids.getvalue()).raw(encode_binders(self.binders)).getvalue()

    @classmethod
    def decode(cls, data: bytes) -> OfferedPsks:
        reader = Reader(data)
        id_block = reader.sub16(min_len=7)
        identities: list[PskIdentity] = []
        while not id_block.eof():
            identities.append(PskIdentity(id_block.opaque16(min_len=1), id_block.u32()))
        binder_block = reader.sub16(min_len=33)
        _done(reader, "pre_shared_key")
        binders: list[bytes] = []
        while not binder_block.eof():
            binders.append(binder_block.opaque8(min_len=32))
        if len(binders) != len(identities):
            raise IllegalParameter("PSK identities and binders differ in number")
        return cls(tuple(identities), tuple(binders))


def encode_binders(binders: Sequence[bytes]) -> bytes:
    inner = Writer()
    for binder in binders:
        inner.opaque8(binder)
    return Writer().opaque16(inner.getvalue()).getvalue()


def binders_length(binders: Sequence[bytes]) -> int:
    """Bytes the binders list takes at the end of a ClientHello (the part a binder does not cover)."""
    return 2 + sum(1 + len(b) for b in binders)


def encode_selected_identity(index: int) -> bytes:
    return Writer().u16(index).getvalue()


def decode_selected_identity(data: bytes) -> int:
    reader = Reader(data)
    index = reader.u16()
    _done(reader, "pre_shared_key")
    return index


# application_layer_protocol_negotiation (RFC 7301)
def encode_alpn(protocols: Sequence[str]) -> bytes:
    inner = Writer()
    for protocol in protocols:
        raw = protocol.encode("utf-8")
        if not 1 <= len(raw) <= 255:
            raise ValueError("ALPN protocol names are 1..255 bytes")
        inner.opaque8(raw)
    return Writer().opaque16(inner.getvalue()).getvalue()


def decode_alpn(data: bytes) -> list[bytes]:
    reader = Reader(data)
    block = reader.sub16(min_len=2)
    _done(reader, "ALPN")
    names: list[bytes] = []
    while not block.eof():
        names.append(block.opaque8(min_len=1))
    return names


# cookie (§4.2.2)
def encode_cookie(cookie: bytes) -> bytes:
    return Writer().opaque16(cookie).getvalue()


def decode_cookie(data: bytes) -> bytes:
    reader = Reader(data)
    cookie = reader.opaque16(min_len=1)
    _done(reader, "cookie")
    return cookie
