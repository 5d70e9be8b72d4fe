"""The ``reference`` TLS-QKD profile: byte-for-byte the wire format of the authors' rustls fork.

**This profile is insecure and opt-in.** It exists only to interoperate with the published prototype.
The raw QKD key and one 12-byte IV protect the server's challenge (sequence 0), the client's answer
(sequence 1) and the application data of *both* directions, each direction restarting at sequence 0.
AES-GCM nonces therefore repeat across directions, which leaks the XOR of plaintexts and the GHASH key
(forgeries become possible). A replayed ClientHello makes the server encrypt a fresh challenge under an
already used nonce. Use the ``secure`` profile (:mod:`qkdtls.tls.qkd_secure`) for anything else.

Wire elements (see the project's reference notes, sections 2.3 to 2.7 and 2.12):

* ClientHello extension 0xFEA6 = postcard ``{key_uuid: String, origin_sae_id: i64, iv: [u8; 12]}``;
* ServerHello extension 0xFEA7 = the sealed challenge (81 bytes, sequence 0);
* the client's ChallengeAck: a *plaintext* record of content type 0x50 and version 0x0E00 whose body is the
  sealed answer (81 bytes, sequence 1);
* application records ``17 0E 00 len`` sealed with AES-256-GCM under the raw key, AAD always ``17 03 03 len``.

postcard is written by hand here because it is a handful of rules (varints, zig-zag) and no maintained Python
implementation exists; the decoder is total (the fork panics on malformed input, this one raises a TLS alert).
"""

from __future__ import annotations

import hmac
import os
import uuid
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .alerts import (
    BadRecordMac,
    DecodeError,
    DecryptError,
    IllegalParameter,
    InternalError,
    RecordOverflow,
    UnexpectedMessage,
)

EXT_QKD_REQUEST = 0xFEA6
EXT_QKD_CHALLENGE = 0xFEA7
CONTENT_TYPE_CHALLENGE = 0x50
RECORD_VERSION_QKD = 0x0E00
CONTENT_TYPE_APPLICATION_DATA = 0x17

KEY_LEN = 32
IV_LEN = 12
SEED_LEN = 32
TOKEN_LEN = 32
CHALLENGE_LEN = SEED_LEN + TOKEN_LEN
TAG_LEN = 16
SEALED_CHALLENGE_LEN = CHALLENGE_LEN + 1 + TAG_LEN  # challenge || 0x50 || tag = 81

MAX_PLAINTEXT = 2**14
MAX_CIPHERTEXT = 2**14 + 256
_MAX_SEQ = 2**64 - 1
_VARINT_MAX_BYTES = 10  # a u64 varint; postcard accepts at most 0x01 in the tenth byte
_MAX_UUID_TEXT = 255

# ----------------------------------------------------------------------------------------------------
# postcard primitives


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128 as postcard writes ``usize``/``u64``."""
    if not 0 <= value <= _MAX_SEQ:
        raise ValueError("varint out of range")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); mirrors postcard 1.x, which also accepts non-minimal encodings."""
    value = 0
    for i in range(_VARINT_MAX_BYTES):
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i == _VARINT_MAX_BYTES - 1 and byte > 0x01:
                raise DecodeError("varint overflows 64 bits")
            return value, pos
    raise DecodeError("varint longer than 10 bytes")


def zigzag_encode(value: int) -> int:
    if not -(2**63) <= value < 2**63:
        raise ValueError("i64 out of range")
    return ((value << 1) ^ (value >> 63)) & _MAX_SEQ


def zigzag_decode(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


# ----------------------------------------------------------------------------------------------------
# 0xFEA6: the client's key announcement


@dataclass(frozen=True, slots=True)
class QkdRequest:
    """Content of the 0xFEA6 ClientHello extension. ``origin_sae_id`` is the *client's* (master's) SAE ID."""

    key_uuid: str
    origin_sae_id: int
    iv: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.iv) != IV_LEN:
            raise ValueError("the reference IV is 12 bytes")
        if not -(2**63) <= self.origin_sae_id < 2**63:
            raise ValueError("SAE IDs are signed 64-bit integers")

    def encode(self) -> bytes:
        text = self.key_uuid.encode("utf-8")
        return encode_varint(len(text)) + text + encode_varint(zigzag_encode(self.origin_sae_id)) + self.iv

    @classmethod
    def decode(cls, data: bytes) -> QkdRequest:
        """Total decoder: malformed postcard → DecodeError; a key ID that is not a canonical UUID →
        IllegalParameter. Trailing bytes are refused (the fork never sends any)."""
        length, pos = decode_varint(data, 0)
        if length > _MAX_UUID_TEXT or pos + length > len(data):
            raise DecodeError("bad key_uuid length in 0xFEA6")
        raw = data[pos : pos + length]
        pos += length
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("key_uuid in 0xFEA6 is not UTF-8") from None
        zz, pos = decode_varint(data, pos)
        if len(data) - pos != IV_LEN:
            raise DecodeError("0xFEA6 IV must be exactly 12 bytes")
        iv = data[pos:]
        if not _is_canonical_uuid(text):
            raise IllegalParameter("key_uuid in 0xFEA6 is not a canonical UUID")
        return cls(key_uuid=text, origin_sae_id=zigzag_decode(zz), iv=iv)

    @classmethod
    def create(cls, key_uuid: str, origin_sae_id: int, iv: bytes | None = None) -> QkdRequest:
        """A request with a fresh random IV (as the fork draws one per connection) unless ``iv`` is given."""
        return cls(key_uuid=key_uuid, origin_sae_id=origin_sae_id, iv=iv or os.urandom(IV_LEN))


# Salt of the IV derivation below: its own, so the derived value is unrelated to the TLS 1.3 early secret
# (HKDF-Extract with a zero salt) that the same key gives in the secure profile.
_SECURE_OFFER_SALT = b"qkdtls 0xFEA6 IV: the secure profile is offered too"


def secure_offer_iv(key: bytes) -> bytes:
    """The 0xFEA6 IV of a client that offers the secure profile in the same ClientHello.

    The fork's server takes any IV, so the IV can carry one fact without breaking interoperability: an IV
    equal to this value (a PRF of the QKD key, so only the master and the slave can compute or check it, and
    a random IV matches with probability 2^-96) tells a server that the client also offered the key as a
    secure-profile PSK. A server that serves the secure profile and sees this IV in a ClientHello without a
    usable PSK knows the offer was stripped on the way and refuses the reference profile. An attacker cannot
    replace the IV either: the server seals its challenge under it and the client opens it under its own.

    The IV is public in both profiles; deriving it from a single-use key repeats no (key, nonce) pair that a
    random IV would avoid.
    """
    hkdf = HKDF(algorithm=hashes.SHA256(), length=IV_LEN, salt=_SECURE_OFFER_SALT, info=b"")
    return hkdf.derive(key)


def _is_canonical_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------
# The challenge (0xFEA7 and the ChallengeAck record)


@dataclass(frozen=True, slots=True)
class Challenge:
    """postcard ``{random_seed: [u8; 32], challenge: [u8; 32]}``: seed first, then token."""

    seed: bytes = field(repr=False)
    token: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_LEN or len(self.token) != TOKEN_LEN:
            raise ValueError("seed and token are 32 bytes each")

    @classmethod
    def random(cls) -> Challenge:
        return cls(seed=os.urandom(SEED_LEN), token=os.urandom(TOKEN_LEN))

    def encode(self) -> bytes:
        return self.seed + self.token

    @classmethod
    def decode(cls, data: bytes) -> Challenge:
        if len(data) != CHALLENGE_LEN:
            raise DecodeError("a QKD challenge is 64 bytes")
        return cls(seed=data[:SEED_LEN], token=data[SEED_LEN:])

    def answer(self) -> Challenge:
        """The client's answer: same token, a fresh seed different from ours."""
        for _ in range(8):  # a collision of 256 random bits never happens; the bound keeps the loop finite
            seed = os.urandom(SEED_LEN)
            if seed != self.seed:
                return Challenge(seed=seed, token=self.token)
        raise InternalError("random generator returned the same seed repeatedly")

    def is_answered_by(self, other: Challenge) -> bool:
        """The fork's acceptance rule: equal token and a different seed (compared in constant time)."""
        same_token = hmac.compare_digest(self.token, other.token)
        same_seed = hmac.compare_digest(self.seed, other.seed)
        return same_token and not same_seed


def _nonce(iv: bytes, seq: int) -> bytes:
    return (int.from_bytes(iv, "big") ^ seq).to_bytes(IV_LEN, "big")


def _aad(ciphertext_len: int) -> bytes:
    # The fork's make_tls13_aad: always 17 03 03, whatever the record header says.
    return bytes((CONTENT_TYPE_APPLICATION_DATA, 3, 3)) + ciphertext_len.to_bytes(2, "big")


def _check_key(key: bytes, iv: bytes) -> None:
    if len(key) != KEY_LEN or len(iv) != IV_LEN:
        raise InternalError("reference profile needs a 32-byte key and a 12-byte IV")


def seal_challenge(key: bytes, iv: bytes, seq: int, challenge: Challenge) -> bytes:
    """81 bytes: AES-256-GCM(key, iv ^ seq, aad=17 03 03 00 51, challenge || 0x50)."""
    _check_key(key, iv)
    plaintext = challenge.encode() + bytes((CONTENT_TYPE_CHALLENGE,))
    return AESGCM(key).encrypt(_nonce(iv, seq), plaintext, _aad(SEALED_CHALLENGE_LEN))


def open_challenge(key: bytes, iv: bytes, seq: int, sealed: bytes) -> Challenge:
    """Inverse of :func:`seal_challenge`. A wrong tag → DecryptError (the handshake proof failed)."""
    _check_key(key, iv)
    if len(sealed) != SEALED_CHALLENGE_LEN:
        raise DecodeError("a sealed QKD challenge is 81 bytes")
    try:
        plaintext = AESGCM(key).decrypt(_nonce(iv, seq), sealed, _aad(len(sealed)))
    except InvalidTag:
        raise DecryptError("QKD challenge does not authenticate") from None
    if plaintext[-1] != CONTENT_TYPE_CHALLENGE:
        raise IllegalParameter("QKD challenge has the wrong inner type")
    return Challenge.decode(plaintext[:-1])


# ----------------------------------------------------------------------------------------------------
# Record protection after the handshake


class ReferenceProtection:
    """One direction of the fork's QKD record protection (a ``RecordProtection``).

    Both directions are built from the same (key, iv) and start at sequence 0: that is the fork's nonce reuse.
    """

    def __init__(self, key: bytes, iv: bytes) -> None:
        _check_key(key, iv)
        self._aead = AESGCM(key)
        self._iv = iv
        self._seq = 0
        self.nonces_used: list[bytes] | None = None  # set to [] to record nonces (tests of nonce reuse)

    def __repr__(self) -> str:
        return f"ReferenceProtection(seq={self._seq})"

    def _next_nonce(self) -> bytes:
        if self._seq >= _MAX_SEQ:
            raise InternalError("record sequence number would wrap")
        nonce = _nonce(self._iv, self._seq)
        self._seq += 1
        if self.nonces_used is not None:
            self.nonces_used.append(nonce)
        return nonce

    def seal(self, content_type: int, data: bytes) -> bytes:
        if len(data) > MAX_PLAINTEXT:
            raise InternalError("record plaintext too long")
        length = len(data) + 1 + TAG_LEN
        body = self._aead.encrypt(self._next_nonce(), data + bytes((content_type,)), _aad(length))
        header = bytes((CONTENT_TYPE_APPLICATION_DATA,)) + RECORD_VERSION_QKD.to_bytes(2, "big")
        return header + length.to_bytes(2, "big") + body

    def open(self, outer_type: int, version: int, body: bytes) -> tuple[int, bytes]:
        if outer_type != CONTENT_TYPE_APPLICATION_DATA:
            raise UnexpectedMessage("unprotected record after the QKD switch")
        if version != RECORD_VERSION_QKD and version >> 8 != 0x03:
            raise DecodeError("bad record version")
        if len(body) > MAX_CIPHERTEXT:
            raise RecordOverflow("QKD record too long")
        if len(body) <= TAG_LEN:
            raise BadRecordMac("QKD record too short")
        try:
            plaintext = self._aead.decrypt(self._next_nonce(), body, _aad(len(body)))
        except InvalidTag:
            raise BadRecordMac("QKD record does not authenticate") from None
        end = len(plaintext.rstrip(b"\x00"))
        if end == 0:
            raise UnexpectedMessage("QKD record without a content type")
        if end - 1 > MAX_PLAINTEXT:
            raise RecordOverflow("QKD record plaintext too long")
        return plaintext[end - 1], plaintext[: end - 1]
