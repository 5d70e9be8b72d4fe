"""TLS 1.3 cipher suites (RFC 8446 §B.4) and what each one means for the key schedule and records."""

from __future__ import annotations

from dataclasses import dataclass
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

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return hashes.SHA256() if self.hash_name == "sha256" else hashes.SHA384()

    @property
    def hash_length(self) -> int:
        return 32 if self.hash_name == "sha256" else 48


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
    return _PARAMS[CipherSuite(suite)]


def parse_suite(value: CipherSuite | int | str) -> CipherSuite:
    """Accepts an enum member, a code point or the IANA name (as configuration files spell it)."""
    if isinstance(value, str):
        return CipherSuite[value]
    return CipherSuite(value)
