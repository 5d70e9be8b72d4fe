"""A client asks its KME for everything before it opens TCP, so the ClientHello leaves with the connection.

A server with a short handshake timeout must never see an idle connection while the client waits for a slow
KME. The client's KME sits behind the delay relay (150 ms each way); a raw TCP listener notes when it accepts
and when the first byte of the ClientHello arrives. Applies to ``QKDSocket.connect``,
``qkdtls.net.aio.open_connection``, ``qkdtls s_client`` and the HTTPS client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from tests.tls_qkd.conftest import HOST, SERVER_SAE, TIMEOUT, Site, client_context

from qkdtls.apps.https import tls_connect
from qkdtls.apps.relay import RelayProcess
from qkdtls.net.aio import open_connection
from qkdtls.net.context import QKDContext

DELAY_MS = 150.0  # one way: every KME round trip costs 300 ms more (about 0.9 s for a first key)
FIRST_BYTE_BOUND = 0.3  # accept -> first ClientHello byte; one KME round trip alone is 0.3 s


@pytest.fixture
def slow_kme(site_a: Site) -> Iterator[Site]:
    """Site A with its KME reached through the delay relay."""
    host, port = site_a.kme.url.removeprefix("https://").rsplit(":", 1)
    with RelayProcess({"kme": (host, int(port))}, DELAY_MS) as relay:
        relay_host, relay_port = relay.addresses["kme"]
        kme = dataclasses.replace(site_a.kme, url=f"https://{relay_host}:{relay_port}", timeout=5.0)
        yield dataclasses.replace(site_a, kme=kme)


class FirstByteListener:
    """Accepts one connection and notes (accept time, first byte time), then drops it."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0.0
        self.first_byte = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        self.accepted = time.monotonic()
        conn.settimeout(TIMEOUT)
        if conn.recv(1):
            self.first_byte = time.monotonic()
        conn.close()

    def __enter__(self) -> FirstByteListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(TIMEOUT)
        self.sock.close()


def _socket_connect(context: QKDContext, port: int, site_b: Site, slow: Site) -> None:
    tls = context.wrap_socket(socket.socket(), server_hostname="localhost", target_sae_id=SERVER_SAE)
    try:
        tls.connect((HOST, port))
    finally:
        tls.close()


def _aio_connect(context: QKDContext, port: int, site_b: Site, slow: Site) -> None:
    asyncio.run(
        open_connection(HOST, port, context=context, server_hostname="localhost", target_sae_id=SERVER_SAE)
    )


def _https_connect(context: QKDContext, port: int, site_b: Site, slow: Site) -> None:
    tls_connect(context, (HOST, port), server_hostname="localhost", target_sae_id=SERVER_SAE).close()


def _s_client(context: QKDContext, port: int, site_b: Site, slow: Site) -> None:
    kme = slow.kme
    argv = [
        sys.executable, "-m", "qkdtls", "s_client", f"{HOST}:{port}", "--servername", "localhost",
        "--target-sae", str(SERVER_SAE), "--qkd", "required", "--cafile", str(site_b.app_ca), "--quiet",
        "--kme", kme.url, "--cert", str(kme.certfile), "--key", str(kme.keyfile), "--kme-ca", str(kme.cafile),
    ]
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT + 5)


CONNECTS: dict[str, Callable[[QKDContext, int, Site, Site], None]] = {
    "QKDSocket.connect": _socket_connect,
    "aio.open_connection": _aio_connect,
    "https.tls_connect": _https_connect,
    "s_client": _s_client,
}


@pytest.mark.parametrize("how", list(CONNECTS))
def test_client_hello_follows_the_tcp_handshake_at_once(how: str, slow_kme: Site, site_b: Site) -> None:
    context = client_context(site_b, slow_kme.kme, qkd="required")  # a new KME client: nothing cached
    with FirstByteListener() as listener:
        started = time.monotonic()
        try:
            CONNECTS[how](context, listener.port, site_b, slow_kme)
        except OSError:
            pass  # the listener hangs up after the first byte
    context.close()
    assert listener.first_byte, "no ClientHello arrived"
    assert listener.accepted - started >= 2 * DELAY_MS / 1000, "the KME was not asked before connecting"
    assert listener.first_byte - listener.accepted < FIRST_BYTE_BOUND
