"""Prefetched keys: once the pool is warm, a handshake makes no request to the client's KME.

Proved the hard way: the client's KME is stopped, and the next handshakes still run in QKD mode on pooled
keys (the server's KME collects them); when the pool is empty, ``preferred`` falls back within the KME
timeout. This module builds its own testbed because it stops a KME.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator

import pytest
from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import (
    CLIENT_SAE,
    HOST,
    SERVER_SAE,
    TIMEOUT,
    Site,
    client_context,
    echo_once,
    server_context,
    site_for,
)

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.context import QKDContext
from qkdtls.testbed import Testbed

POOL = 3


@pytest.fixture(scope="module")
def own_testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    with Testbed.create(tmp_path_factory.mktemp("prefetch-testbed"), initial_key_bytes=1 << 16) as tb:
        yield tb


def _connect(context: QKDContext, port: int) -> tuple[object, float]:
    raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
    started = time.monotonic()
    with context.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE) as tls:
        elapsed = time.monotonic() - started
        tls.sendall(b"ping")
        assert tls.recv(100) == b"echo:ping"
        return tls.info, elapsed


def _pool_size(context: QKDContext) -> int:
    kme = context.keys.kme
    assert isinstance(kme, KmeClient)
    prefetcher = kme._prefetcher  # the pool is the KME client's; its fill level is what this test waits on
    assert prefetcher is not None
    return prefetcher.available(str(SERVER_SAE))


def test_pooled_keys_need_no_kme_round_trip(own_testbed: Testbed) -> None:
    client_site = site_for(own_testbed, CLIENT_SAE)
    server_site: Site = site_for(own_testbed, SERVER_SAE)
    settings = dataclasses.replace(client_site.kme, timeout=1.0)
    client = client_context(server_site, settings, qkd="preferred", prefetch=POOL)
    with KmeClient(server_site.kme) as server_kme:
        server = server_context(server_site, server_kme, qkd="preferred")
        with OneShotServer(echo_once(server), connections=POOL + 2) as srv:
            info, _ = _connect(client, srv.port)  # learns the SAE ID, opens the pool for SAE 2001
            assert info.mode == "qkd"  # type: ignore[attr-defined]
            deadline = time.monotonic() + TIMEOUT
            while _pool_size(client) < POOL:
                assert time.monotonic() < deadline, "prefetch pool never filled"
                time.sleep(0.02)

            own_testbed.stop_kme(1)  # the client's KME is gone from here on
            used = {info.key_id}  # type: ignore[attr-defined]
            for _ in range(POOL):
                info, _ = _connect(client, srv.port)
                assert info.mode == "qkd"  # type: ignore[attr-defined]
                used.add(info.key_id)  # type: ignore[attr-defined]
            assert len(used) == POOL + 1

            started = time.monotonic()
            info, _ = _connect(client, srv.port)  # pool empty, KME down: bounded fallback
            assert info.mode == "classic"  # type: ignore[attr-defined]
            assert time.monotonic() - started < 2 * settings.timeout + 1.0
            srv.join()
        assert not srv.errors, srv.errors
    client.close()
