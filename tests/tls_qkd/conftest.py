"""Two real KMEs on loopback (the testbed) and the SAEs that talk through them.

SAE 1001 (site A, KME 1) is the TLS client; SAE 2001 (site B, KME 2) runs the TLS server. SAEs 1002 (site A)
and 2002 (site B) are the other SAEs of each site: strangers to the server's access control, or co-slaves of
a multicast key. Their KME clients are shared by all tests (kept-alive connections, as an application would
keep them); a test that stops a KME builds its own testbed.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qkdtls.etsi014.client import KmeClient, KmeClientSettings
from qkdtls.net.aio import close_writer, start_server
from qkdtls.net.context import QKDContext
from qkdtls.testbed import Testbed
from qkdtls.tls.config import QkdOffer
from qkdtls.tls.events import ConnectionInfo

CLIENT_SAE = 1001
SERVER_SAE = 2001
SITE_A_OTHER_SAE = 1002
SITE_B_OTHER_SAE = 2002
TESTBED_SAES = {1: (CLIENT_SAE, SITE_A_OTHER_SAE), 2: (SERVER_SAE, SITE_B_OTHER_SAE)}
HOST = "127.0.0.1"
TIMEOUT = 10.0
_DEC_KEYS_RESPONSES = re.compile(
    r'qkdtls_kme_responses_total\{route="[^"]*dec_keys",status="\d+"\} ([0-9.e+]+)'
)


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
    root = tmp_path_factory.mktemp("testbed")
    with Testbed.create(root, saes=TESTBED_SAES, initial_key_bytes=1 << 18, service=service) as tb:
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


def ping_echo(context: QKDContext, port: int, source: str | None = None) -> ConnectionInfo:
    """A client connection to an echo server (from address ``source``): ping, check the echo, close."""
    raw = socket.create_connection(
        (HOST, port), timeout=TIMEOUT, source_address=(source, 0) if source else None
    )
    with context.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE) as tls:
        tls.sendall(b"ping")
        assert tls.recv(100) == b"echo:ping"
        assert tls.info is not None
        return tls.info


def echo_once(context: QKDContext) -> Callable[[socket.socket], object]:
    """A server handler: TLS-QKD handshake, echo one message with a prefix, close; returns the info."""

    def handle(raw: socket.socket) -> object:
        with context.wrap_socket(raw, server_side=True) as tls:
            data = tls.recv(65536)
            tls.sendall(b"echo:" + data)
            return tls.info

    return handle


@pytest.fixture(scope="session")
def kme_1002(testbed: Testbed) -> Iterator[KmeClient]:
    with KmeClient(site_for(testbed, SITE_A_OTHER_SAE).kme) as client:
        yield client


@pytest.fixture(scope="session")
def kme_2002(testbed: Testbed) -> Iterator[KmeClient]:
    with KmeClient(site_for(testbed, SITE_B_OTHER_SAE).kme) as client:
        yield client


class FixedOfferContext(QKDContext):
    """A client that names a key of its own choosing in its ClientHello, as any SAE with its own TLS stack
    can: the peer under test must not rely on the client's good behaviour."""

    def __init__(self, offer: QkdOffer | None, **kwargs: Any) -> None:
        super().__init__("client", **kwargs)
        self.fixed_offer = offer

    def client_offer(
        self, host: str | None, port: int | None, target_sae_id: int | None = None
    ) -> QkdOffer | None:
        return self.fixed_offer


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object]]


class AioServer:
    """``qkdtls.net.aio.start_server`` on an event loop of its own thread (what ``qkdtls s_server`` runs):
    handshakes run concurrently. Echoes one read with a prefix and closes (or runs ``handler``, whose
    results or exceptions land in ``results``); ``infos`` lists the connections."""

    def __init__(self, context: QKDContext, host: str = HOST, handler: Handler | None = None) -> None:
        self.context = context
        self.host = host
        self.handler = handler
        self.results: list[object] = []
        self.port = 0
        self.infos: list[ConnectionInfo] = []
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.infos.append(writer.get_extra_info("qkd"))
            if self.handler is not None:
                try:
                    self.results.append(await self.handler(reader, writer))
                except Exception as exc:  # reported to the test
                    self.results.append(exc)
                return
            try:
                data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
                writer.write(b"echo:" + data)
                await writer.drain()
            except (OSError, TimeoutError):
                pass
            finally:
                await close_writer(writer)

        server = await start_server(handle, self.host, 0, context=self.context)
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        async with server:
            await self._stop.wait()
        # Connections still open (a peer that never finished its handshake, say) end with the server.
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> AioServer:
        self._thread.start()
        assert self._started.wait(TIMEOUT), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        stop = self._stop
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(TIMEOUT)
        self._loop.close()


def kme_dec_keys_answered(testbed: Testbed, kme_id: int) -> int:
    """How many dec_keys requests the KME has answered (any status), from its /metrics page."""
    cert, key, ca = testbed.admin_credentials(kme_id)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(cert, key)
    port = testbed.kmes[kme_id].sae_port
    conn = http.client.HTTPSConnection(HOST, port, context=ctx, timeout=TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    total = 0.0
    for line in text.splitlines():
        match = _DEC_KEYS_RESPONSES.match(line)
        if match:
            total += float(match.group(1))
    return int(total)
