"""Certificate chain and host-name validation for TLS peers via ``cryptography.x509.verification``.

Failures map to the alert RFC 8446 §6.2 names for them: an expired or not-yet-valid certificate →
certificate_expired, no path to a trusted CA → unknown_ca, a name mismatch or any other defect →
bad_certificate, an undecodable certificate → bad_certificate (decode errors of the message itself are
decode_error earlier).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError

from .alerts import BadCertificate, CertificateExpired, TLSAlert, UnknownCA

MAX_CHAIN_DEPTH = 8


def load_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    if not chain_der:
        raise BadCertificate("empty certificate chain")
    certs: list[x509.Certificate] = []
    for der in chain_der:
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError:
            raise BadCertificate("certificate does not parse") from None
    return certs


def _subject_for(server_name: str) -> DNSName | IPAddress:
    try:
        return IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        pass
    try:
        return DNSName(server_name.rstrip(".").lower())
    except ValueError:
        raise BadCertificate("server name is not a valid DNS name") from None


def _leaf_own_name(leaf: x509.Certificate) -> DNSName | IPAddress:
    """A name the leaf certifies, for chain checks that skip host-name matching."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        raise BadCertificate("certificate has no usable subjectAltName") from None
    for ip in san.get_values_for_type(x509.IPAddress):
        return IPAddress(ip)
    for name in san.get_values_for_type(x509.DNSName):
        try:
            return DNSName(name.lstrip("*."))
        except ValueError:
            continue
    raise BadCertificate("certificate names neither a DNS name nor an IP address")


def _map_error(error: VerificationError, leaf: x509.Certificate, now: dt.datetime) -> TLSAlert:
    text = str(error).lower()
    if "expired" in text or "not valid" in text or "validity" in text:
        return CertificateExpired("certificate is outside its validity period")
    if leaf.not_valid_after_utc < now or leaf.not_valid_before_utc > now:
        return CertificateExpired("certificate is outside its validity period")
    if "issuer" in text or "candidates exhausted" in text:
        return UnknownCA("no path to a trusted certificate authority")
    if "subject" in text or "name" in text or "san" in text:
        return BadCertificate("certificate does not match the server name")
    return BadCertificate("certificate rejected")


def _build_policy(trust: Sequence[x509.Certificate], now: dt.datetime | None) -> PolicyBuilder:
    if not trust:
        raise UnknownCA("no trusted certificate authorities configured")
    builder = PolicyBuilder().store(Store(list(trust))).max_chain_depth(MAX_CHAIN_DEPTH)
    if now is not None:
        builder = builder.time(now)
    return builder


def verify_server_chain(
    chain_der: Sequence[bytes],
    trust: Sequence[x509.Certificate] | None,
    server_name: str | None,
    check_hostname: bool = True,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The validated end-entity certificate; failures raise the matching TLSAlert."""
    certs = load_chain(chain_der)
    leaf = certs[0]
    when = now or dt.datetime.now(dt.UTC)
    builder = _build_policy(trust or [], now)
    if check_hostname:
        if not server_name:
            raise BadCertificate("host-name check needs a server name")
        subject = _subject_for(server_name)
    else:
        subject = _leaf_own_name(leaf)
    verifier = builder.build_server_verifier(subject)
    try:
        verifier.verify(leaf, certs[1:])
    except VerificationError as exc:
        raise _map_error(exc, leaf, when) from None
    except ValueError:
        raise BadCertificate("certificate chain is malformed") from None
    return leaf


def verify_client_chain(
    chain_der: Sequence[bytes],
    trust: Sequence[x509.Certificate] | None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The validated client end-entity certificate (server side of CertificateRequest)."""
    certs = load_chain(chain_der)
    leaf = certs[0]
    when = now or dt.datetime.now(dt.UTC)
    verifier = _build_policy(trust or [], now).build_client_verifier()
    try:
        verifier.verify(leaf, certs[1:])
    except VerificationError as exc:
        raise _map_error(exc, leaf, when) from None
    except ValueError:
        raise BadCertificate("certificate chain is malformed") from None
    return leaf
