"""Connection caps and the short timeout for unauthenticated connections, over real loopback sockets.

Clients come from several loopback addresses (127.0.0.x) so that per-address caps can be told apart."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qkdtls.http11.server import (
    CLOSED_EVICTED,
    CLOSED_EVICTED_ADDRESS,
    CLOSED_FULL,
    CLOSED_UNAUTHENTICATED_TIMEOUT,
    HttpServer,
    Request,
    Response,
    Router,
    ServerLimits,
)
from qkdtls.pki import Zone, ZoneSpec, build_testbed_pki

CAPS = ServerLimits(
    max_connections=12,
    max_unauthenticated=8,
    max_unauthenticated_per_address=4,
    unauthenticated_timeout=1.5,
    require_client_certificate=True,
)


def _error(status: int, message: str) -> Response:
    return Response(status, json.dumps({"message": message}).encode())


async def _whoami(request: Request) -> Response:
    ssl_object = request.transport.get_extra_info("ssl_object")
    if ssl_object is None or not ssl_object.getpeercert(binary_form=True):
        return _error(401, "a client certificate is required")
    return Response(200, b'{"ok":true}')


@dataclass
class Served:
    server: HttpServer
    zone: Zone

    def client_context(self, *, certificate: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.zone.ca))
        if certificate:
            ctx.load_cert_chain(self.zone.saes[1001].cert, self.zone.saes[1001].key)
        return ctx

    async def connect(
        self, source: str = "127.0.0.1", *, tls: bool = True, certificate: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                self.server.port,
                ssl=self.client_context(certificate=certificate) if tls else None,
                local_addr=(source, 0),
            ),
            10,
        )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    zone = build_testbed_pki(tmp_path / "pki", [ZoneSpec(1, {1001: 0x1001})]).zones[1]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(zone.kme_server.cert, zone.kme_server.key)
    ctx.load_verify_locations(cafile=str(zone.ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    router = Router()
    router.add("GET", "/whoami", _whoami)
    server = HttpServer(router, error_response=_error, limits=CAPS)
    await server.start("127.0.0.1", 0, ssl_context=ctx, handshake_timeout=3.0)
    try:
        yield Served(server, zone)
    finally:
        await server.close(1.0)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bytes]:
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return int(head.split()[1]), await asyncio.wait_for(reader.readexactly(length), 10)


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except (ConnectionError, ssl.SSLError):
        return True


async def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_flood_is_capped_per_address_and_overall_while_an_authenticated_client_is_served(
    served: Served,
) -> None:
    server = served.server
    sae = await served.connect(certificate=True)
    assert await _get(*sae) == (200, b'{"ok":true}')
    assert server.unauthenticated_connections == 0 and server.open_connections == 1

    # TLS connections without a certificate from one address: at most 4 are kept, the oldest go first.
    flood = [await served.connect("127.0.0.2") for _ in range(10)]
    await _until(lambda: server.closed[CLOSED_EVICTED_ADDRESS] >= 6)
    assert server.unauthenticated_connections == 4 and server.open_connections == 5
    for reader, _ in flood[:6]:
        assert await _closed_by_server(reader)
    # A request without a certificate still gets its 401 (and does not authenticate the connection).
    status, body = await _get(*flood[-1])
    assert status == 401 and json.loads(body) == {"message": "a client certificate is required"}
    assert server.unauthenticated_connections == 4

    # From many addresses (plain TCP that never starts TLS included): at most 8 unauthenticated overall.
    more = [await served.connect(f"127.0.0.{3 + i % 4}", tls=i % 2 == 0) for i in range(16)]
    await asyncio.sleep(0.1)
    assert server.unauthenticated_connections <= 8 and server.closed[CLOSED_EVICTED] >= 8
    assert server.open_connections <= 9

    # The authenticated client is untouched and served; a new one gets in and authenticates.
    assert await _get(*sae) == (200, b'{"ok":true}')
    late = await served.connect("127.0.0.2", certificate=True)
    assert await _get(*late) == (200, b'{"ok":true}')
    assert server.open_connections <= 10
    for _, writer in [sae, late, *flood, *more]:
        writer.close()


async def test_unauthenticated_connections_time_out_quickly_authenticated_ones_do_not(served: Served) -> None:
    server = served.server
    sae = await served.connect(certificate=True)
    assert (await _get(*sae))[0] == 200
    idle = await served.connect()  # handshake without a certificate, then nothing
    asked = await served.connect()
    assert (await _get(*asked))[0] == 401
    started = time.monotonic()
    assert await _closed_by_server(idle[0]) and await _closed_by_server(asked[0])
    # 1.5 s of idleness, checked once a second; far below the 75 s keep-alive of the authenticated.
    assert time.monotonic() - started < 5.0
    assert server.closed[CLOSED_UNAUTHENTICATED_TIMEOUT] == 2
    assert await _get(*sae) == (200, b'{"ok":true}')
    sae[1].close()


async def test_when_full_of_authenticated_connections_new_ones_are_closed_at_once(served: Served) -> None:
    server = served.server
    kept = []
    for i in range(12):
        conn = await served.connect(f"127.0.0.{10 + i}", certificate=True)
        assert (await _get(*conn))[0] == 200
        kept.append(conn)
    assert server.open_connections == 12 and server.unauthenticated_connections == 0
    refused = await served.connect("127.0.0.30", tls=False)
    assert await _closed_by_server(refused[0])
    assert server.closed[CLOSED_FULL] == 1
    assert all([(await _get(*conn))[0] == 200 for conn in kept])
    for _, writer in [*kept, refused]:
        writer.close()
