"""Fixtures of the application tests: a PKI issued once per session, classic TLS contexts over it."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdtls.apps.demo import DemoSites, demo_sites
from qkdtls.pki import PkiLayout, ZoneSpec, build_testbed_pki

SERVER_SAE = 2001
CLIENT_SAE = 1001


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    root: Path = tmp_path_factory.mktemp("apps-pki")
    return build_testbed_pki(
        root, [ZoneSpec(1, {CLIENT_SAE: 0x1001}), ZoneSpec(2, {SERVER_SAE: 0x2001})]
    )


@pytest.fixture(scope="session")
def classic_server_context(pki: PkiLayout) -> ssl.SSLContext:
    issued = pki.zones[2].app_servers[SERVER_SAE]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(issued.cert, issued.key)
    return ctx


@pytest.fixture(scope="session")
def classic_client_context(pki: PkiLayout) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.trust_bundle))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


@pytest.fixture(scope="module")
def qkd_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoSites]:
    """A running two-site testbed with TLS-QKD contexts for SAE 1001 (site A) and SAE 2001 (site B).

    Module scope: its KME processes and prefetch threads end with the module that used it.
    """
    root = tmp_path_factory.mktemp("apps-testbed")
    with demo_sites(root, progress=lambda _: None, key_bytes=1 << 18) as sites:
        yield sites
