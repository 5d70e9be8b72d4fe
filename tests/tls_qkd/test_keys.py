"""Key handling around the handshake: one key per connection, never reused, bounded KME failures.

A KME that is down or silent must cost a bounded time: under ``preferred`` the client falls back to TLS 1.3
(and says so in the log), under ``required`` it raises :class:`QKDKeyUnavailable`; a server whose KME
cannot give the key falls back or refuses in the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time

import pytest
from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import HOST, SERVER_SAE, TIMEOUT, Site, client_context, echo_once, server_context

from qkdtls.etsi014.client import KmeClient, KmeRefused
from qkdtls.net.errors import QKDHandshakeError, QKDKeyUnavailable

KME_TIMEOUT = 1.0


def _connect(context, port: int) -> object:  # type: ignore[no-untyped-def]
    raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
    with context.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE) as tls:
        tls.sendall(b"ping")
        assert tls.recv(100) == b"echo:ping"
        return tls.info


def test_every_connection_uses_a_fresh_key_that_the_slave_kme_then_forgets(
    site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    client = client_context(site_b, kme_a, qkd="required")
    server = server_context(site_b, kme_b, qkd="required")
    n = 5
    with OneShotServer(echo_once(server), connections=n) as srv:
        infos = [_connect(client, srv.port) for _ in range(n)]
        srv.join()
    assert not srv.errors
    key_ids = [info.key_id for info in infos]  # type: ignore[attr-defined]
    assert len(set(key_ids)) == n
    assert [r.key_id for r in srv.results] == key_ids  # type: ignore[attr-defined]
    for key_id in key_ids[:2]:
        with pytest.raises(KmeRefused):
            kme_b.dec_keys(1001, [key_id])


def _dead_kme(site: Site) -> object:
    """Settings for a KME address where nothing listens (connection refused)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    return dataclasses.replace(site.kme, url=f"https://{HOST}:{port}", timeout=KME_TIMEOUT)


def _silent_kme(site: Site, listener: socket.socket) -> object:
    """Settings for a KME that accepts TCP and never answers (a hung KME)."""
    return dataclasses.replace(
        site.kme, url=f"https://{HOST}:{listener.getsockname()[1]}", timeout=KME_TIMEOUT
    )


@pytest.mark.parametrize("failure", ["refused", "silent"])
def test_client_kme_down_preferred_falls_back_within_the_kme_timeout(
    failure: str, site_a: Site, site_b: Site, kme_b: KmeClient, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.create_server((HOST, 0)) as listener:
        settings = _dead_kme(site_a) if failure == "refused" else _silent_kme(site_a, listener)
        client = client_context(site_b, settings, qkd="preferred")
        server = server_context(site_b, kme_b, qkd="preferred")
        with OneShotServer(echo_once(server)) as srv, caplog.at_level(logging.WARNING):
            started = time.monotonic()
            info = _connect(client, srv.port)
            elapsed = time.monotonic() - started
            srv.join()
        client.close()
    assert info.mode == "classic"  # type: ignore[attr-defined]
    assert elapsed < KME_TIMEOUT * 2 + 1.0
    assert any(getattr(r, "event", None) == "tls.qkd_fallback" for r in caplog.records)


def test_client_kme_down_required_raises_key_unavailable(site_a: Site, site_b: Site) -> None:
    client = client_context(site_b, _dead_kme(site_a), qkd="required")
    with socket.create_server((HOST, 0)) as listener:
        raw = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        started = time.monotonic()
        with pytest.raises(QKDKeyUnavailable, match="KME"):
            client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE)
        assert time.monotonic() - started < KME_TIMEOUT * 2 + 1.0
        raw.close()
    client.close()


def test_server_kme_down_preferred_serves_classic_required_refuses(
    site_a: Site, site_b: Site, kme_a: KmeClient
) -> None:
    client = client_context(site_b, kme_a, qkd="preferred")
    server = server_context(site_b, _dead_kme(site_b), qkd="preferred")
    with OneShotServer(echo_once(server)) as srv:
        info = _connect(client, srv.port)
        srv.join()
    assert info.mode == "classic"  # type: ignore[attr-defined]
    # The key was spent on a server that could not use it: it is remembered, and not offered keys again.
    assert ("localhost", srv.port) in client.non_qkd_peers

    strict = server_context(site_b, _dead_kme(site_b), qkd="required")
    with OneShotServer(echo_once(strict)) as srv:
        with pytest.raises(QKDHandshakeError):
            _connect(client_context(site_b, kme_a, qkd="preferred"), srv.port)
        srv.join()
    assert srv.errors


def test_no_key_is_spent_on_a_server_known_not_to_speak_qkd(site_b: Site, kme_a: KmeClient) -> None:
    import ssl

    classic = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    classic.load_cert_chain(site_b.app_cert, site_b.app_key)

    def handle(raw: socket.socket) -> object:
        with classic.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(b"echo:" + tls.recv(100))
            return None

    client = client_context(site_b, kme_a, qkd="preferred")
    with OneShotServer(handle, connections=2) as srv:
        before = kme_a.requests_sent
        assert _connect(client, srv.port).mode == "classic"  # type: ignore[attr-defined]
        spent_first = kme_a.requests_sent - before
        before = kme_a.requests_sent
        assert _connect(client, srv.port).mode == "classic"  # type: ignore[attr-defined]
        spent_second = kme_a.requests_sent - before
        srv.join()
    assert spent_first >= 1
    assert spent_second == 0


@pytest.mark.parametrize("server_hostname", ["localhost", None])
def test_target_sae_from_the_directory(
    server_hostname: str | None, site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    """No target_sae_id: the directory names the server (here by its IP, also when SNI says localhost)."""
    client = client_context(site_b, kme_a, qkd="required")  # directory: {"127.0.0.1": 2001}
    with OneShotServer(echo_once(server_context(site_b, kme_b, qkd="required"))) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        with client.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"ping")
            assert tls.recv(100) == b"echo:ping"
            assert tls.info is not None and tls.info.mode == "qkd" and tls.target_sae_id == SERVER_SAE
        srv.join()
    assert not srv.errors, srv.errors
