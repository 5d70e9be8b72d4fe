"""The ``secure`` TLS-QKD profile: the QKD key is a TLS 1.3 external PSK used in ``psk_dhe_ke`` mode.

Why an external PSK rather than a new key exchange: RFC 8446 §4.2.11 already binds an out-of-band key to the
transcript (the binder), mixes it with a fresh ECDHE secret (so a leaked QKD key does not reveal past
traffic), derives independent keys and nonces per direction, and any standard peer (``openssl -psk``,
``gnutls --pskkey``) can interoperate. What TLS lacks is naming the key and rekeying with new QKD keys:

* **identity**: ``qkd1:<master_SAE_ID>:<key_ID>`` in ASCII, so command-line tools can spell it. The server
  collects the key with ``dec_keys`` for that master; the KME hands it only to the named slave.
* **rekey** (extension 0xFEA8 in ClientHello and EncryptedExtensions, only between qkdtls peers): a
  post-handshake message (handshake type 0xFE) whose body is ``opaque key_ID<0..255>``. The new
  application traffic secret of each direction is ``HKDF-Expand-Label(HKDF-Extract(salt=current_secret,
  ikm=new_qkd_key), "qkd c ap" | "qkd s ap", "", Hash.length)``: the current secret is the salt so the
  chain keeps everything already mixed in, the fresh QKD key is the input so an attacker who learned the
  old secrets cannot follow. Sequence: the client sends QkdRekey(key_ID) and
  switches its write key; the server fetches the key, switches its read key, answers with an empty QkdRekey
  (the ack) under its old write key, then switches its write key; the client switches its read key on the ack.
* **key announcement** (extension 0xFEA9 ``qkd_key_announce``, empty, in ClientHello and EncryptedExtensions,
  only between qkdtls peers): after the handshake the client may send one post-handshake message (handshake
  type 0xFD, ``QkdKeyAnnounce``) whose body is ``opaque key_ID<1..255>`` repeated in a
  ``key_IDs<1..2^16-1>`` vector, at most 16 IDs. They name keys the client already obtained with enc_keys for
  this server and will offer, in order, on its next connections: the server collects them in the background,
  so those handshakes wait for no KME. The message changes no key; it is authenticated by the record layer
  like any post-handshake message, and names keys only the announced master/slave pair can collect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from .alerts import DecodeError, IllegalParameter
from .buffer import Reader, Writer
from .key_schedule import hkdf_expand_label, hkdf_extract

EXT_QKD_REKEY = 0xFEA8
HANDSHAKE_QKD_REKEY = 0xFE
EXT_QKD_KEY_ANNOUNCE = 0xFEA9
HANDSHAKE_QKD_KEY_ANNOUNCE = 0xFD
MAX_ANNOUNCED_KEYS = 16
PSK_IDENTITY_PREFIX = b"qkd1:"
LABEL_CLIENT_REKEY = b"qkd c ap"
LABEL_SERVER_REKEY = b"qkd s ap"
# The shortest QKD key either side uses (handshake or rekey): 128 bits, the floor RFC 9257 §6 sets for an
# external PSK. A KME may hand out shorter keys (ETSI GS QKD 014 lets the caller choose the size); the client
# never offers one and the server treats one like a key the KME refused.
MIN_KEY_BYTES = 16

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_MAX_IDENTITY = 5 + 20 + 1 + 36
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def key_long_enough(key: bytes | None) -> bool:
    """A QKD key TLS may use: at least :data:`MIN_KEY_BYTES` long."""
    return key is not None and len(key) >= MIN_KEY_BYTES


def psk_identity(master_sae_id: int, key_id: str) -> bytes:
    """The PSK identity naming a QKD key: ``b"qkd1:<master_SAE_ID>:<key_ID>"``."""
    if not _I64_MIN <= master_sae_id <= _I64_MAX:
        raise ValueError("SAE IDs are signed 64-bit integers")
    if not _is_canonical_uuid(key_id):
        raise ValueError("key IDs are canonical lower-case UUIDs")
    return PSK_IDENTITY_PREFIX + f"{master_sae_id}:{key_id}".encode("ascii")


def parse_psk_identity(identity: bytes) -> tuple[int, str] | None:
    """(master_SAE_ID, key_ID), or None if the identity is not one of ours (then it is not a QKD offer).

    Only the exact form :func:`psk_identity` writes is accepted (decimal without "+" or leading zeros,
    canonical UUID), so one key has exactly one spelling.
    """
    if len(identity) > _MAX_IDENTITY or not identity.startswith(PSK_IDENTITY_PREFIX):
        return None
    try:
        text = identity[len(PSK_IDENTITY_PREFIX) :].decode("ascii")
    except UnicodeDecodeError:
        return None
    sae_text, sep, key_id = text.partition(":")
    if not sep or not _is_canonical_int(sae_text) or not _is_canonical_uuid(key_id):
        return None
    sae_id = int(sae_text)
    if not _I64_MIN <= sae_id <= _I64_MAX:
        return None
    return sae_id, key_id


def _is_canonical_int(text: str) -> bool:
    digits = text[1:] if text.startswith("-") else text
    if not digits.isascii() or not digits.isdigit():
        return False
    return str(int(text)) == text


def _is_canonical_uuid(text: str) -> bool:
    # The same test as str(uuid.UUID(text)) == text, without building a UUID (this runs in every handshake).
    return _CANONICAL_UUID.fullmatch(text) is not None


def rekeyed_secret(
    algorithm: hashes.HashAlgorithm, current_secret: bytes, qkd_key: bytes, client: bool
) -> bytes:
    """The next application traffic secret of one direction after a QKD rekey."""
    prk = hkdf_extract(algorithm, current_secret, qkd_key)
    label = LABEL_CLIENT_REKEY if client else LABEL_SERVER_REKEY
    return hkdf_expand_label(algorithm, prk, label, b"", algorithm.digest_size)


@dataclass(frozen=True, slots=True)
class QkdRekey:
    """Body of the QkdRekey handshake message (type 0xFE). An empty ``key_id`` is the server's ack."""

    key_id: str = ""

    @property
    def is_ack(self) -> bool:
        return not self.key_id

    def encode(self) -> bytes:
        return Writer().opaque8(self.key_id.encode("ascii")).getvalue()

    @classmethod
    def decode(cls, body: bytes) -> QkdRekey:
        reader = Reader(body)
        raw = reader.opaque8()
        reader.expect_end("QkdRekey")
        if not raw:
            return cls("")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise DecodeError("QkdRekey key_ID is not ASCII") from None
        if not _is_canonical_uuid(text):
            raise IllegalParameter("QkdRekey key_ID is not a canonical UUID")
        return cls(text)


@dataclass(frozen=True, slots=True)
class QkdKeyAnnounce:
    """Body of the QkdKeyAnnounce handshake message (type 0xFD): key IDs the client will offer next."""

    key_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.key_ids) <= MAX_ANNOUNCED_KEYS:
            raise ValueError(f"a QkdKeyAnnounce names 1 to {MAX_ANNOUNCED_KEYS} key IDs")
        if len(set(self.key_ids)) != len(self.key_ids):
            raise ValueError("a QkdKeyAnnounce names each key ID once")
        for key_id in self.key_ids:
            if not _is_canonical_uuid(key_id):
                raise ValueError("key IDs are canonical lower-case UUIDs")

    def encode(self) -> bytes:
        items = Writer()
        for key_id in self.key_ids:
            items.opaque8(key_id.encode("ascii"))
        return Writer().opaque16(items.getvalue()).getvalue()

    @classmethod
    def decode(cls, body: bytes) -> QkdKeyAnnounce:
        """Total: anything but the exact form :meth:`encode` writes is a :class:`DecodeError`."""
        reader = Reader(body)
        vector = Reader(reader.opaque16(min_len=1))
        reader.expect_end("QkdKeyAnnounce")
        key_ids: list[str] = []
        # Bounded: every pass consumes at least two bytes of a vector of at most 2^16 - 1.
        while not vector.eof():
            if len(key_ids) == MAX_ANNOUNCED_KEYS:
                raise DecodeError(f"QkdKeyAnnounce names more than {MAX_ANNOUNCED_KEYS} key IDs")
            raw = vector.opaque8(min_len=1)
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                raise DecodeError("QkdKeyAnnounce key_ID is not ASCII") from None
            if not _is_canonical_uuid(text):
                raise DecodeError("QkdKeyAnnounce key_ID is not a canonical UUID")
            if text in key_ids:
                raise DecodeError("QkdKeyAnnounce names a key ID twice")
            key_ids.append(text)
        return cls(tuple(key_ids))
