"""CertificateVerify signatures for every key type, and the alerts for bad ones."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from qkdtls.tls.alerts import DecryptError, HandshakeFailure, IllegalParameter
from qkdtls.tls.signatures import DEFAULT_SCHEMES, SignatureScheme, choose_scheme, sign, verify

S = SignatureScheme
KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa": lambda: rsa.generate_private_key(65537, 2048),
}


@pytest.mark.parametrize("kind", list(KEYS))
def test_sign_and_verify(kind: str) -> None:
    key = KEYS[kind]()
    scheme = choose_scheme(key, list(DEFAULT_SCHEMES))
    digest = os.urandom(32)
    signature = sign(key, scheme, digest, server=True)
    verify(key.public_key(), scheme, signature, digest, server=True, offered=DEFAULT_SCHEMES)
    with pytest.raises(DecryptError):   # the client context string differs from the server's
        verify(key.public_key(), scheme, signature, digest, server=False, offered=DEFAULT_SCHEMES)
    with pytest.raises(DecryptError):
        verify(key.public_key(), scheme, signature, os.urandom(32), server=True, offered=DEFAULT_SCHEMES)


def test_scheme_rules() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sig = sign(key, SignatureScheme.ecdsa_secp256r1_sha256, b"h" * 32, True)
    with pytest.raises(IllegalParameter):   # not offered
        verify(key.public_key(), S.ecdsa_secp256r1_sha256, sig, b"h" * 32, True, offered=[0x0807])
    with pytest.raises(IllegalParameter):   # does not fit the key
        verify(key.public_key(), SignatureScheme.ed25519, sig, b"h" * 32, True, offered=DEFAULT_SCHEMES)
    with pytest.raises(IllegalParameter):   # PKCS#1 v1.5 is never valid in CertificateVerify
        verify(key.public_key(), S.rsa_pkcs1_sha256, sig, b"h" * 32, True, offered=DEFAULT_SCHEMES)
    with pytest.raises(IllegalParameter):
        verify(key.public_key(), 0xEEEE, sig, b"h" * 32, True, offered=DEFAULT_SCHEMES)
    with pytest.raises(HandshakeFailure):
        choose_scheme(key, [0x0807])
