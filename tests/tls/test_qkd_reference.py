"""The reference profile's wire elements, byte-exact with the authors' rustls fork."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdtls.tls.alerts import (
    BadRecordMac,
    DecodeError,
    DecryptError,
    IllegalParameter,
    RecordOverflow,
    TLSAlert,
    UnexpectedMessage,
)
from qkdtls.tls.qkd_reference import (
    Challenge,
    QkdRequest,
    ReferenceProtection,
    decode_varint,
    encode_varint,
    open_challenge,
    seal_challenge,
    zigzag_decode,
    zigzag_encode,
)

UUID = "7b848ade-8cff-3d54-a9b8-53a215e6ee77"
KEY = bytes(range(32))
IV = bytes(range(12))

# The example of the reference notes §2.4: uuid, SAE 1, IV 00..0b.
VECTOR = bytes.fromhex(
    "24 37 62 38 34 38 61 64 65 2d 38 63 66 66 2d 33 64 35 34 2d 61 39 62 38 2d 35 33 61 32 31 35 65 36"
    " 65 65 37 37 02 00 01 02 03 04 05 06 07 08 09 0a 0b"
)


def test_fea6_vector_encodes_byte_exact() -> None:
    encoded = QkdRequest(UUID, 1, IV).encode()
    assert encoded == VECTOR
    assert len(encoded) == 50


def test_fea6_vector_decodes() -> None:
    request = QkdRequest.decode(VECTOR)
    assert (request.key_uuid, request.origin_sae_id, request.iv) == (UUID, 1, IV)
    assert IV.hex() not in repr(request)


@pytest.mark.parametrize(("value", "wire"), [(1, "02"), (3, "06"), (-1, "01"), (64, "8001"), (0, "00")])
def test_zigzag_varint_examples(value: int, wire: str) -> None:
    assert encode_varint(zigzag_encode(value)).hex() == wire
    raw, end = decode_varint(bytes.fromhex(wire), 0)
    assert zigzag_decode(raw) == value and end == len(wire) // 2


def test_varint_accepts_non_minimal_like_postcard_and_rejects_overflow() -> None:
    assert decode_varint(b"\x81\x00", 0) == (1, 2)
    with pytest.raises(DecodeError):
        decode_varint(b"\xff" * 9 + b"\x02", 0)  # tenth byte may carry one bit only
    with pytest.raises(DecodeError):
        decode_varint(b"\x80" * 11, 0)
    assert decode_varint(b"\xff" * 9 + b"\x01", 0) == (2**64 - 1, 10)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", DecodeError),
        (VECTOR[:-1], DecodeError),  # IV short
        (VECTOR + b"\x00", DecodeError),  # trailing byte
        (b"\x7f" + VECTOR[1:], DecodeError),  # length beyond the data
        (b"\x24" + b"\xff" * 36 + VECTOR[37:], DecodeError),  # not UTF-8
        (b"\x24" + UUID.upper().encode() + VECTOR[37:], IllegalParameter),  # not canonical
        (VECTOR[:37] + b"\x80" * 10 + IV, DecodeError),  # SAE varint too long
    ],
)
def test_fea6_malformed_raises_alert(data: bytes, error: type[TLSAlert]) -> None:
    with pytest.raises(error):
        QkdRequest.decode(data)


@given(st.binary(max_size=120))
def test_fea6_decoder_is_total(data: bytes) -> None:
    try:
        request = QkdRequest.decode(data)
    except (DecodeError, IllegalParameter):
        return
    assert request.encode() == data or QkdRequest.decode(request.encode()) == request


@given(st.integers(-(2**63), 2**63 - 1), st.binary(min_size=12, max_size=12))
def test_fea6_roundtrip_any_sae_id(sae: int, iv: bytes) -> None:
    request = QkdRequest(UUID, sae, iv)
    assert QkdRequest.decode(request.encode()) == request


def test_challenge_seal_is_81_bytes_and_opens_only_with_same_seq() -> None:
    challenge = Challenge.random()
    sealed = seal_challenge(KEY, IV, 0, challenge)
    assert len(sealed) == 81
    assert open_challenge(KEY, IV, 0, sealed) == challenge
    with pytest.raises(DecryptError):
        open_challenge(KEY, IV, 1, sealed)
    tampered = bytearray(sealed)
    tampered[5] ^= 1
    with pytest.raises(DecryptError):
        open_challenge(KEY, IV, 0, bytes(tampered))
    with pytest.raises(DecodeError):
        open_challenge(KEY, IV, 0, sealed[:-1])


def test_challenge_plaintext_layout_matches_fork() -> None:
    # The fork seals postcard(seed, token) || 0x50 with AAD 17 03 03 00 51 and nonce IV ^ seq.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    challenge = Challenge(seed=b"\x01" * 32, token=b"\x02" * 32)
    nonce = (int.from_bytes(IV, "big") ^ 1).to_bytes(12, "big")
    expected = AESGCM(KEY).encrypt(nonce, b"\x01" * 32 + b"\x02" * 32 + b"\x50", bytes.fromhex("1703030051"))
    assert seal_challenge(KEY, IV, 1, challenge) == expected


def test_challenge_answer_rule() -> None:
    challenge = Challenge.random()
    answer = challenge.answer()
    assert answer.token == challenge.token and answer.seed != challenge.seed
    assert challenge.is_answered_by(answer)
    assert not challenge.is_answered_by(challenge)  # echoing the seed is refused
    assert not challenge.is_answered_by(Challenge.random())


def test_reference_records_header_aad_and_nonce_reuse_across_directions() -> None:
    client_write, server_write = ReferenceProtection(KEY, IV), ReferenceProtection(KEY, IV)
    record = client_write.seal(0x17, b"hello")
    assert record[:3] == bytes.fromhex("170e00")
    assert int.from_bytes(record[3:5], "big") == len(record) - 5 == 5 + 1 + 16
    # The fork's defect, kept for compatibility: both directions use the same nonce sequence.
    client_write, server_write = ReferenceProtection(KEY, IV), ReferenceProtection(KEY, IV)
    client_write.nonces_used, server_write.nonces_used = [], []
    for _ in range(3):
        client_write.seal(0x17, b"a")
        server_write.seal(0x17, b"b")
    assert client_write.nonces_used == server_write.nonces_used
    assert len(set(client_write.nonces_used)) == 3


def test_reference_open_accepts_0e00_and_03xx_strips_padding() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    reader = ReferenceProtection(KEY, IV)
    body = AESGCM(KEY).encrypt(IV, b"data\x17\x00\x00", bytes.fromhex("170303") + (7 + 16).to_bytes(2, "big"))
    assert reader.open(0x17, 0x0303, body) == (0x17, b"data")
    sender = ReferenceProtection(KEY, IV)
    sender.seal(0x17, b"skip")  # advance to seq 1
    record = sender.seal(0x15, b"\x01\x00")
    assert reader.open(0x17, 0x0E00, record[5:]) == (0x15, b"\x01\x00")


def test_reference_open_errors() -> None:
    sender = ReferenceProtection(KEY, IV)
    record = sender.seal(0x17, b"x")
    with pytest.raises(BadRecordMac):
        ReferenceProtection(KEY, IV).open(0x17, 0x0E00, record[5:-1] + bytes([record[-1] ^ 1]))
    with pytest.raises(UnexpectedMessage):
        ReferenceProtection(KEY, IV).open(0x16, 0x0E00, record[5:])
    with pytest.raises(DecodeError):
        ReferenceProtection(KEY, IV).open(0x17, 0x0F00, record[5:])
    with pytest.raises(BadRecordMac):
        ReferenceProtection(KEY, IV).open(0x17, 0x0E00, b"\x00" * 16)
    with pytest.raises(RecordOverflow):
        ReferenceProtection(KEY, IV).open(0x17, 0x0E00, b"\x00" * (2**14 + 257))
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    only_padding = AESGCM(KEY).encrypt(IV, b"\x00\x00", bytes.fromhex("170303") + (18).to_bytes(2, "big"))
    with pytest.raises(UnexpectedMessage):
        ReferenceProtection(KEY, IV).open(0x17, 0x0E00, only_padding)


def test_reprs_hide_key_material() -> None:
    protection = ReferenceProtection(KEY, IV)
    challenge = Challenge.random()
    assert KEY.hex() not in repr(protection) and challenge.token.hex() not in repr(challenge)
