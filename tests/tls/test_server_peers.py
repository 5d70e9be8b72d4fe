"""TLSServer against real peers: standard external-PSK clients (secure profile) and classic clients."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.peers.clients import (
    GNUTLS_LOCALHOST,
    HOST,
    OneShotServer,
    PeerPki,
    curl_client,
    gnutls_client,
    openssl_client,
    python_client,
    qkd_echo_handler,
    server_ssl_context,
    tls_pki,
    tlslite_client,
    tlslite_psk_client,
)

from qkdtls.tls.alerts import DecryptError, InsufficientSecurity
from qkdtls.tls.config import ServerConfig

__all__ = ["tls_pki"]

pytestmark = pytest.mark.peers
KEY_ID = "8844cba7-29e1-3251-a50a-25da13e65eea"
MASTER = 1
IDENTITY = f"qkd1:{MASTER}:{KEY_ID}"


def qkd_config(p: PeerPki | None = None, **kw: object) -> ServerConfig:
    if p is not None:
        kw.setdefault("certificate_chain", [x509.load_pem_x509_certificate(p.server_cert.read_bytes())])
        kw.setdefault("private_key", serialization.load_pem_private_key(p.server_key.read_bytes(), None))
    return ServerConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("suite", ["TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"])
def test_openssl_psk_client_gets_secure_profile(suite: str) -> None:
    key = os.urandom(32)
    with OneShotServer(qkd_echo_handler(qkd_config(qkd="required"), {KEY_ID: key})) as server:
        result = openssl_client(
            server.port, "-psk", key.hex(), "-psk_identity", IDENTITY, "-ciphersuites", suite,
            send=b"quantum\n", expect=b"echo:quantum",
        )
        server.join()
    assert server.errors == [], server.errors
    mode, info, received = server.results[0]  # type: ignore[misc]
    assert mode == "qkd" and received == b"quantum\n"
    assert (info.profile, info.key_id, info.peer_sae_id, info.cipher) == ("secure", KEY_ID, MASTER, suite)
    assert info.group == "x25519"
    assert "echo:quantum" in result.output and "Server Temp Key: X25519" in result.output, result.output


def test_openssl_psk_client_with_p256_only_gets_hello_retry() -> None:
    key = os.urandom(32)
    config = qkd_config(qkd="required", groups=("secp256r1",))
    with OneShotServer(qkd_echo_handler(config, {KEY_ID: key})) as server:
        result = openssl_client(
            server.port, "-psk", key.hex(), "-psk_identity", IDENTITY, "-groups", "X25519:P-256",
            "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256", send=b"hrr\n", expect=b"echo:hrr",
        )
        server.join()
    assert server.errors == [], server.errors
    assert server.results[0][1].group == "secp256r1"  # type: ignore[index]
    assert "echo:hrr" in result.output


def test_gnutls_psk_client_gets_secure_profile(tmp_path: object) -> None:
    key = os.urandom(32)
    with OneShotServer(qkd_echo_handler(qkd_config(qkd="required"), {KEY_ID: key})) as server:
        result = gnutls_client(
            server.port, "--priority", "NORMAL:-VERS-ALL:+VERS-TLS1.3:+ECDHE-PSK:+PSK",
            "--pskusername", IDENTITY, "--pskkey", key.hex(), HOST,
            send=b"gnu\n", expect=b"echo:gnu",
        )
        server.join()
    assert server.errors == [], (server.errors, result.output)
    assert server.results[0][0] == "qkd"  # type: ignore[index]
    assert "echo:gnu" in result.output


def test_tlslite_psk_client_gets_secure_profile() -> None:
    key = os.urandom(32)
    with OneShotServer(qkd_echo_handler(qkd_config(qkd="required"), {KEY_ID: key})) as server:
        cipher, data = tlslite_psk_client(server.port, IDENTITY.encode(), key, b"lite\n")
        server.join()
    assert server.errors == [] and data == b"echo:lite\n"
    assert server.results[0][1].profile == "secure" and cipher  # type: ignore[index]


def test_keylog_matches_openssl(tmp_path: Path) -> None:
    # Both ends derive the same handshake and traffic secrets: our key schedule against OpenSSL's.
    key = os.urandom(32)
    ours: list[str] = []
    config = qkd_config(qkd="required", keylog=ours.append)
    keylog = tmp_path / "openssl.keylog"
    with OneShotServer(qkd_echo_handler(config, {KEY_ID: key})) as server:
        openssl_client(
            server.port, "-psk", key.hex(), "-psk_identity", IDENTITY, "-keylogfile", str(keylog),
            "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256", send=b"k\n", expect=b"echo:k",
        )
        server.join()
    theirs = {line for line in keylog.read_text().splitlines() if line and not line.startswith("#")}
    assert len(ours) == 4 and set(ours) <= theirs, (ours, theirs)


def test_wrong_psk_gets_decrypt_error() -> None:
    # The client holds a different key for the same key_ID: the binder does not verify.
    with OneShotServer(qkd_echo_handler(qkd_config(qkd="required"), {KEY_ID: os.urandom(32)})) as server:
        result = openssl_client(
            server.port, "-psk", os.urandom(32).hex(), "-psk_identity", IDENTITY,
            "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256", send=b"x\n",
        )
        server.join()
    assert len(server.errors) == 1 and isinstance(server.errors[0], DecryptError)
    assert "decrypt error" in result.output, result.output


def test_kme_refusal_refuses_under_required() -> None:
    key = os.urandom(32)
    with OneShotServer(qkd_echo_handler(qkd_config(qkd="required"), {})) as server:
        result = openssl_client(
            server.port, "-psk", key.hex(), "-psk_identity", IDENTITY,
            "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256", send=b"x\n",
        )
        server.join()
    assert len(server.errors) == 1 and isinstance(server.errors[0], InsufficientSecurity)
    assert "insufficient security" in result.output, result.output


def test_required_refuses_classic_client(tls_pki: PeerPki) -> None:
    with OneShotServer(qkd_echo_handler(qkd_config(qkd="required"), {})) as server:
        result = openssl_client(server.port, "-CAfile", str(tls_pki.ca_cert), send=b"x\n")
        server.join()
    assert len(server.errors) == 1 and isinstance(server.errors[0], InsufficientSecurity)
    assert "insufficient security" in result.output, result.output


def classic_server(p: PeerPki, **kw: object) -> OneShotServer:
    return OneShotServer(qkd_echo_handler(qkd_config(qkd="preferred", **kw), {}, server_ssl_context(p)))


def test_classic_openssl_via_handoff(tls_pki: PeerPki) -> None:
    with classic_server(tls_pki) as server:
        result = openssl_client(
            server.port, "-CAfile", str(tls_pki.ca_cert), send=b"classic\n", expect=b"echo:classic"
        )
        server.join()
    assert server.errors == [] and server.results[0][0] == "classic"  # type: ignore[index]
    assert "echo:classic" in result.output and "Verify return code: 0 (ok)" in result.output


def test_classic_curl_via_handoff(tls_pki: PeerPki) -> None:
    with OneShotServer(
        qkd_echo_handler(qkd_config(qkd="preferred"), {}, server_ssl_context(tls_pki), http=True)
    ) as server:
        result = curl_client(server.port, tls_pki.ca_cert)
        server.join()
    assert server.errors == [] and result.stdout == b"ok", result.output


def test_classic_gnutls_via_handoff(tls_pki: PeerPki) -> None:
    with classic_server(tls_pki) as server:
        result = gnutls_client(
            server.port, "--x509cafile", str(tls_pki.ca_cert), *GNUTLS_LOCALHOST,
            send=b"g\n", expect=b"echo:g"
        )
        server.join()
    assert server.errors == [] and "echo:g" in result.output, result.output


def test_classic_tlslite_and_python_via_handoff(tls_pki: PeerPki) -> None:
    with classic_server(tls_pki) as server:
        version, data = tlslite_client(server.port, b"lite\n")
        server.join()
    assert server.errors == [] and version == "TLS 1.3" and data == b"echo:lite\n"
    with classic_server(tls_pki) as server:
        assert python_client(server.port, tls_pki.ca_cert, b"py\n") == b"echo:py\n"
        server.join()
    assert server.errors == [] and server.results[0][0] == "classic"  # type: ignore[index]


def test_psk_client_falls_back_to_classic_when_kme_refuses_under_preferred(tls_pki: PeerPki) -> None:
    # OpenSSL gets the whole ClientHello, ignores the unknown external PSK and authenticates by certificate.
    with classic_server(tls_pki) as server:
        result = openssl_client(
            server.port, "-CAfile", str(tls_pki.ca_cert), "-psk", os.urandom(32).hex(), "-psk_identity",
            IDENTITY, "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256", send=b"fb\n", expect=b"echo:fb",
        )
        server.join()
    assert server.errors == [] and server.results[0][0] == "classic", server.errors  # type: ignore[index]
    assert "echo:fb" in result.output


def test_garbage_first_flight_goes_to_openssl(tls_pki: PeerPki) -> None:
    with classic_server(tls_pki) as server, socket.create_connection((HOST, server.port), 10) as client:
        client.sendall(bytes.fromhex("1603010008" "01000004" "03030000"))
        answer = client.recv(100)
        server.join()
    assert answer[:1] == b"\x15" and answer[5:6] == b"\x02", answer.hex()  # OpenSSL's fatal alert
