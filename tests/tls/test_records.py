"""Record layer: framing, size limits, CCS rules, AEAD protection and handshake reassembly."""

from __future__ import annotations

import os

import pytest

from qkdtls.tls.alerts import BadRecordMac, DecodeError, InternalError, RecordOverflow, UnexpectedMessage
from qkdtls.tls.records import (
    ALERT,
    APPLICATION_DATA,
    COMPAT_CCS_RECORD,
    HANDSHAKE,
    MAX_PLAINTEXT,
    AeadProtection,
    HandshakeBuffer,
    RecordLayer,
    encode_handshake,
    record_header,
)
from qkdtls.tls.suites import CipherSuite

SUITE = CipherSuite.TLS_AES_128_GCM_SHA256


def _pair(suite: CipherSuite = SUITE) -> tuple[RecordLayer, RecordLayer]:
    key, iv = os.urandom(16 if suite == SUITE else 32), os.urandom(12)
    sender, receiver = RecordLayer(), RecordLayer()
    sender.write = AeadProtection(suite, key, iv)
    receiver.read = AeadProtection(suite, key, iv)
    return sender, receiver


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_protected_roundtrip_fragments_at_2_14(suite: CipherSuite) -> None:
    sender, receiver = _pair(suite)
    data = os.urandom(MAX_PLAINTEXT * 2 + 10)
    receiver.feed(sender.seal(APPLICATION_DATA, data))
    got = b""
    while (record := receiver.next_record()) is not None:
        assert record[0] == APPLICATION_DATA and len(record[1]) <= MAX_PLAINTEXT
        got += record[1]
    assert got == data


def test_byte_by_byte_feeding() -> None:
    sender, receiver = _pair()
    wire = sender.seal(HANDSHAKE, b"\x14\x00\x00\x01x")
    for i, byte in enumerate(wire):
        receiver.feed(bytes([byte]))
        record = receiver.next_record()
        assert (record is None) == (i < len(wire) - 1)


def test_tampering_is_bad_record_mac() -> None:
    sender, receiver = _pair()
    wire = bytearray(sender.seal(APPLICATION_DATA, b"secret"))
    wire[-3] ^= 0x80
    receiver.feed(bytes(wire))
    with pytest.raises(BadRecordMac):
        receiver.next_record()


def test_padding_is_stripped_and_all_zero_is_unexpected() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    sealer = AeadProtection(SUITE, key, iv)
    opener = AeadProtection(SUITE, key, iv)
    inner = b"data" + bytes([APPLICATION_DATA]) + bytes(5)   # content, type, zero padding (§5.4)
    padded = sealer._aead.encrypt(sealer._next_nonce(), inner, record_header(23, 0x0303, len(inner) + 16))
    assert opener.open(23, 0x0303, padded) == (APPLICATION_DATA, b"data")
    all_zero = sealer._aead.encrypt(sealer._next_nonce(), bytes(8), record_header(23, 0x0303, 24))
    with pytest.raises(UnexpectedMessage):
        opener.open(23, 0x0303, all_zero)


def test_size_limits() -> None:
    layer = RecordLayer()
    layer.feed(record_header(HANDSHAKE, 0x0303, MAX_PLAINTEXT + 1) + bytes(MAX_PLAINTEXT + 1))
    with pytest.raises(RecordOverflow):
        layer.next_record()
    layer = RecordLayer()
    layer.feed(record_header(APPLICATION_DATA, 0x0303, MAX_PLAINTEXT + 257))
    with pytest.raises(RecordOverflow):
        layer.next_record()


def test_unknown_content_type_and_ccs_rules() -> None:
    layer = RecordLayer()
    layer.feed(b"\x63\x03\x03\x00\x01\x00")
    with pytest.raises(UnexpectedMessage):
        layer.next_record()
    layer = RecordLayer()
    layer.allow_ccs = True
    layer.feed(COMPAT_CCS_RECORD + record_header(HANDSHAKE, 0x0303, 1) + b"\x01")
    assert layer.next_record() == (HANDSHAKE, b"\x01")
    layer.allow_ccs = False
    layer.feed(COMPAT_CCS_RECORD)
    with pytest.raises(UnexpectedMessage):
        layer.next_record()
    layer = RecordLayer()
    layer.allow_ccs = True
    layer.feed(b"\x14\x03\x03\x00\x01\x02")
    with pytest.raises(UnexpectedMessage):
        layer.next_record()


def test_zero_length_handshake_record_is_unexpected() -> None:
    sender, receiver = _pair()
    receiver.feed(sender.seal(HANDSHAKE, b""))
    with pytest.raises(UnexpectedMessage):
        receiver.next_record()


def test_plaintext_application_data_refused() -> None:
    layer = RecordLayer()
    layer.feed(record_header(APPLICATION_DATA, 0x0303, 1) + b"x")
    with pytest.raises(UnexpectedMessage):
        layer.next_record()


def test_plaintext_alert_after_keys_is_reported() -> None:
    _, receiver = _pair()
    receiver.feed(record_header(ALERT, 0x0303, 2) + b"\x02\x28")
    assert receiver.next_record() == (ALERT, b"\x02\x28")


def test_sequence_number_never_wraps() -> None:
    protection = AeadProtection(SUITE, os.urandom(16), os.urandom(12))
    protection.sequence = (1 << 64) - 1
    with pytest.raises(InternalError):
        protection.seal(APPLICATION_DATA, b"x")


def test_handshake_buffer_reassembles_and_detects_spanning() -> None:
    message = encode_handshake(1, b"hello")
    buffer = HandshakeBuffer()
    buffer.add(message[:3])
    assert buffer.next_message() is None
    with pytest.raises(UnexpectedMessage):
        buffer.require_empty()
    buffer.add(message[3:] + message)
    assert buffer.next_message() == (1, b"hello", message)
    assert buffer.next_message() == (1, b"hello", message)
    buffer.require_empty()
    big = HandshakeBuffer(max_message=10)
    big.add(b"\x0b\x00\x01\x00")
    with pytest.raises(DecodeError):
        big.next_message()
