"""asyncio streams over TLS-QKD through two real KMEs: open_connection ↔ start_server.

The server must run handshakes concurrently: an idle (or slow) TCP peer never delays a normal client, and
is dropped at its own handshake deadline. KME calls run off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from collections.abc import AsyncIterator

import pytest
from tests.tls_qkd.conftest import HOST, SERVER_SAE, Site, client_context, server_context

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.aio import close_writer, open_connection, start_server
from qkdtls.net.errors import QKDHandshakeTimeout, QKDPolicyError
from qkdtls.tls.alerts import AlertDescription
from qkdtls.tls.events import ConnectionInfo

STEP = 10.0  # bound for any single await in these tests


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        await close_writer(writer)


@pytest.fixture
async def echo_server(site_b: Site, kme_b: KmeClient) -> AsyncIterator[tuple[int, list[ConnectionInfo]]]:
    seen: list[ConnectionInfo] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("qkd"))
        await _echo(reader, writer)

    context = server_context(site_b, kme_b, qkd="preferred", handshake_timeout=1.0)
    server = await start_server(handle, HOST, 0, context=context)
    async with server:
        yield server.sockets[0].getsockname()[1], seen
        server.close()


async def test_qkd_streams_both_ways(
    echo_server: tuple[int, list[ConnectionInfo]], site_b: Site, kme_a: KmeClient
) -> None:
    port, seen = echo_server
    context = client_context(site_b, kme_a, qkd="required")
    reader, writer = await open_connection(
        HOST, port, context=context, server_hostname="localhost", target_sae_id=SERVER_SAE
    )
    info: ConnectionInfo = writer.get_extra_info("qkd")
    assert (info.mode, info.profile) == ("qkd", "secure")
    payload = bytes(range(256)) * 400  # several records each way
    writer.write(payload)
    await writer.drain()
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), STEP)
    assert echoed == payload
    await close_writer(writer)
    assert seen[0].key_id == info.key_id and seen[0].peer_sae_id == 1001


async def test_idle_peer_does_not_block_others_and_is_dropped_at_its_deadline(
    echo_server: tuple[int, list[ConnectionInfo]], site_b: Site, kme_a: KmeClient
) -> None:
    port, _ = echo_server
    loop = asyncio.get_running_loop()
    idle = socket.create_connection((HOST, port), timeout=STEP)  # connects, never says anything
    try:
        started = time.monotonic()
        context = client_context(site_b, kme_a, qkd="required")
        reader, writer = await open_connection(
            HOST, port, context=context, server_hostname="localhost", target_sae_id=SERVER_SAE
        )
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), STEP) == b"hello"
        assert time.monotonic() - started < 1.0  # well before the idle peer's 1 s deadline
        await close_writer(writer)
        # The idle peer is closed by the server once its handshake deadline (1 s) passes.
        idle.setblocking(False)
        data = await asyncio.wait_for(loop.sock_recv(idle, 10), 3.0)
        assert data == b""
    finally:
        idle.close()


async def test_classic_client_is_handed_to_openssl(
    echo_server: tuple[int, list[ConnectionInfo]], site_b: Site
) -> None:
    port, seen = echo_server
    ctx = ssl.create_default_context(cafile=str(site_b.app_ca))
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, ssl=ctx, server_hostname="localhost"), STEP
    )
    writer.write(b"classic")
    assert await asyncio.wait_for(reader.readexactly(7), STEP) == b"classic"
    writer.close()
    assert seen[-1].mode == "classic" and seen[-1].version == "TLSv1.3"


async def test_required_server_refuses_classic_async_client(site_b: Site, kme_b: KmeClient) -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("a refused client must never reach the application")

    context = server_context(site_b, kme_b, qkd="required")
    server = await start_server(never, HOST, 0, context=context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = client_context(site_b, None, qkd="off")
        with pytest.raises(QKDPolicyError) as failure:
            await open_connection(HOST, port, context=client, server_hostname="localhost")
        assert failure.value.alert == AlertDescription.insufficient_security
        assert failure.value.sent_by_peer


async def test_client_handshake_timeout(site_b: Site) -> None:
    with socket.create_server((HOST, 0)) as silent:  # accepts (backlog) and never answers
        client = client_context(site_b, None, qkd="off")
        started = time.monotonic()
        with pytest.raises(QKDHandshakeTimeout):
            await open_connection(
                HOST,
                silent.getsockname()[1],
                context=client,
                server_hostname="localhost",
                ssl_handshake_timeout=0.5,
            )
        assert time.monotonic() - started < 2.0


async def test_a_hung_kme_never_blocks_the_event_loop(site_b: Site, kme_a: KmeClient) -> None:
    """The server's KME accepts TCP and never answers: the QKD client waits (bounded), others do not."""
    with socket.create_server((HOST, 0)) as hung_kme:
        settings = dataclasses.replace(
            site_b.kme, url=f"https://{HOST}:{hung_kme.getsockname()[1]}", timeout=1.0
        )
        context = server_context(site_b, settings, qkd="preferred")
        server = await start_server(_echo, HOST, 0, context=context)
        async with server:
            port = server.sockets[0].getsockname()[1]
            qkd_client = client_context(site_b, kme_a, qkd="preferred")
            started = time.monotonic()
            waiting = asyncio.ensure_future(
                open_connection(
                    HOST, port, context=qkd_client, server_hostname="localhost", target_sae_id=SERVER_SAE
                )
            )
            await asyncio.sleep(0.1)  # the server is now inside its (hung) dec_keys call
            assert not waiting.done()
            ctx = ssl.create_default_context(cafile=str(site_b.app_ca))
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, port, ssl=ctx, server_hostname="localhost"), STEP
            )
            writer.write(b"meanwhile")
            assert await asyncio.wait_for(reader.readexactly(9), STEP) == b"meanwhile"
            assert time.monotonic() - started < 0.9  # served while the KME call was still pending
            writer.close()
            _, writer2 = await asyncio.wait_for(waiting, STEP)
            info: ConnectionInfo = writer2.get_extra_info("qkd")
            assert info.mode == "classic"  # the server gave up on its KME and completed TLS 1.3
            assert time.monotonic() - started < 1.0 + 2.0
            await close_writer(writer2)
            server.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP to a TLS port
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a ClientHello that is cut short
        bytes(range(256)) * 4,  # noise
    ],
    ids=["http", "truncated-hello", "noise"],
)
async def test_hostile_input_is_answered_and_closed_without_harming_others(
    garbage: bytes, echo_server: tuple[int, list[ConnectionInfo]], site_b: Site, kme_a: KmeClient
) -> None:
    port, _ = echo_server
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(garbage)
    await writer.drain()
    # The server answers with an alert (or nothing) and closes within its 1 s handshake deadline.
    answer = await asyncio.wait_for(reader.read(), 3.0)
    assert not answer or answer[:1] == b"\x15"
    writer.close()
    context = client_context(site_b, kme_a, qkd="required")
    reader2, writer2 = await open_connection(
        HOST, port, context=context, server_hostname="localhost", target_sae_id=SERVER_SAE
    )
    writer2.write(b"still fine")
    assert await asyncio.wait_for(reader2.readexactly(10), STEP) == b"still fine"
    await close_writer(writer2)
