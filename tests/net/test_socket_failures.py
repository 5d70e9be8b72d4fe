"""QKDSocket handshakes that cannot succeed end within their deadline, with the right error and alert."""

from __future__ import annotations

import socket
import time

import pytest
from tests.peers.clients import HOST, OneShotServer, PeerPki, tls_pki

from qkdtls.net.context import QKDContext
from qkdtls.net.errors import QKDHandshakeError, QKDHandshakeTimeout
from qkdtls.tls.alerts import AlertDescription

__all__ = ["tls_pki"]  # the fixture, imported for pytest

DEADLINE = 0.5


def test_client_handshake_against_a_silent_server_times_out(tls_pki: PeerPki) -> None:
    client = QKDContext("client", qkd="off", cafile=tls_pki.ca_cert, handshake_timeout=DEADLINE)
    with socket.create_server((HOST, 0)) as silent:
        raw = socket.create_connection(silent.getsockname(), timeout=5)
        started = time.monotonic()
        with pytest.raises(QKDHandshakeTimeout):
            client.wrap_socket(raw, server_hostname="localhost")
        assert DEADLINE <= time.monotonic() - started < DEADLINE + 1.0
        assert raw.fileno() == -1  # closed, as ssl does after a failed handshake


def test_server_handshake_with_an_idle_client_times_out(tls_pki: PeerPki) -> None:
    server = QKDContext(
        "server",
        qkd="off",
        certfile=tls_pki.server_cert,
        keyfile=tls_pki.server_key,
        handshake_timeout=DEADLINE,
    )
    with OneShotServer(lambda raw: server.wrap_socket(raw, server_side=True)) as srv:
        idle = socket.create_connection((HOST, srv.port), timeout=5)
        srv.join()
        idle.close()
    assert len(srv.errors) == 1 and isinstance(srv.errors[0], QKDHandshakeTimeout)


def test_garbage_from_the_server_is_a_handshake_error_with_an_alert(tls_pki: PeerPki) -> None:
    def garbage(raw: socket.socket) -> object:
        raw.recv(65536)  # the ClientHello
        raw.sendall(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00")  # a ServerHello with an empty body
        return raw.recv(100)  # what the client answers: its alert

    client = QKDContext("client", qkd="off", cafile=tls_pki.ca_cert, handshake_timeout=5)
    with OneShotServer(garbage) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=5)
        with pytest.raises(QKDHandshakeError) as failure:
            client.wrap_socket(raw, server_hostname="localhost")
        srv.join()
    assert failure.value.alert == AlertDescription.decode_error and not failure.value.sent_by_peer
    alert = srv.results[0]
    assert isinstance(alert, bytes) and alert[:1] == b"\x15" and alert[-1] == AlertDescription.decode_error


def test_wrong_server_name_fails_certificate_check(tls_pki: PeerPki) -> None:
    server = QKDContext("server", qkd="off", certfile=tls_pki.server_cert, keyfile=tls_pki.server_key)
    client = QKDContext("client", qkd="off", cafile=tls_pki.ca_cert)
    with OneShotServer(lambda raw: server.wrap_socket(raw, server_side=True)) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=5)
        with pytest.raises(QKDHandshakeError) as failure:
            client.wrap_socket(raw, server_hostname="not-the-server.example")
        srv.join()
    assert failure.value.alert in (AlertDescription.bad_certificate, AlertDescription.certificate_unknown)


def test_server_without_certificate_refuses_classic_clients_with_an_alert(tls_pki: PeerPki) -> None:
    server = QKDContext("server", qkd="preferred")  # QKD only in practice: no certificate for classic TLS
    client = QKDContext("client", qkd="off", cafile=tls_pki.ca_cert)
    with OneShotServer(lambda raw: server.wrap_socket(raw, server_side=True)) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=5)
        with pytest.raises(QKDHandshakeError) as failure:
            client.wrap_socket(raw, server_hostname="localhost")
        srv.join()
    assert failure.value.sent_by_peer and failure.value.alert == AlertDescription.handshake_failure
    assert isinstance(srv.errors[0], QKDHandshakeError)
