"""The secure profile's PSK identity, rekey derivation and QkdRekey message."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from hypothesis import given
from hypothesis import strategies as st

from qkdtls.tls.alerts import DecodeError, IllegalParameter
from qkdtls.tls.key_schedule import hkdf_expand_label, hkdf_extract
from qkdtls.tls.qkd_secure import QkdRekey, parse_psk_identity, psk_identity, rekeyed_secret

UUID = "8844cba7-29e1-3251-a50a-25da13e65eea"


def test_identity_is_ascii_and_roundtrips() -> None:
    identity = psk_identity(-7, UUID)
    assert identity == b"qkd1:-7:" + UUID.encode()
    assert parse_psk_identity(identity) == (-7, UUID)


@pytest.mark.parametrize(
    "identity",
    [
        b"",
        b"Client_identity",
        b"qkd1:",
        b"qkd1:1",
        b"qkd1:01:" + UUID.encode(),  # leading zero: two spellings for one key are refused
        b"qkd1:+1:" + UUID.encode(),
        b"qkd1: 1:" + UUID.encode(),
        b"qkd1:1:" + UUID.upper().encode(),
        b"qkd1:1:" + UUID.encode() + b"x",
        b"qkd1:9223372036854775808:" + UUID.encode(),  # beyond i64
        b"qkd1:\xff:" + UUID.encode(),
        b"qkd2:1:" + UUID.encode(),
    ],
)
def test_foreign_or_malformed_identity_is_not_ours(identity: bytes) -> None:
    assert parse_psk_identity(identity) is None


@given(st.binary(max_size=80))
def test_identity_parser_is_total(identity: bytes) -> None:
    parsed = parse_psk_identity(identity)
    if parsed is not None:
        assert psk_identity(*parsed) == identity


def test_identity_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        psk_identity(2**63, UUID)
    with pytest.raises(ValueError):
        psk_identity(1, "not-a-uuid")


def test_rekey_derivation_matches_the_documented_formula() -> None:
    sha = hashes.SHA384()
    current, new_key = b"\x11" * 48, b"\x22" * 32
    expected = hkdf_expand_label(sha, hkdf_extract(sha, current, new_key), b"qkd c ap", b"", 48)
    assert rekeyed_secret(sha, current, new_key, client=True) == expected
    assert rekeyed_secret(sha, current, new_key, client=False) != expected
    assert rekeyed_secret(sha, current, b"\x23" * 32, client=True) != expected


def test_qkd_rekey_codec() -> None:
    assert QkdRekey(UUID).encode() == bytes([36]) + UUID.encode()
    assert QkdRekey.decode(QkdRekey(UUID).encode()) == QkdRekey(UUID)
    assert QkdRekey.decode(b"\x00").is_ack
    for bad in (b"", b"\x05abc", b"\x00\x00"):
        with pytest.raises(DecodeError):
            QkdRekey.decode(bad)
    with pytest.raises(IllegalParameter):
        QkdRekey.decode(b"\x03abc")


@given(st.binary(max_size=300))
def test_qkd_rekey_decoder_is_total(body: bytes) -> None:
    try:
        message = QkdRekey.decode(body)
    except (DecodeError, IllegalParameter):
        return
    assert message.encode() == body
