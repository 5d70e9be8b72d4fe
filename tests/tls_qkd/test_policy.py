"""Policy ``required`` against independent classic peers, in both directions, and ``preferred`` with them.

* openssl s_client → our required server: refused with insufficient_security (our server also says so);
* our required client → a Python ssl server: refused with insufficient_security before any data;
* openssl s_client → our preferred server: standard TLS 1.3 on the same connection (hand-off to OpenSSL);
* our preferred client → openssl s_server: standard TLS 1.3 with the certificate checked;
* the same with a private CA whose certificate has no keyUsage: accepted, as OpenSSL's client accepts it; a CA
  whose keyUsage forbids signing certificates: refused by both, and our error names the CA.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from tests.peers.clients import OneShotServer, openssl_client, require_tool, run_peer
from tests.peers.servers import openssl_server
from tests.tls_qkd.conftest import HOST, SERVER_SAE, TIMEOUT, Site, client_context, echo_once, server_context

from qkdtls import pki
from qkdtls.etsi014.client import KmeClient
from qkdtls.net.context import QKDContext
from qkdtls.net.errors import QKDHandshakeError, QKDPolicyError
from qkdtls.net.socket import QKDSocket
from qkdtls.testbed import free_port
from qkdtls.tls.alerts import AlertDescription

pytestmark = pytest.mark.peers


def test_openssl_client_refused_by_required_server(site_b: Site, kme_b: KmeClient) -> None:
    server = server_context(site_b, kme_b, qkd="required")
    with OneShotServer(echo_once(server)) as srv:
        result = openssl_client(srv.port, "-servername", "localhost", send=b"ping\n")
        srv.join()
    assert "alert insufficient security" in result.output.lower() or "alert number 71" in result.output
    assert b"echo:" not in result.stdout
    assert len(srv.errors) == 1 and isinstance(srv.errors[0], QKDPolicyError)
    assert srv.errors[0].alert == AlertDescription.insufficient_security


def test_required_client_refuses_python_ssl_server(site_b: Site, kme_a: KmeClient) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(site_b.app_cert, site_b.app_key)

    def handle(raw: socket.socket) -> object:
        with ctx.wrap_socket(raw, server_side=True) as tls:
            return tls.recv(100)

    client = client_context(site_b, kme_a, qkd="required")
    with OneShotServer(handle) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        with pytest.raises(QKDPolicyError) as failure:
            client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE)
        raw.close()
        srv.join()
    assert failure.value.alert == AlertDescription.insufficient_security and not failure.value.sent_by_peer
    assert len(srv.errors) == 1 and "INSUFFICIENT_SECURITY" in str(srv.errors[0]).upper()


def test_openssl_client_served_classically_by_preferred_server(site_b: Site, kme_b: KmeClient) -> None:
    server = server_context(site_b, kme_b, qkd="preferred")
    with OneShotServer(echo_once(server)) as srv:
        result = openssl_client(
            srv.port,
            "-servername",
            "localhost",
            "-CAfile",
            str(site_b.app_ca),
            send=b"ping",
            expect=b"echo:ping",
        )
        srv.join()
    assert b"echo:ping" in result.stdout
    assert "Verify return code: 0 (ok)" in result.output
    assert not srv.errors, srv.errors
    info = srv.results[0]
    assert info.mode == "classic" and info.version == "TLSv1.3"  # type: ignore[attr-defined]


def _reversed_by_openssl(tls: QKDSocket, line: bytes) -> bytes:
    """Send a line to ``openssl s_server -rev``, which answers it reversed; the answer up to its newline."""
    tls.sendall(line)
    answer = b""
    while b"\n" not in answer:
        chunk = tls.recv(100)
        assert chunk, "openssl closed early"
        answer += chunk
    return answer


def test_preferred_client_against_openssl_server(site_b: Site, kme_a: KmeClient) -> None:
    port = free_port()
    argv = [
        require_tool("openssl"),
        "s_server",
        "-accept",
        f"{HOST}:{port}",
        "-tls1_3",
        "-naccept",
        "1",
        "-cert",
        str(site_b.app_cert),
        "-key",
        str(site_b.app_key),
        "-rev",
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and proc.poll() is None, "openssl s_server did not start"
                time.sleep(0.05)
        client = client_context(site_b, kme_a, qkd="preferred")
        with client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE) as tls:
            assert tls.info is not None and tls.info.mode == "classic"
            assert tls.getpeercert()["subjectAltName"]  # the certificate was received and checked
            assert _reversed_by_openssl(tls, b"hello\n").startswith(b"olleh")
        # The key spent on this classic server is remembered: the next connection offers none.
        assert ("localhost", port) in client.non_qkd_peers
    finally:
        proc.kill()
        proc.wait(5)


def _private_ca(directory: Path, key_usage: x509.KeyUsage | None) -> tuple[Path, Path]:
    """A self-signed CA as ``openssl req -x509`` makes one: basicConstraints CA:TRUE and a subject key
    identifier, and keyUsage only if given. (cert, key) paths, in the layout qkdtls.pki issues from."""
    key = pki.generate_private_key("ec-p256")
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Site"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Private CA")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    cert, key_path = directory / "private-ca.crt", directory / "private-ca.key"
    cert.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key_path


SIGNING_ONLY = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)


def _openssl_verdict(port: int, ca: Path) -> str:
    """What ``openssl s_client`` says of the server's chain (it ends at once: stdin is empty, no -ign_eof)."""
    argv = [require_tool("openssl"), "s_client", "-connect", f"{HOST}:{port}", "-tls1_3", "-servername",
            "localhost", "-CAfile", str(ca), "-verify_return_error"]
    return run_peer(argv, timeout=TIMEOUT).output


def _fallback_client(kme_a: KmeClient, ca: Path) -> QKDContext:
    return QKDContext("client", kme=kme_a, cafile=ca, sae_directory={HOST: SERVER_SAE}, qkd="preferred",
                      handshake_timeout=TIMEOUT)


def test_classic_fallback_accepts_a_private_ca_without_key_usage(kme_a: KmeClient, tmp_path: Path) -> None:
    ca, ca_key = _private_ca(tmp_path, None)
    leaf = pki.issue_server_cert(ca, ca_key, tmp_path, "private-server")
    with openssl_server("-cert", str(leaf.cert), "-key", str(leaf.key), "-rev") as server:
        assert "Verify return code: 0 (ok)" in _openssl_verdict(server.port, ca)   # OpenSSL accepts it
        raw = socket.create_connection((HOST, server.port), timeout=TIMEOUT)
        # A key is offered (openssl ignores it): the classic fallback checks the chain to this CA.
        with _fallback_client(kme_a, ca).wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.info is not None and tls.info.mode == "classic"
            assert _reversed_by_openssl(tls, b"hello\n").startswith(b"olleh")


def test_ca_whose_key_usage_forbids_certificate_signing_is_refused_by_name(
    kme_a: KmeClient, tmp_path: Path
) -> None:
    ca, ca_key = _private_ca(tmp_path, SIGNING_ONLY)
    leaf = pki.issue_server_cert(ca, ca_key, tmp_path, "private-server")
    with openssl_server("-cert", str(leaf.cert), "-key", str(leaf.key), "-rev") as server:
        assert "invalid CA certificate" in _openssl_verdict(server.port, ca)   # OpenSSL refuses it as well
        raw = socket.create_connection((HOST, server.port), timeout=TIMEOUT)
        with pytest.raises(QKDHandshakeError) as failure:
            _fallback_client(kme_a, ca).wrap_socket(raw, server_hostname="localhost")
    assert failure.value.alert == AlertDescription.unknown_ca   # what OpenSSL's client sends for it
    assert "CA certificate 'CN=Private CA,O=Example Site' has a keyUsage without keyCertSign" in str(
        failure.value
    ), str(failure.value)
