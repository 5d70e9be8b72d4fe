"""Who is calling: the client certificate of a mutual-TLS connection mapped to an SAE, an admin or a KME.

The TLS layer has already verified the chain against the configured CA(s); this module recognises the
verified certificate by its serial number or by the SHA-256 fingerprint of its DER encoding, and by the
configured CA that issued it: a serial number is unique only per CA, so when a listener trusts several CAs,
the same serial from another of them is another certificate (and another principal, or none).
"""

from __future__ import annotations

import hashlib
import ssl
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from qkdtls.http11.server import Request
from qkdtls.kme.config import CertIdentity, ca_certificates


@dataclass(frozen=True, slots=True, eq=False)
class PeerCertificate:
    serial: int
    fingerprint: bytes
    certificate: x509.Certificate | None = None


@lru_cache(maxsize=1024)
def _parse(der: bytes) -> PeerCertificate | None:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return PeerCertificate(
        serial=cert.serial_number, fingerprint=hashlib.sha256(der).digest(), certificate=cert
    )


# The certificate of a kept-alive connection, read once per connection instead of re-encoded per request.
# Sound because the server contexts refuse renegotiation (the only way a TLS connection changes its peer).
_BY_CONNECTION: weakref.WeakKeyDictionary[object, PeerCertificate | None] = weakref.WeakKeyDictionary()


def peer_certificate(request: Request) -> PeerCertificate | None:
    """The verified client certificate of the request's connection, or None when the client sent none."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    try:
        return _BY_CONNECTION[ssl_object]
    except KeyError:
        pass
    except TypeError:  # an SSL object without weak references: no caching
        der = ssl_object.getpeercert(binary_form=True)
        return _parse(der) if der else None
    der = ssl_object.getpeercert(binary_form=True)
    cert = _parse(der) if der else None
    _BY_CONNECTION[ssl_object] = cert
    return cert


T = TypeVar("T")


class IdentityMap(Generic[T]):
    """Maps a certificate to a principal (an SAE ID, a KME ID, an administrator name).

    A certificate matches an identity when every attribute the identity names (serial, fingerprint, issuing
    CA) matches. ``cas``: the CA certificate files of the listener, among which the issuer is found.
    """

    def __init__(self, entries: Iterable[tuple[CertIdentity, T]], cas: Iterable[Path] = ()) -> None:
        self._by_serial: dict[int, list[tuple[CertIdentity, T]]] = {}
        self._by_fingerprint: dict[bytes, list[tuple[CertIdentity, T]]] = {}
        for identity, principal in entries:
            if identity.fingerprint is not None:
                self._by_fingerprint.setdefault(identity.fingerprint, []).append((identity, principal))
            elif identity.serial is not None:
                self._by_serial.setdefault(identity.serial, []).append((identity, principal))
        self._cas = [
            (ca, hashlib.sha256(ca.public_bytes(Encoding.DER)).digest()) for ca in ca_certificates(tuple(cas))
        ]
        # Certificate fingerprint -> fingerprint of the configured CA that issued it (None: none of them).
        self._issuers: dict[bytes, bytes | None] = {}

    def issuer_of(self, cert: PeerCertificate) -> bytes | None:
        """The configured CA that directly issued ``cert`` (name and signature checked), by fingerprint."""
        try:
            return self._issuers[cert.fingerprint]
        except KeyError:
            pass
        found = None
        if cert.certificate is not None:
            for ca, digest in self._cas:
                if ca.subject != cert.certificate.issuer:
                    continue
                try:
                    cert.certificate.verify_directly_issued_by(ca)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                found = digest
                break
        if len(self._issuers) >= 4096:  # certificates come from the verified chains of callers: stay bounded
            self._issuers.clear()
        self._issuers[cert.fingerprint] = found
        return found

    def _issued_by(self, identity: CertIdentity, cert: PeerCertificate) -> bool:
        return identity.issuer is None or identity.issuer == self.issuer_of(cert)

    def lookup(self, cert: PeerCertificate | None) -> T | None:
        if cert is None:
            return None
        for identity, principal in self._by_fingerprint.get(cert.fingerprint, ()):
            if (identity.serial is None or identity.serial == cert.serial) and self._issued_by(
                identity, cert
            ):
                return principal
        for identity, principal in self._by_serial.get(cert.serial, ()):
            if self._issued_by(identity, cert):
                return principal
        return None


def server_context(
    cert: Path, key: Path, client_cas: Iterable[Path], *, require_client_cert: bool
) -> ssl.SSLContext:
    """TLS 1.2+ server context asking for a client certificate.

    The SAE interface uses CERT_OPTIONAL: a client without a certificate completes the handshake and gets a
    JSON 401 (what ETSI clients can report), while a certificate from an unknown CA or an expired one still
    fails the handshake. The inter-KME interface requires a certificate (CERT_REQUIRED).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    for ca in client_cas:
        ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # No TLS 1.3 tickets: a resumed session skips chain verification, so a client certificate that expired
    # or was replaced since would still be accepted. Clients keep connections alive instead.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    # A TLS 1.2 renegotiation could present another client certificate on the same connection; the
    # identity is read once per connection (``peer_certificate``), so the connection's peer must be fixed.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS client context presenting ``cert`` and trusting only ``ca`` for the server."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
