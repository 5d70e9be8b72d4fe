"""Key-exchange groups for the key_share extension (RFC 8446 §4.2.7, §4.2.8.2) and the hybrid
X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem: ML-KEM part first on the wire and in the shared secret).

All arithmetic is pyca/cryptography's; this module only checks sizes and encodings so a bad share
becomes an illegal_parameter alert.
"""

from __future__ import annotations

from enum import IntEnum

from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .alerts import IllegalParameter


class NamedGroup(IntEnum):
    secp256r1 = 0x0017
    secp384r1 = 0x0018
    x25519 = 0x001D
    X25519MLKEM768 = 0x11EC


DEFAULT_GROUPS: tuple[str, ...] = ("x25519", "secp256r1")
_MLKEM_EK = 1184
_MLKEM_CT = 1088
_X25519 = 32
_EC_CURVES: dict[NamedGroup, ec.EllipticCurve] = {
    NamedGroup.secp256r1: ec.SECP256R1(),
    NamedGroup.secp384r1: ec.SECP384R1(),
}
_EC_POINT_LEN = {NamedGroup.secp256r1: 65, NamedGroup.secp384r1: 97}


def parse_group(value: str | int | NamedGroup) -> NamedGroup:
    if isinstance(value, str):
        try:
            return NamedGroup[value]
        except KeyError:
            aliases = {
                "p-256": "secp256r1", "p256": "secp256r1", "p-384": "secp384r1",
                "x25519mlkem768": "X25519MLKEM768",
            }
            name = aliases.get(value.lower())
            if name is None:
                raise ValueError(f"unknown group {value!r}") from None
            return NamedGroup[name]
    return NamedGroup(value)


def _x25519_shared(private: x25519.X25519PrivateKey, peer: bytes) -> bytes:
    if len(peer) != _X25519:
        raise IllegalParameter("bad X25519 share length")
    try:
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
    except ValueError:
        # cryptography refuses low-order points (all-zero shared secret), RFC 8446 §7.4.2
        raise IllegalParameter("invalid X25519 share") from None


def _ec_public(group: NamedGroup, data: bytes) -> ec.EllipticCurvePublicKey:
    # TLS 1.3 allows only the uncompressed point form (§4.2.8.2)
    if len(data) != _EC_POINT_LEN[group] or data[0] != 4:
        raise IllegalParameter("bad ECDHE share encoding")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(_EC_CURVES[group], data)
    except ValueError:
        raise IllegalParameter("ECDHE share not on the curve") from None


class KeyShare:
    """One ephemeral private share, as a client offers it."""

    def __init__(self, group: NamedGroup | int | str) -> None:
        self.group = parse_group(group)
        self._x25519: x25519.X25519PrivateKey | None = None
        self._ec: ec.EllipticCurvePrivateKey | None = None
        self._mlkem: MLKEM768PrivateKey | None = None
        if self.group is NamedGroup.x25519:
            self._x25519 = x25519.X25519PrivateKey.generate()
            self.public = self._x25519.public_key().public_bytes_raw()
        elif self.group in _EC_CURVES:
            self._ec = ec.generate_private_key(_EC_CURVES[self.group])
            self.public = self._ec.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        else:
            self._mlkem = MLKEM768PrivateKey.generate()
            self._x25519 = x25519.X25519PrivateKey.generate()
            self.public = (
                self._mlkem.public_key().public_bytes_raw() + self._x25519.public_key().public_bytes_raw()
            )

    def __repr__(self) -> str:
        return f"KeyShare({self.group.name})"

    def exchange(self, peer: bytes) -> bytes:
        """Shared secret from the server's share; a malformed share raises IllegalParameter."""
        if self.group is NamedGroup.x25519:
            assert self._x25519 is not None
            return _x25519_shared(self._x25519, peer)
        if self._ec is not None:
            return self._ec.exchange(ec.ECDH(), _ec_public(self.group, peer))
        assert self._mlkem is not None and self._x25519 is not None
        if len(peer) != _MLKEM_CT + _X25519:
            raise IllegalParameter("bad X25519MLKEM768 share length")
        try:
            kem_secret = self._mlkem.decapsulate(peer[:_MLKEM_CT])
        except ValueError:
            raise IllegalParameter("invalid ML-KEM ciphertext") from None
        return kem_secret + _x25519_shared(self._x25519, peer[_MLKEM_CT:])


def server_exchange(group: NamedGroup | int, client_share: bytes) -> tuple[bytes, bytes]:
    """(server share, shared secret) answering a client's share; malformed shares raise IllegalParameter."""
    group = NamedGroup(group)
    if group is NamedGroup.x25519:
        private = x25519.X25519PrivateKey.generate()
        return private.public_key().public_bytes_raw(), _x25519_shared(private, client_share)
    if group in _EC_CURVES:
        peer = _ec_public(group, client_share)
        private_ec = ec.generate_private_key(_EC_CURVES[group])
        public = private_ec.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return public, private_ec.exchange(ec.ECDH(), peer)
    if len(client_share) != _MLKEM_EK + _X25519:
        raise IllegalParameter("bad X25519MLKEM768 share length")
    try:
        encaps_key = MLKEM768PublicKey.from_public_bytes(client_share[:_MLKEM_EK])
        kem_secret, ciphertext = encaps_key.encapsulate()
    except ValueError:
        raise IllegalParameter("invalid ML-KEM encapsulation key") from None
    private = x25519.X25519PrivateKey.generate()
    x_secret = _x25519_shared(private, client_share[_MLKEM_EK:])
    return ciphertext + private.public_key().public_bytes_raw(), kem_secret + x_secret
