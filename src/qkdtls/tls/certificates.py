"""Certificate chain and host-name validation for TLS peers via ``cryptography.x509.verification``.

Failures map to the alert RFC 8446 §6.2 names for them: an expired or not-yet-valid certificate →
certificate_expired, no path to a trusted CA → unknown_ca, a name mismatch or any other defect →
bad_certificate, an undecodable certificate → bad_certificate (decode errors of the message itself are
decode_error earlier). The alert's text carries the verifier's reason, with extension OIDs named, so the
error a user sees says what is wrong with which certificate.

The policy is the Web PKI profile ``cryptography`` implements (RFC 5280 plus the CA/Browser Forum rules)
with one deliberate relaxation, so that private CAs OpenSSL accepts are accepted here too: a CA certificate
**without keyUsage** is accepted. RFC 5280 path validation (§6.1.4 (n)) checks keyUsage only when it is
present, OpenSSL does the same, and ``openssl req -x509`` makes CAs without it by default. When a CA
certificate has keyUsage, it must assert keyCertSign (as in RFC 5280 and OpenSSL): unknown_ca, as OpenSSL
answers, with an error that names the CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    DNSName,
    ExtensionPolicy,
    IPAddress,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from .alerts import BadCertificate, CertificateExpired, TLSAlert, UnknownCA

MAX_CHAIN_DEPTH = 8
# Extension OIDs the verifier's messages name by number.
_EXTENSION_NAMES = {
    "2.5.29.14": "subjectKeyIdentifier",
    "2.5.29.15": "keyUsage",
    "2.5.29.17": "subjectAltName",
    "2.5.29.19": "basicConstraints",
    "2.5.29.30": "nameConstraints",
    "2.5.29.32": "certificatePolicies",
    "2.5.29.35": "authorityKeyIdentifier",
    "2.5.29.37": "extendedKeyUsage",
}
_VALIDATOR_PREFIX = re.compile(r"Python extension validator failed: \w+: ")


def _ca_key_usage(_policy: Policy, cert: x509.Certificate, key_usage: x509.KeyUsage | None) -> None:
    """keyUsage of a CA certificate: may be absent (see the module docstring); if present, keyCertSign."""
    if key_usage is not None and not key_usage.key_cert_sign:
        raise ValueError(f"CA certificate {_subject(cert)} has a keyUsage without keyCertSign")


def _subject(cert: x509.Certificate) -> str:
    try:
        return f"'{cert.subject.rfc4514_string()}'"
    except ValueError:
        return "(subject unreadable)"


_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage
)
_EE_POLICY = ExtensionPolicy.webpki_defaults_ee()


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


def _reason(error: VerificationError) -> str:
    """The verifier's message without its framing, extension OIDs named."""
    text = str(error)
    for prefix in ("validation failed: ", "candidates exhausted: "):
        text = text.removeprefix(prefix)
    text = _VALIDATOR_PREFIX.sub("", text)
    return re.sub(r"\b2\.5\.29\.\d+\b", lambda m: _EXTENSION_NAMES.get(m.group(0), m.group(0)), text)


def _map_error(error: VerificationError, leaf: x509.Certificate, now: dt.datetime) -> TLSAlert:
    reason = _reason(error)
    text = reason.lower()
    if "expired" in text or "not valid" in text or "validity" in text:
        return CertificateExpired(f"certificate is outside its validity period ({reason})")
    if leaf.not_valid_after_utc < now or leaf.not_valid_before_utc > now:
        return CertificateExpired("certificate is outside its validity period")
    if text.startswith("ca certificate"):
        # OpenSSL's answer to a CA it cannot use ("invalid CA certificate") is unknown_ca too.
        return UnknownCA(f"no usable path to a trusted certificate authority: {reason}")
    if "extension" in text or "keyusage" in text or "basicconstraints" in text:
        # A certificate of the chain breaks the profile: the reason says which rule (and, for keyUsage of a
        # CA, which CA).
        return BadCertificate(f"certificate rejected: {reason}")
    if "issuer" in text or "candidates exhausted" in str(error).lower():
        return UnknownCA(f"no path to a trusted certificate authority ({reason})")
    if "subject" in text or "name" in text or "san" in text:
        return BadCertificate(f"certificate does not match the server name ({reason})")
    return BadCertificate(f"certificate rejected: {reason}")


def _build_policy(trust: Sequence[x509.Certificate], now: dt.datetime | None) -> PolicyBuilder:
    if not trust:
        raise UnknownCA("no trusted certificate authorities configured")
    builder = (
        PolicyBuilder()
        .store(Store(list(trust)))
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
    )
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
