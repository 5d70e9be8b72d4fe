"""In-connection QKD rekeying (secure profile, 0xFEA8) triggered by the context's byte or time limit.

The client fetches a fresh key from its KME, the server collects it with dec_keys, both switch traffic keys;
data must flow unchanged across every switch, and every rekey must use a new key.
"""

from __future__ import annotations

import asyncio
import socket
import time

from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import HOST, SERVER_SAE, TIMEOUT, Site, client_context, server_context

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.aio import close_writer, open_connection, start_server

CHUNK = 16 * 1024
TOTAL = 256 * 1024
LIMIT = 64 * 1024


def _echo_until_eof(context):  # type: ignore[no-untyped-def]
    def handle(raw: socket.socket) -> object:
        with context.wrap_socket(raw, server_side=True) as tls:
            while data := tls.recv(65536):
                tls.sendall(data)
            return (tls.info, list(tls.rekeyed_key_ids))

    return handle


def test_rekey_after_bytes_blocking(site_b: Site, kme_a: KmeClient, kme_b: KmeClient) -> None:
    client = client_context(site_b, kme_a, qkd="required", rekey_after_bytes=LIMIT)
    server = server_context(site_b, kme_b, qkd="required")
    with OneShotServer(_echo_until_eof(server)) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        with client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE) as tls:
            first_key = tls.info.key_id  # type: ignore[union-attr]
            for i in range(TOTAL // CHUNK):
                block = bytes([i % 251]) * CHUNK
                tls.sendall(block)
                got = bytearray()
                while len(got) < CHUNK:
                    n = len(got)
                    got += tls.recv(CHUNK - n)
                    assert len(got) > n, "connection closed early"
                assert got == block
            client_rekeys = list(tls.rekeyed_key_ids)
        srv.join()
    assert not srv.errors, srv.errors
    _, server_rekeys = srv.results[0]  # type: ignore[misc]
    # 256 KiB each way with a 64 KiB limit on the sum: several rekeys, each acknowledged.
    assert len(client_rekeys) >= 3
    assert server_rekeys[: len(client_rekeys)] == client_rekeys
    assert len({first_key, *client_rekeys}) == len(client_rekeys) + 1


async def test_rekey_after_bytes_asyncio(site_b: Site, kme_a: KmeClient, kme_b: KmeClient) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        await close_writer(writer)

    server = await start_server(echo, HOST, 0, context=server_context(site_b, kme_b, qkd="required"))
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = client_context(site_b, kme_a, qkd="required", rekey_after_bytes=LIMIT)
        reader, writer = await open_connection(
            HOST, port, context=client, server_hostname="localhost", target_sae_id=SERVER_SAE
        )
        for i in range(TOTAL // CHUNK):
            block = bytes([i % 251]) * CHUNK
            writer.write(block)
            await writer.drain()  # waits while the key of a due rekey is fetched
            assert await asyncio.wait_for(reader.readexactly(CHUNK), TIMEOUT) == block
        rekeys = writer.get_extra_info("qkd_rekeys")
        await close_writer(writer)
    assert len(rekeys) >= 3
    assert len(set(rekeys)) == len(rekeys)


def test_rekey_after_seconds(site_b: Site, kme_a: KmeClient, kme_b: KmeClient) -> None:
    client = client_context(site_b, kme_a, qkd="required", rekey_after_seconds=0.05)
    server = server_context(site_b, kme_b, qkd="required")
    with OneShotServer(_echo_until_eof(server)) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        with client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE) as tls:
            for i in range(4):
                time.sleep(0.06)  # a quiet connection: the time limit, not the byte count, is due
                tls.sendall(b"tick %d" % i)
                assert tls.recv(100) == b"tick %d" % i
            client_rekeys = list(tls.rekeyed_key_ids)
        srv.join()
    assert not srv.errors, srv.errors
    assert len(client_rekeys) >= 2
