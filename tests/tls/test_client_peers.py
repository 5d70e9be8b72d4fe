"""Our client against independent TLS 1.3 servers: gnutls-serv, tlslite-ng and Python ssl (OpenSSL)."""

from __future__ import annotations

import pytest

from qkdtls.tls.alerts import AlertDescription, PeerAlert
from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig
from tests.peers.servers import Driver, ServerPki, gnutls_server, python_ssl_echo, tlslite_echo

pytestmark = pytest.mark.peers


def _client(pki: ServerPki, **kwargs) -> TLSClient:  # type: ignore[no-untyped-def]
    return TLSClient(ClientConfig(trust=pki.trust(), qkd="off", **kwargs), "localhost")


@pytest.mark.parametrize("kind", ["ec-p256", "rsa-2048"])
def test_gnutls_x509_server(server_pki: ServerPki, kind: str) -> None:
    ident = server_pki.servers[kind]
    with gnutls_server(f"--x509certfile={ident.cert}", f"--x509keyfile={ident.key}", "--disable-client-cert",
                       "--priority=NORMAL:-VERS-ALL:+VERS-TLS1.3") as server:
        drv = Driver(server.connect(), _client(server_pki))
        assert drv.handshake().info.version == "TLSv1.3"
        drv.send(b"gnutls echo\n")
        drv.expect(b"gnutls echo")
        drv.close()


def test_gnutls_alpn_and_key_update(server_pki: ServerPki) -> None:
    ident = server_pki.servers["ec-p256"]
    with gnutls_server(f"--x509certfile={ident.cert}", f"--x509keyfile={ident.key}", "--disable-client-cert",
                       "--alpn=h2", "--alpn=http/1.1") as server:
        drv = Driver(server.connect(), _client(server_pki, alpn_protocols=("http/1.1",)))
        assert drv.handshake().info.alpn == "http/1.1"
        drv.conn.update_key(request_peer=True)
        drv.send(b"after update\n")
        drv.expect(b"after update")
        drv.close()


def test_tlslite_server(server_pki: ServerPki) -> None:
    server = tlslite_echo(server_pki.servers["ec-p256"])
    try:
        drv = Driver(server.connect(), _client(server_pki))
        drv.handshake()
        drv.send(b"pure python")
        drv.expect(b"echo:pure python")
        drv.pump_until(lambda: drv.closed)
        drv.close()
    finally:
        server.stop()
    assert not server.errors


def test_python_ssl_server_with_client_certificate(server_pki: ServerPki) -> None:
    server = python_ssl_echo(server_pki.servers["ec-p384"], client_ca=server_pki.ca.cert)
    try:
        drv = Driver(server.connect(), _client(server_pki, certificate_chain=[server_pki.client.certificate()],
                                              private_key=server_pki.client.private_key()))
        drv.handshake()
        drv.send(b"ssl module")
        drv.expect(b"echo:ssl module")
        drv.pump_until(lambda: drv.closed)   # the server unwraps: close_notify
        drv.close()
    finally:
        server.stop()
    assert not server.errors


def test_python_ssl_server_refuses_missing_client_certificate(server_pki: ServerPki) -> None:
    server = python_ssl_echo(server_pki.servers["ec-p256"], client_ca=server_pki.ca.cert)
    try:
        drv = Driver(server.connect(), _client(server_pki))   # no certificate: an empty Certificate is sent
        drv.handshake()
        drv.send(b"x")
        with pytest.raises(PeerAlert) as err:
            drv.expect(b"echo:")
        assert err.value.description == AlertDescription.certificate_required
        assert drv.received == b""
        drv.close()
    finally:
        server.stop()
