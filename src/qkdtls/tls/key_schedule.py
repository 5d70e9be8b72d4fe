"""TLS 1.3 key schedule (RFC 8446 §7.1) and transcript hash (§4.4.1).

HKDF comes from pyca/cryptography; this module only arranges the labels and secrets as RFC 8446 lays
them out. Secrets are bytes held on the object and never appear in its repr.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from .alerts import InternalError
from .suites import CipherSuite, params

# HkdfLabel encodings by (label, length): the prefix (length, "tls13 " + label) and the whole info for an
# empty context (key, iv, finished, traffic upd). A handshake expands about 18 labels per side, all from a
# handful of constants, so each is built once. Bounded so that exporter labels chosen by applications cannot
# grow it without limit.
_LABELS: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}
_MAX_LABELS = 64


def hkdf_extract(algorithm: hashes.HashAlgorithm, salt: bytes, ikm: bytes) -> bytes:
    return HKDF.extract(algorithm, salt or bytes(algorithm.digest_size), ikm)


def _encode_label(label: bytes, length: int) -> tuple[bytes, bytes]:
    full_label = b"tls13 " + label
    prefix = length.to_bytes(2, "big") + bytes((len(full_label),)) + full_label
    encoded = prefix, prefix + b"\x00"
    if len(_LABELS) < _MAX_LABELS:
        _LABELS[(label, length)] = encoded
    return encoded


def hkdf_expand_label(
    algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    prefix, empty_context_info = _LABELS.get((label, length)) or _encode_label(label, length)
    info = prefix + bytes((len(context),)) + context if context else empty_context_info
    return HKDFExpand(algorithm, length, info).derive(secret)


def derive_secret(
    algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes, transcript_hash: bytes
) -> bytes:
    return hkdf_expand_label(algorithm, secret, label, transcript_hash, algorithm.digest_size)


def hmac_digest(algorithm: hashes.HashAlgorithm, key: bytes, data: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, algorithm)
    h.update(data)
    return h.finalize()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class Transcript:
    """Running hash of the handshake messages, with the HelloRetryRequest rewrite of §4.4.1."""

    def __init__(self, algorithm: hashes.HashAlgorithm | None = None) -> None:
        self._messages: list[bytes] = []
        self._algorithm = algorithm
        self._hash: hashes.Hash | None = hashes.Hash(algorithm) if algorithm else None

    def set_algorithm(self, algorithm: hashes.HashAlgorithm) -> None:
        """The hash is known only once the suite is chosen; replay what was buffered so far."""
        self._algorithm = algorithm
        self._hash = hashes.Hash(algorithm)
        for message in self._messages:
            self._hash.update(message)

    def update(self, message: bytes) -> None:
        self._messages.append(message)
        if self._hash is not None:
            self._hash.update(message)

    def digest(self) -> bytes:
        if self._hash is None:
            raise InternalError("transcript hash used before the cipher suite is known")
        return self._hash.copy().finalize()

    def digest_with(self, extra: bytes) -> bytes:
        """Hash of the transcript plus ``extra`` without recording it (PSK binders, CertificateVerify)."""
        if self._hash is None:
            raise InternalError("transcript hash used before the cipher suite is known")
        h = self._hash.copy()
        h.update(extra)
        return h.finalize()

    def replace_with_message_hash(self) -> None:
        """After a HelloRetryRequest, ClientHello1 is replaced by message_hash(Hash(ClientHello1))."""
        if self._algorithm is None:
            raise InternalError("message_hash needs the hash algorithm")
        digest = self.digest()
        self._messages = []
        self._hash = hashes.Hash(self._algorithm)
        self.update(b"\xfe\x00\x00" + bytes([len(digest)]) + digest)


class KeySchedule:
    """The secrets of one connection for one cipher suite, advanced stage by stage."""

    def __init__(self, suite: CipherSuite) -> None:
        self.params = params(suite)
        self.suite = self.params.suite
        self.algorithm = self.params.algorithm
        self.hash_length = self.params.hash_length
        self._secret: bytes | None = None
        self._stage = "initial"

    def __repr__(self) -> str:
        return f"KeySchedule({self.suite.name}, stage={self._stage})"

    @property
    def stage(self) -> str:
        return self._stage

    def _require(self, stage: str) -> bytes:
        if self._stage != stage or self._secret is None:
            raise InternalError(f"key schedule in stage {self._stage}, expected {stage}")
        return self._secret

    def _empty_hash(self) -> bytes:
        return self.params.empty_hash

    def extract_early(self, psk: bytes | None = None) -> None:
        if self._stage != "initial":
            raise InternalError("early secret already extracted")
        self._secret = hkdf_extract(self.algorithm, b"", psk or bytes(self.hash_length))
        self._stage = "early"

    def with_suite(self, suite: CipherSuite) -> KeySchedule:
        """A schedule for ``suite`` starting from this one's early secret (same hash): the client computes
        the early secret once for the binder and keeps it when the server selects the PSK."""
        other = KeySchedule(suite)
        if other.params.hash_name != self.params.hash_name:
            raise InternalError("the early secret belongs to another hash")
        other._secret, other._stage = self._require("early"), "early"
        return other

    def binder_key(self, external: bool = True) -> bytes:
        label = b"ext binder" if external else b"res binder"
        return derive_secret(self.algorithm, self._require("early"), label, self._empty_hash())

    def client_early_traffic_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.algorithm, self._require("early"), b"c e traffic", transcript_hash)

    def extract_handshake(self, ecdhe: bytes) -> None:
        early = self._require("early")
        salt = derive_secret(self.algorithm, early, b"derived", self._empty_hash())
        self._secret = hkdf_extract(self.algorithm, salt, ecdhe)
        self._stage = "handshake"

    def handshake_traffic_secrets(self, transcript_hash: bytes) -> tuple[bytes, bytes]:
        secret = self._require("handshake")
        return (
            derive_secret(self.algorithm, secret, b"c hs traffic", transcript_hash),
            derive_secret(self.algorithm, secret, b"s hs traffic", transcript_hash),
        )

    def extract_master(self) -> None:
        handshake = self._require("handshake")
        salt = derive_secret(self.algorithm, handshake, b"derived", self._empty_hash())
        self._secret = hkdf_extract(self.algorithm, salt, bytes(self.hash_length))
        self._stage = "master"

    def application_traffic_secrets(self, transcript_hash: bytes) -> tuple[bytes, bytes]:
        secret = self._require("master")
        return (
            derive_secret(self.algorithm, secret, b"c ap traffic", transcript_hash),
            derive_secret(self.algorithm, secret, b"s ap traffic", transcript_hash),
        )

    def exporter_master_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.algorithm, self._require("master"), b"exp master", transcript_hash)

    def resumption_master_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.algorithm, self._require("master"), b"res master", transcript_hash)

    def finished_key(self, base_key: bytes) -> bytes:
        return hkdf_expand_label(self.algorithm, base_key, b"finished", b"", self.hash_length)

    def finished_verify_data(self, base_key: bytes, transcript_hash: bytes) -> bytes:
        return hmac_digest(self.algorithm, self.finished_key(base_key), transcript_hash)

    def next_traffic_secret(self, secret: bytes) -> bytes:
        """application_traffic_secret_N+1 (KeyUpdate, §7.2)."""
        return hkdf_expand_label(self.algorithm, secret, b"traffic upd", b"", self.hash_length)

    def traffic_keys(self, secret: bytes) -> tuple[bytes, bytes]:
        """(write key, write IV) for a traffic secret (§7.3)."""
        key = hkdf_expand_label(self.algorithm, secret, b"key", b"", self.params.key_length)
        iv = hkdf_expand_label(self.algorithm, secret, b"iv", b"", self.params.iv_length)
        return key, iv

    def export(self, exporter_master: bytes, label: bytes, context: bytes, length: int) -> bytes:
        """TLS-Exporter (§7.5)."""
        inner = derive_secret(self.algorithm, exporter_master, label, self._empty_hash())
        h = hashes.Hash(self.algorithm)
        h.update(context)
        return hkdf_expand_label(self.algorithm, inner, b"exporter", h.finalize(), length)
