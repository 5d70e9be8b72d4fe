"""Two real KMEs on loopback (the testbed) and the SAEs that talk through them.

SAE 1001 (site A, KME 1) is the TLS client; SAE 2001 (site B, KME 2) runs the TLS server. Their KME clients
are shared by all tests (kept-alive connections, as an application would keep them); a test that stops a
KME builds its own testbed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qkdtls.etsi014.client import KmeClient, KmeClientSettings
from qkdtls.net.context import QKDContext
from qkdtls.testbed import Testbed

CLIENT_SAE = 1001
SERVER_SAE = 2001
HOST = "127.0.0.1"
TIMEOUT = 10.0


@dataclass(frozen=True)
class Site:
    sae_id: int
    kme: KmeClientSettings
    app_cert: Path
    app_key: Path
    app_ca: Path  # CA of this site's zone: what a peer trusts for this site's application server


def site_for(tb: Testbed, sae_id: int) -> Site:
    cert, key, ca = tb.sae_credentials(sae_id)
    app_cert, app_key, app_ca = tb.app_server_credentials(sae_id)
    settings = KmeClientSettings(
        url=tb.sae_url(tb.kme_of(sae_id)), certfile=cert, keyfile=key, cafile=ca, timeout=3.0
    )
    return Site(sae_id, settings, app_cert, app_key, app_ca)


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    # recollect_window = 0: a collected key is gone from its KME at once, as the tests of lost and spent
    # keys expect (by default its slave may collect it again for a minute: docs/design.md).
    service = {"recollect_window": 0.0}
    with Testbed.create(tmp_path_factory.mktemp("testbed"), initial_key_bytes=1 << 18, service=service) as tb:
        yield tb


@pytest.fixture(scope="session")
def site_a(testbed: Testbed) -> Site:
    return site_for(testbed, CLIENT_SAE)


@pytest.fixture(scope="session")
def site_b(testbed: Testbed) -> Site:
    return site_for(testbed, SERVER_SAE)


@pytest.fixture(scope="session")
def kme_a(site_a: Site) -> Iterator[KmeClient]:
    with KmeClient(site_a.kme) as client:
        yield client


@pytest.fixture(scope="session")
def kme_b(site_b: Site) -> Iterator[KmeClient]:
    with KmeClient(site_b.kme) as client:
        yield client


def client_context(site_b: Site, kme: KmeClient | KmeClientSettings | None, **kwargs: Any) -> QKDContext:
    kwargs.setdefault("handshake_timeout", TIMEOUT)
    return QKDContext("client", kme=kme, cafile=site_b.app_ca, sae_directory={HOST: SERVER_SAE}, **kwargs)


def server_context(site_b: Site, kme: KmeClient | KmeClientSettings | None, **kwargs: Any) -> QKDContext:
    kwargs.setdefault("handshake_timeout", TIMEOUT)
    return QKDContext("server", kme=kme, certfile=site_b.app_cert, keyfile=site_b.app_key, **kwargs)


def echo_once(context: QKDContext) -> Callable[[socket.socket], object]:
    """A server handler: TLS-QKD handshake, echo one message with a prefix, close; returns the info."""

    def handle(raw: socket.socket) -> object:
        with context.wrap_socket(raw, server_side=True) as tls:
            data = tls.recv(65536)
            tls.sendall(b"echo:" + data)
            return tls.info

    return handle
