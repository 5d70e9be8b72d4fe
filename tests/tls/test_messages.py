"""Handshake message codecs: exact round trips of RFC 8448 messages and typed errors on bad input."""

from __future__ import annotations

import pytest
from tests.tls import rfc8448 as v

from qkdtls.tls import extensions as ext
from qkdtls.tls.alerts import DecodeError, IllegalParameter
from qkdtls.tls.messages import (
    HRR_RANDOM,
    Certificate,
    CertificateRequest,
    CertificateVerify,
    ClientHello,
    EncryptedExtensions,
    Finished,
    HandshakeType,
    KeyUpdate,
    KeyUpdateRequest,
    NewSessionTicket,
    ServerHello,
)

H = bytes.fromhex
CODECS = {
    HandshakeType.client_hello: ClientHello,
    HandshakeType.server_hello: ServerHello,
    HandshakeType.encrypted_extensions: EncryptedExtensions,
    HandshakeType.certificate: Certificate,
    HandshakeType.certificate_verify: CertificateVerify,
    HandshakeType.finished: Finished,
}


@pytest.mark.parametrize("message", v.MESSAGES)
def test_rfc8448_messages_roundtrip(message: str) -> None:
    raw = H(message)
    decoded = CODECS[HandshakeType(raw[0])].decode(raw[4:])
    assert decoded.to_bytes() == raw


def test_client_hello_fields() -> None:
    hello = ClientHello.decode(H(v.CLIENT_HELLO)[4:])
    assert hello.cipher_suites == [0x1301, 0x1303, 0x1302]
    assert ext.decode_server_name(ext.find(hello.extensions, ext.ET.server_name) or b"") == "server"
    shares = ext.decode_key_share_client(ext.find(hello.extensions, ext.ET.key_share) or b"")
    assert shares[0][0] == 0x001D and len(shares[0][1]) == 32
    assert ext.decode_supported_versions_client(
        ext.find(hello.extensions, ext.ET.supported_versions) or b""
    ) == [0x0304]


def test_server_hello_and_hrr() -> None:
    hello = ServerHello.decode(H(v.SERVER_HELLO)[4:])
    assert not hello.is_hello_retry_request and hello.cipher_suite == 0x1301
    share = ext.Extension(ext.ET.key_share, ext.encode_key_share_hrr(0x17))
    hrr = ServerHello(HRR_RANDOM, b"", 0x1301, [share])
    assert ServerHello.decode(hrr.encode()).is_hello_retry_request


def test_duplicate_extension_is_illegal_parameter() -> None:
    hello = ClientHello.decode(H(v.CLIENT_HELLO)[4:])
    hello.extensions.append(hello.extensions[0])
    with pytest.raises(IllegalParameter):
        ClientHello.decode(hello.encode())


@pytest.mark.parametrize("cut", [1, 5, 40, 100])
def test_truncated_client_hello_is_decode_error(cut: int) -> None:
    with pytest.raises(DecodeError):
        ClientHello.decode(H(v.CLIENT_HELLO)[4:-cut])


def test_trailing_bytes_are_decode_error() -> None:
    with pytest.raises(DecodeError):
        EncryptedExtensions.decode(H(v.ENCRYPTED_EXTENSIONS)[4:] + b"\x00")


def test_key_update_values() -> None:
    assert KeyUpdate.decode(b"\x01").request_update is KeyUpdateRequest.update_requested
    with pytest.raises(IllegalParameter):
        KeyUpdate.decode(b"\x02")
    with pytest.raises(DecodeError):
        KeyUpdate.decode(b"")


def test_other_messages_roundtrip() -> None:
    ticket = NewSessionTicket(7200, 1, b"\x00", b"ticket")
    assert NewSessionTicket.decode(ticket.encode()) == ticket
    schemes = ext.Extension(ext.ET.signature_algorithms, ext.encode_u16_list([0x0403]))
    request = CertificateRequest(b"", [schemes])
    assert CertificateRequest.decode(request.encode()) == request
    assert Certificate.decode(Certificate().encode()).entries == []
    with pytest.raises(DecodeError):
        Finished.decode(b"\x01" * 31, hash_length=32)
    assert "bytes" in repr(Finished(b"\x01" * 32))


def test_psk_extension_roundtrip_and_binder_length() -> None:
    offered = ext.OfferedPsks((ext.PskIdentity(b"qkd1:1:x", 0),), (b"\x07" * 48,))
    data = offered.encode()
    assert ext.OfferedPsks.decode(data) == offered
    assert data.endswith(ext.encode_binders(offered.binders))
    assert ext.binders_length(offered.binders) == 2 + 1 + 48
    with pytest.raises(DecodeError):
        ext.OfferedPsks.decode(data[:-1])
