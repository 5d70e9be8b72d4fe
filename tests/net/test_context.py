"""QKDContext decisions that need no KME: validation, policy before a key is fetched, certificates."""

from __future__ import annotations

import dataclasses
import gc
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from tests.peers.clients import PeerPki, tls_pki

from qkdtls.etsi014.client import KmeClientSettings
from qkdtls.net.context import QKDContext
from qkdtls.net.errors import QKDConfigurationError
from qkdtls.net.qkd_keys import NonQkdPeers
from qkdtls.testbed import free_port

__all__ = ["tls_pki"]  # the fixture, imported for pytest


def _unreachable_kme(p: PeerPki) -> KmeClientSettings:
    return KmeClientSettings(
        url=f"https://127.0.0.1:{free_port()}",
        certfile=p.client_cert,
        keyfile=p.client_key,
        cafile=p.ca_cert,
        timeout=0.5,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"qkd": "sometimes"}, "qkd must be"),
        ({"profiles": ()}, "profiles"),
        ({"profiles": ("secure", "fast")}, "profiles"),
        ({"handshake_timeout": 0}, "handshake_timeout"),
        ({"rekey_after_bytes": 0}, "rekey_after_bytes"),
    ],
)
def test_invalid_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QKDContext("client", **kwargs)  # type: ignore[arg-type]


def test_required_needs_a_kme() -> None:
    with pytest.raises(QKDConfigurationError, match="needs a KME"):
        QKDContext("client", qkd="required")


def test_unreadable_credentials_name_the_file(tmp_path: Path, tls_pki: PeerPki) -> None:
    with pytest.raises(QKDConfigurationError, match=r"absent\.pem"):
        QKDContext("server", certfile=tmp_path / "absent.pem")
    secret = tmp_path / "not-a-key.pem"
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    with pytest.raises(QKDConfigurationError) as info:
        QKDContext("server", certfile=tls_pki.server_cert, keyfile=secret)
    assert "c2VjcmV0" not in str(info.value) and "not-a-key.pem" in str(info.value)


def test_policy_off_and_unknown_target_fetch_no_key(tls_pki: PeerPki) -> None:
    context = QKDContext("client", kme=_unreachable_kme(tls_pki), qkd="off")
    assert context.client_offer("localhost", 443, 7) is None  # never asks the (unreachable) KME
    preferred = QKDContext("client", kme=_unreachable_kme(tls_pki), sae_directory={"known": 7})
    assert preferred.client_offer("unknown", 443) is None
    strict = QKDContext("client", kme=_unreachable_kme(tls_pki), qkd="required")
    with pytest.raises(QKDConfigurationError, match="target_sae_id"):
        strict.client_offer("unknown", 443)
    for ctx in (context, preferred, strict):
        ctx.close()


def test_directory_resolves_the_target(tls_pki: PeerPki) -> None:
    context = QKDContext("client", sae_directory={"app.example:8443": 42, "app.example": 41})
    assert context.resolve_target("app.example", 8443) == 42
    assert context.resolve_target("app.example", 443) == 41
    assert context.resolve_target("app.example", 443, explicit=5) == 5


def test_non_qkd_memory_expires() -> None:
    memory = NonQkdPeers(ttl=0.05)
    memory.remember("Host.Example", 443)
    assert ("host.example", 443) in memory
    time.sleep(0.1)
    assert ("host.example", 443) not in memory


def test_wrap_socket_checks_the_side(tls_pki: PeerPki) -> None:
    client = QKDContext("client", qkd="off", cafile=tls_pki.ca_cert)
    with socket.socket() as sock, pytest.raises(ValueError, match="client context"):
        client.wrap_socket(sock, server_side=True)


def test_classic_fallback_context_is_tls13_with_the_same_certificate(tls_pki: PeerPki) -> None:
    server = QKDContext(
        "server", certfile=tls_pki.server_cert, keyfile=tls_pki.server_key, alpn_protocols=["h2"]
    )
    classic = server.classic_context()
    assert classic is not None and classic.minimum_version == ssl.TLSVersion.TLSv1_3
    assert QKDContext("server").classic_context() is None
    config = server.server_config()
    assert config.certificate_chain and config.alpn_protocols == ("h2",)
    assert "private_key" not in repr(config)


def test_client_without_cafile_trusts_the_system_bundle() -> None:
    config = QKDContext("client", qkd="off").client_config()
    assert config.trust  # the system roots, as ssl.create_default_context() would use


def test_kme_client_created_by_a_context_ends_with_it(tls_pki: PeerPki) -> None:
    def prefetchers() -> int:
        return sum(t.name == "kme-client-prefetch" and t.is_alive() for t in threading.enumerate())

    before = prefetchers()
    closed = QKDContext("client", kme=dataclasses.replace(_unreachable_kme(tls_pki), prefetch=2))
    forgotten = QKDContext("client", kme=dataclasses.replace(_unreachable_kme(tls_pki), prefetch=2))
    assert prefetchers() == before + 2
    closed.close()
    del forgotten  # never closed: the garbage collector ends its KME client
    gc.collect()
    deadline = time.monotonic() + 5
    while prefetchers() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert prefetchers() == before
