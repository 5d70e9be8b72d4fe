"""TLS 1.3 cipher suites (RFC 8446 §B.4) and what each one means for the key schedule and records."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305


class CipherSuite(IntEnum):
    TLS_AES_128_GCM_SHA256 = 0x1301
    TLS_AES_256_GCM_SHA384 = 0x1302
    TLS_CHACHA20_POLY1305_SHA256 = 0x1303


@dataclass(frozen=True)
class SuiteParams:
    suite: CipherSuite
    hash_name: str        # "sha256" | "sha384"
    key_length: int
    aead: type[AESGCM] | type[ChaCha20Poly1305]
    iv_length: int = 12
    tag_length: int = 16
    # Derived once per suite (hash objects are stateless): the key schedule asks for them on every step.
    algorithm: hashes.HashAlgorithm = field(init=False, repr=False, compare=False)
    hash_length: int = field(init=False, compare=False)
    empty_hash: bytes = field(init=False, repr=False, compare=False)   # Hash(""), the "derived" context

    def __post_init__(self) -> None:
        algorithm = hashes.SHA256() if self.hash_name == "sha256" else hashes.SHA384()
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "hash_length", algorithm.digest_size)
        object.__setattr__(self, "empty_hash", hashes.Hash(algorithm).finalize())

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return self.algorithm


_PARAMS = {
    CipherSuite.TLS_AES_128_GCM_SHA256: SuiteParams(CipherSuite.TLS_AES_128_GCM_SHA256, "sha256", 16, AESGCM),
    CipherSuite.TLS_AES_256_GCM_SHA384: SuiteParams(CipherSuite.TLS_AES_256_GCM_SHA384, "sha384", 32, AESGCM),
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: SuiteParams(
        CipherSuite.TLS_CHACHA20_POLY1305_SHA256, "sha256", 32, ChaCha20Poly1305
    ),
}

ALL_SUITES: tuple[CipherSuite, ...] = (
    CipherSuite.TLS_AES_256_GCM_SHA384,
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
    CipherSuite.TLS_AES_128_GCM_SHA256,
)


def params(suite: CipherSuite | int) -> SuiteParams:
    found = _PARAMS.get(suite)   # type: ignore[call-overload]  # ints hash like the members
    return found if found is not None else _PARAMS[CipherSuite(suite)]


def parse_suite(value: CipherSuite | int | str) -> CipherSuite:
    """Accepts an enum member, a code point or the IANA name (as configuration files spell it)."""
    if isinstance(value, str):
        return CipherSuite[value]
    return CipherSuite(value)
