"""Our client against independent TLS 1.3 servers: gnutls-serv, tlslite-ng and Python ssl (OpenSSL)."""

from __future__ import annotations

import pytest
from tests.peers.servers import Driver, ServerPki, gnutls_server, python_ssl_echo, tlslite_echo

from qkdtls.tls.alerts import AlertDescription, PeerAlert
from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig
from qkdtls.tls.events import ConnectionClosed

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
        big = bytes(range(97, 123)) * 2000 + b"\n"   # 52 KB: several maximum-size records each way
        drv.received.clear()
        drv.send(big)
        assert drv.expect(big) == big
        drv.close()


def _records(wire: bytes) -> list[tuple[int, bytes]]:
    out = []
    while len(wire) >= 5:
        length = int.from_bytes(wire[3:5], "big")
        out.append((wire[0], wire[5 : 5 + length]))
        wire = wire[5 + length :]
    return out


@pytest.mark.parametrize(
    ("curves", "groups", "expected"),
    [
        (None, ("x25519", "secp256r1"), "x25519"),
        # our X25519 share fits none of its groups: HelloRetryRequest with a cookie, then P-256
        (["secp256r1"], ("x25519", "secp256r1"), "secp256r1"),
        # hybrid post-quantum group against an independent ML-KEM implementation (kyber-py)
        (["x25519mlkem768"], ("X25519MLKEM768", "x25519"), "X25519MLKEM768"),
    ],
)
def test_tlslite_server(server_pki: ServerPki, curves: list[str] | None, groups: tuple[str, ...],
                        expected: str) -> None:
    server = tlslite_echo(server_pki.servers["ec-p256"], curves)
    try:
        drv = Driver(server.connect(), _client(server_pki, groups=groups))
        assert drv.handshake().info.group == expected
        drv.send(b"pure python")
        drv.expect(b"echo:pure python")
        drv.pump_until(lambda: drv.closed)
        assert ConnectionClosed(None) in drv.events   # tlslite closes with close_notify
        drv.close()
    finally:
        server.stop()
    assert not server.errors
    records = _records(bytes(drv.sent))
    assert [t for t, _ in records].count(20) == 1   # one middlebox-compatibility CCS, HRR or not
    hello = records[0][1]
    assert hello[0] == 1 and hello[38] == 32        # ClientHello with a 32-byte legacy_session_id


def test_python_ssl_server_with_client_certificate(server_pki: ServerPki) -> None:
    server = python_ssl_echo(server_pki.servers["ec-p384"], client_ca=server_pki.ca.cert)
    try:
        client = _client(server_pki, certificate_chain=[server_pki.client.certificate()],
                         private_key=server_pki.client.private_key())
        drv = Driver(server.connect(), client)
        drv.handshake()
        drv.send(b"ssl module")
        drv.expect(b"echo:ssl module")
        drv.pump_until(lambda: drv.closed)   # the server unwraps: close_notify
        drv.close()                          # our close_notify completes the server's unwrap()
    finally:
        server.stop()
    assert not server.errors and server.results == ["clean shutdown"]


def test_python_ssl_server_refuses_missing_client_certificate(server_pki: ServerPki) -> None:
    server = python_ssl_echo(server_pki.servers["ec-p256"], client_ca=server_pki.ca.cert)
    try:
        drv = Driver(server.connect(), _client(server_pki))   # no certificate: an empty Certificate is sent
        drv.handshake()   # TLS 1.3: the client finishes first, the server then judges its (empty) Certificate
        with pytest.raises(PeerAlert) as err:
            drv.expect(b"echo:")
        assert err.value.description == AlertDescription.certificate_required
        assert drv.received == b""
        drv.close()
    finally:
        server.stop()
