"""Chain and host-name validation map to the right alerts."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import VerificationError
from tests.peers.servers import Identity, ServerPki

from qkdtls.tls.alerts import BadCertificate, CertificateExpired, UnknownCA
from qkdtls.tls.certificates import _map_error, verify_client_chain, verify_server_chain


def _der(identity: Identity) -> list[bytes]:
    return [identity.certificate().public_bytes(Encoding.DER)]


def test_valid_chain_for_name_and_address(server_pki: ServerPki) -> None:
    chain = _der(server_pki.servers["ec-p256"])
    for name in ("localhost", "127.0.0.1", "LOCALHOST."):
        leaf = verify_server_chain(chain, server_pki.trust(), name)
        assert leaf.public_bytes(Encoding.DER) == chain[0]


def test_failures(server_pki: ServerPki) -> None:
    trust = server_pki.trust()
    with pytest.raises(BadCertificate):
        verify_server_chain(_der(server_pki.servers["ec-p256"]), trust, "example.org")
    with pytest.raises(UnknownCA):
        verify_server_chain(_der(server_pki.foreign), trust, "localhost")
    with pytest.raises(CertificateExpired):
        verify_server_chain(_der(server_pki.expired), trust, "localhost")
    with pytest.raises(CertificateExpired):   # not yet valid
        future = dt.datetime.now(dt.UTC) - dt.timedelta(days=3650)
        verify_server_chain(_der(server_pki.servers["ec-p256"]), trust, "localhost", now=future)
    with pytest.raises(UnknownCA):
        verify_server_chain(_der(server_pki.servers["ec-p256"]), None, "localhost")
    with pytest.raises(BadCertificate):
        verify_server_chain([b"\x30\x03\x02\x01\x00"], trust, "localhost")
    with pytest.raises(BadCertificate):
        verify_server_chain([], trust, "localhost")


def test_hostname_check_can_be_disabled(server_pki: ServerPki) -> None:
    verify_server_chain(_der(server_pki.wrong_name), server_pki.trust(), None, check_hostname=False)
    with pytest.raises(BadCertificate):
        verify_server_chain(_der(server_pki.wrong_name), server_pki.trust(), None)


def test_client_chain(server_pki: ServerPki) -> None:
    verify_client_chain(_der(server_pki.client), server_pki.trust())
    with pytest.raises(UnknownCA):
        verify_client_chain(_der(server_pki.client), [server_pki.foreign_ca.certificate()])



def test_reasons_name_the_extension(server_pki: ServerPki) -> None:
    """The verifier names extensions by OID; the alert text a user sees names them in words."""
    error = VerificationError(
        "validation failed: candidates exhausted: invalid extension: 2.5.29.19: "
        "Certificate is missing required extension"
    )
    leaf = server_pki.servers["ec-p256"].certificate()   # valid now: only the reason decides
    alert = _map_error(error, leaf, dt.datetime.now(dt.UTC))
    assert isinstance(alert, BadCertificate)
    assert str(alert) == (
        "certificate rejected: invalid extension: basicConstraints: Certificate is missing required extension"
    )
