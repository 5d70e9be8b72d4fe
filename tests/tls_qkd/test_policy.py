"""Policy ``required`` against independent classic peers, in both directions, and ``preferred`` with them.

* openssl s_client → our required server: refused with insufficient_security (our server also says so);
* our required client → a Python ssl server: refused with insufficient_security before any data;
* openssl s_client → our preferred server: standard TLS 1.3 on the same connection (hand-off to OpenSSL);
* our preferred client → openssl s_server: standard TLS 1.3 with the certificate checked.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import pytest
from tests.peers.clients import OneShotServer, openssl_client, require_tool
from tests.tls_qkd.conftest import HOST, SERVER_SAE, TIMEOUT, Site, client_context, echo_once, server_context

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.errors import QKDPolicyError
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
            tls.sendall(b"hello\n")
            answer = b""
            while b"\n" not in answer:
                chunk = tls.recv(100)
                assert chunk, "openssl closed early"
                answer += chunk
        assert answer.startswith(b"olleh")  # -rev: openssl answers each line reversed
        # The key spent on this classic server is remembered: the next connection offers none.
        assert ("localhost", port) in client.non_qkd_peers
    finally:
        proc.kill()
        proc.wait(5)
