"""Our client against ``openssl s_server -tls1_3``: suites, certificates, HRR, client auth, KeyUpdate."""

from __future__ import annotations

import pytest
from tests.peers.servers import Driver, ServerPki, openssl_server

from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig
from qkdtls.tls.events import KeyUpdated
from qkdtls.tls.suites import CipherSuite

pytestmark = pytest.mark.peers


def _connect(server, pki: ServerPki, **config) -> Driver:  # type: ignore[no-untyped-def]
    cfg = ClientConfig(trust=pki.trust(), qkd="off", **config)
    return Driver(server.connect(), TLSClient(cfg, "localhost"))


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "ed25519", "rsa-2048"])
def test_certificate_types(server_pki: ServerPki, kind: str) -> None:
    ident = server_pki.servers[kind]
    with openssl_server("-cert", str(ident.cert), "-key", str(ident.key), "-rev") as server:
        drv = _connect(server, server_pki)
        info = drv.handshake().info
        assert info.mode == "classic" and info.version == "TLSv1.3" and info.peer_certificate
        drv.send(b"hello\n")
        assert drv.expect(b"olleh") .startswith(b"olleh")
        drv.close()


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_cipher_suites(server_pki: ServerPki, suite: CipherSuite) -> None:
    ident = server_pki.servers["ec-p256"]
    with openssl_server("-cert", str(ident.cert), "-key", str(ident.key), "-rev",
                        "-ciphersuites", suite.name) as server:
        drv = _connect(server, server_pki)
        assert drv.handshake().info.cipher == suite.name
        drv.send(b"abc\n")
        drv.expect(b"cba")
        drv.close()


def test_hello_retry_request_to_p256(server_pki: ServerPki) -> None:
    ident = server_pki.servers["ec-p256"]
    args = ("-cert", str(ident.cert), "-key", str(ident.key), "-rev", "-groups", "P-256")
    with openssl_server(*args) as server:
        drv = _connect(server, server_pki)
        assert drv.handshake().info.group == "secp256r1"
        drv.send(b"retry\n")
        drv.expect(b"yrter")
        drv.close()


def test_hybrid_mlkem_group(server_pki: ServerPki) -> None:
    ident = server_pki.servers["ec-p256"]
    # OpenSSL 3.0 has no ML-KEM: the hybrid share is ignored and the X25519 share sent beside it is used.
    with openssl_server("-cert", str(ident.cert), "-key", str(ident.key), "-rev") as server:
        drv = _connect(server, server_pki, groups=("X25519MLKEM768", "x25519", "secp256r1"))
        assert drv.handshake().info.group == "x25519"
        drv.close()


def test_client_certificate_on_request(server_pki: ServerPki) -> None:
    ident = server_pki.servers["ec-p256"]
    with openssl_server("-cert", str(ident.cert), "-key", str(ident.key), "-rev", "-Verify", "1",
                        "-CAfile", str(server_pki.ca.cert), "-verify_return_error") as server:
        drv = _connect(server, server_pki, certificate_chain=[server_pki.client.certificate()],
                       private_key=server_pki.client.private_key())
        drv.handshake()
        drv.send(b"authenticated\n")
        drv.expect(b"detacitnehtua")
        server.wait_output(b"client-test")   # s_server prints the subject of the verified client certificate
        drv.close()


def test_key_update_both_directions(server_pki: ServerPki) -> None:
    ident = server_pki.servers["ec-p256"]
    with openssl_server("-cert", str(ident.cert), "-key", str(ident.key)) as server:
        drv = _connect(server, server_pki)
        drv.handshake()

        def updates(direction: str) -> int:
            return sum(isinstance(e, KeyUpdated) and e.direction == direction for e in drv.events)

        drv.conn.update_key(request_peer=True)
        drv.send(b"after-our-update\n")
        server.wait_output(b"after-our-update")
        server.write(b"reply\n")   # OpenSSL answers the requested update with its next write
        drv.expect(b"reply")
        assert (updates("send"), updates("receive")) == (1, 1)

        server.write(b"K\n")   # s_server: KeyUpdate requesting ours
        drv.pump_until(lambda: updates("receive") == 2 and updates("send") == 2)
        drv.send(b"still-alive\n")
        server.wait_output(b"still-alive")
        server.write(b"from-server\n")
        drv.expect(b"from-server")
        drv.close()


def test_keylog_matches_openssl(server_pki: ServerPki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Our key schedule on a live handshake equals OpenSSL's: both write NSS key-log lines."""
    ident = server_pki.servers["ec-p256"]
    keylog = tmp_path / "server.keys"
    lines: list[str] = []
    with openssl_server("-cert", str(ident.cert), "-key", str(ident.key), "-rev",
                        "-keylogfile", str(keylog)) as server:
        drv = _connect(server, server_pki, keylog=lines.append)
        drv.handshake()
        drv.send(b"logged\n")
        drv.expect(b"deggol")
        drv.close()
        server.wait_output(b"CONNECTION CLOSED")
    theirs = {line for line in keylog.read_text().splitlines() if line and not line.startswith("#")}
    assert len(lines) == 5 and set(lines) <= theirs
