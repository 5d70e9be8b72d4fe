"""The secure QKD profile against standard external-PSK servers (openssl, gnutls) and the policy rules."""

from __future__ import annotations

import os
import uuid

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from tests.peers.servers import Driver, ServerPki, gnutls_server, openssl_server

from qkdtls.tls.alerts import AlertDescription, InsufficientSecurity, PeerAlert, TLSError
from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer
from qkdtls.tls.qkd_secure import psk_identity
from qkdtls.tls.suites import CipherSuite

pytestmark = pytest.mark.peers
SHA256_SUITE = CipherSuite.TLS_CHACHA20_POLY1305_SHA256   # OpenSSL's command-line PSK is SHA-256


def _offer(master: int = 7) -> QkdOffer:
    return QkdOffer(key_id=str(uuid.uuid4()), key=os.urandom(32), master_sae_id=master)


def _openssl_psk(offer: QkdOffer, *extra: str, key: bytes | None = None):  # type: ignore[no-untyped-def]
    identity = psk_identity(offer.master_sae_id, offer.key_id).decode()
    return openssl_server("-nocert", "-psk", (key or offer.key).hex(), "-psk_identity", identity,
                          "-ciphersuites", SHA256_SUITE.name, "-rev", *extra)


def _client(offer: QkdOffer, qkd: str = "preferred", pki: ServerPki | None = None) -> TLSClient:
    cfg = ClientConfig(trust=pki.trust() if pki else None, qkd=qkd, qkd_cipher_suite=SHA256_SUITE)
    return TLSClient(cfg, "localhost", offer)


def test_secure_profile_with_openssl_psk_server() -> None:
    offer = _offer()
    with _openssl_psk(offer) as server:
        drv = Driver(server.connect(), _client(offer, "required"))
        info = drv.handshake().info
        assert (info.mode, info.profile, info.key_id) == ("qkd", "secure", offer.key_id)
        assert info.peer_certificate is None and info.cipher == SHA256_SUITE.name
        drv.send(b"quantum\n")
        drv.expect(b"mutnauq")
        drv.close()


def test_secure_profile_after_hello_retry_request() -> None:
    """The binder of the second ClientHello covers message_hash(ClientHello1) and the HRR (§4.2.11.2)."""
    offer = _offer()
    with _openssl_psk(offer, "-groups", "P-256") as server:
        drv = Driver(server.connect(), _client(offer, "required"))
        info = drv.handshake().info
        assert (info.profile, info.group) == ("secure", "secp256r1")
        drv.send(b"retried\n")
        drv.expect(b"deirter")
        drv.close()


def test_wrong_psk_fails_without_data() -> None:
    offer = _offer()
    with _openssl_psk(offer, key=os.urandom(32)) as server:
        drv = Driver(server.connect(), _client(offer, "required"))
        with pytest.raises(PeerAlert) as err:
            drv.handshake()
        # A binder made with another key. RFC 8446 §4.2.11 says decrypt_error; OpenSSL 3.0 answers
        # illegal_parameter. Either way the handshake stops before any key is used.
        assert err.value.description in (AlertDescription.decrypt_error, AlertDescription.illegal_parameter)
        assert drv.received == b"" and drv.conn.info is None
        drv.close()


def test_secure_profile_with_gnutls_psk_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    offer = _offer(master=-3)
    identity = psk_identity(offer.master_sae_id, offer.key_id)
    passwd = tmp_path / "psk.passwd"
    # The identity contains ':' (the file's separator), so it is written in GnuTLS's '#hex' form.
    passwd.write_text(f"#{identity.hex()}:{offer.key.hex()}\n")
    priority = "--priority=NORMAL:-VERS-ALL:+VERS-TLS1.3:+ECDHE-PSK:+PSK"
    with gnutls_server(f"--pskpasswd={passwd}", priority) as srv:
        drv = Driver(srv.connect(), _client(offer, "required"))
        info = drv.handshake().info
        assert (info.mode, info.profile) == ("qkd", "secure")
        drv.send(b"echo me\n")
        drv.expect(b"echo me")
        drv.close()


def test_required_policy_refuses_classic_server(server_pki: ServerPki) -> None:
    ident = server_pki.servers["ec-p256"]
    with openssl_server("-cert", str(ident.cert), "-key", str(ident.key), "-rev") as server:
        drv = Driver(server.connect(), _client(_offer(), "required", server_pki))
        with pytest.raises(InsufficientSecurity):
            drv.handshake()
        assert drv.conn.data_to_send() == b""   # the alert was flushed by the driver
        drv.close()


def test_preferred_policy_falls_back_with_certificate_validation(server_pki: ServerPki) -> None:
    ident = server_pki.servers["ec-p256"]
    with openssl_server("-cert", str(ident.cert), "-key", str(ident.key), "-rev") as server:
        drv = Driver(server.connect(), _client(_offer(), "preferred", server_pki))
        info = drv.handshake().info
        assert (info.mode, info.profile, info.key_id) == ("classic", None, None)
        assert info.peer_certificate == ident.certificate().public_bytes(Encoding.DER)
        drv.send(b"fallback\n")
        drv.expect(b"kcabllaf")
        drv.close()


def test_preferred_fallback_still_rejects_unknown_ca(server_pki: ServerPki) -> None:
    ident = server_pki.foreign
    with openssl_server("-cert", str(ident.cert), "-key", str(ident.key), "-rev") as server:
        drv = Driver(server.connect(), _client(_offer(), "preferred", server_pki))
        with pytest.raises(TLSError):
            drv.handshake()
        drv.close()


def test_policy_off_sends_no_offer() -> None:
    offer = _offer()
    conn = TLSClient(ClientConfig(qkd="off"), "localhost", offer)
    conn.initiate()
    assert psk_identity(offer.master_sae_id, offer.key_id) not in conn.data_to_send()


def test_required_without_offer_is_refused() -> None:
    with pytest.raises(TLSError):
        TLSClient(ClientConfig(qkd="required"), "localhost", None)
