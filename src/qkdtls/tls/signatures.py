"""Signature schemes (RFC 8446 §4.2.3) and CertificateVerify signing/verification (§4.4.3)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from .alerts import DecryptError, HandshakeFailure, IllegalParameter


class SignatureScheme(IntEnum):
    rsa_pkcs1_sha256 = 0x0401
    rsa_pkcs1_sha384 = 0x0501
    rsa_pkcs1_sha512 = 0x0601
    ecdsa_secp256r1_sha256 = 0x0403
    ecdsa_secp384r1_sha384 = 0x0503
    ecdsa_secp521r1_sha512 = 0x0603
    rsa_pss_rsae_sha256 = 0x0804
    rsa_pss_rsae_sha384 = 0x0805
    rsa_pss_rsae_sha512 = 0x0806
    ed25519 = 0x0807
    ed448 = 0x0808
    rsa_pss_pss_sha256 = 0x0809
    rsa_pss_pss_sha384 = 0x080A
    rsa_pss_pss_sha512 = 0x080B


S = SignatureScheme
# The PKCS#1 v1.5 schemes are listed for certificate signatures only (§4.4.3 forbids them in
# CertificateVerify).
DEFAULT_SCHEMES: tuple[int, ...] = (
    S.ecdsa_secp256r1_sha256, S.ecdsa_secp384r1_sha384, S.ed25519, S.rsa_pss_rsae_sha256,
    S.rsa_pss_rsae_sha384, S.rsa_pss_rsae_sha512, S.ecdsa_secp521r1_sha512, S.ed448,
    S.rsa_pkcs1_sha256, S.rsa_pkcs1_sha384, S.rsa_pkcs1_sha512,
)
_CV_FORBIDDEN = {S.rsa_pkcs1_sha256, S.rsa_pkcs1_sha384, S.rsa_pkcs1_sha512}
_HASHES: dict[SignatureScheme, type[hashes.HashAlgorithm]] = {
    S.ecdsa_secp256r1_sha256: hashes.SHA256, S.ecdsa_secp384r1_sha384: hashes.SHA384,
    S.ecdsa_secp521r1_sha512: hashes.SHA512, S.rsa_pss_rsae_sha256: hashes.SHA256,
    S.rsa_pss_rsae_sha384: hashes.SHA384, S.rsa_pss_rsae_sha512: hashes.SHA512,
    S.rsa_pss_pss_sha256: hashes.SHA256, S.rsa_pss_pss_sha384: hashes.SHA384,
    S.rsa_pss_pss_sha512: hashes.SHA512,
}
_ECDSA_CURVES = {
    S.ecdsa_secp256r1_sha256: "secp256r1", S.ecdsa_secp384r1_sha384: "secp384r1",
    S.ecdsa_secp521r1_sha512: "secp521r1",
}
SERVER_CONTEXT = b"TLS 1.3, server CertificateVerify"
CLIENT_CONTEXT = b"TLS 1.3, client CertificateVerify"


def signed_content(transcript_hash: bytes, server: bool) -> bytes:
    return b" " * 64 + (SERVER_CONTEXT if server else CLIENT_CONTEXT) + b"\x00" + transcript_hash


def _key_fits(key: Any, scheme: SignatureScheme) -> bool:
    if scheme in _ECDSA_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and (
            key.curve.name == _ECDSA_CURVES[scheme]
        )
    if scheme in (S.rsa_pss_rsae_sha256, S.rsa_pss_rsae_sha384, S.rsa_pss_rsae_sha512):
        return isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey)
    if scheme is S.ed25519:
        return isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey)
    if scheme is S.ed448:
        return isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey)
    return False


def _pss(scheme: SignatureScheme) -> padding.PSS:
    algorithm = _HASHES[scheme]()
    return padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)


def choose_scheme(private_key: Any, peer_schemes: Sequence[int]) -> SignatureScheme:
    """Our preferred scheme the peer accepts for this key; none → handshake_failure."""
    for value in DEFAULT_SCHEMES:
        scheme = SignatureScheme(value)
        if scheme in _CV_FORBIDDEN or int(scheme) not in peer_schemes:
            continue
        if _key_fits(private_key, scheme):
            return scheme
    raise HandshakeFailure("no common signature scheme for our key")


def sign(private_key: Any, scheme: SignatureScheme, transcript_hash: bytes, server: bool) -> bytes:
    content = signed_content(transcript_hash, server)
    if scheme in _ECDSA_CURVES:
        return private_key.sign(content, ec.ECDSA(_HASHES[scheme]()))
    if scheme in (S.rsa_pss_rsae_sha256, S.rsa_pss_rsae_sha384, S.rsa_pss_rsae_sha512):
        return private_key.sign(content, _pss(scheme), _HASHES[scheme]())
    return private_key.sign(content)   # Ed25519 / Ed448 sign the message itself


def verify(
    public_key: Any,
    scheme: int,
    signature: bytes,
    transcript_hash: bytes,
    server: bool,
    offered: Sequence[int],
) -> None:
    """Checks a CertificateVerify; a scheme we did not offer or that does not fit the key is
    illegal_parameter, a wrong signature decrypt_error (§4.4.3)."""
    try:
        chosen = SignatureScheme(scheme)
    except ValueError:
        raise IllegalParameter("unknown signature scheme") from None
    if int(chosen) not in offered or chosen in _CV_FORBIDDEN:
        raise IllegalParameter(f"signature scheme {chosen.name} was not offered")
    if not _key_fits(public_key, chosen):
        raise IllegalParameter(f"signature scheme {chosen.name} does not match the certificate key")
    content = signed_content(transcript_hash, server)
    try:
        if chosen in _ECDSA_CURVES:
            public_key.verify(signature, content, ec.ECDSA(_HASHES[chosen]()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, content, _pss(chosen), _HASHES[chosen]())
        else:
            public_key.verify(signature, content)
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        raise DecryptError("CertificateVerify signature does not verify") from None
