"""Key announcement through two real KMEs: after one handshake, the next ones wait for no KME at all.

The client (prefetch pool) announces keys after a handshake; the server collects them in the background, so
later handshakes make no request on either side (counted with ``KmeClient.requests_sent``). Also: a server
without the option, a server that lost what it collected (the KME then refuses the key: bounded fallback
under ``preferred``, and the client stops offering the lost keys), and the asyncio adapters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator

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
)

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.aio import close_writer, open_connection, start_server
from qkdtls.net.context import QKDContext
from qkdtls.net.qkd_keys import CollectedKeys
from qkdtls.tls.events import ConnectionInfo

POOL = 20
DEPTH = 4  # keys kept announced per server; topped up once down to half
# Handshakes counted: they take DEPTH keys from a pool of at least POOL - DEPTH - 1, never down to its
# refill mark (POOL / 2), so the client's KME is asked nothing meanwhile.
LATER = 4
SERVER_NAME = "localhost"  # the client keys its announced queues by (server name, port)


@pytest.fixture
def server_kme(site_b: Site) -> Iterator[KmeClient]:
    with KmeClient(site_b.kme) as kme:  # its own: the test counts its requests
        yield kme


@pytest.fixture
def announcing_client(site_b: Site, site_a: Site) -> Iterator[QKDContext]:
    context = client_context(
        site_b, dataclasses.replace(site_a.kme, prefetch=POOL), qkd="preferred", announce_keys=DEPTH
    )
    yield context
    context.close()


def _kme(context: QKDContext) -> KmeClient:
    kme = context.keys.kme
    assert kme is not None
    return kme


def _connect(context: QKDContext, port: int) -> ConnectionInfo:
    raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
    with context.wrap_socket(raw, server_hostname=SERVER_NAME, target_sae_id=SERVER_SAE) as tls:
        tls.sendall(b"ping")
        assert tls.recv(100) == b"echo:ping"
        info = tls.info
        assert info is not None
        return info


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _pool_ready(client: QKDContext) -> bool:
    return _kme(client).prefetch_available(SERVER_SAE) >= POOL - DEPTH - 1


def _warm(client: QKDContext) -> None:
    """Open and fill the prefetch pool first, so the first handshake announces DEPTH keys."""
    _kme(client).get_key(SERVER_SAE)  # opens the pool for the server's SAE; this key is never used
    _wait_for(lambda: _kme(client).prefetch_available(SERVER_SAE) == POOL, "the pool to fill")


def _settled(client: QKDContext, server: QKDContext, port: int) -> Callable[[], bool]:
    """No KME request is due or running: the pool is far enough above its refill mark (a refill starts at
    half and ends full), DEPTH keys are announced, and the server has collected them all."""

    def check() -> bool:
        return (
            _pool_ready(client)
            and client.keys.announced.count(SERVER_NAME, port) == DEPTH
            and len(server.keys.collected) == DEPTH
            and server.keys.collected.collecting == 0
        )

    return check


def test_later_handshakes_make_no_kme_request(
    announcing_client: QKDContext, site_b: Site, server_kme: KmeClient
) -> None:
    server = server_context(site_b, server_kme, qkd="required", accept_key_announcements=True)
    client = announcing_client
    with OneShotServer(echo_once(server), connections=1 + LATER) as srv:
        _warm(client)
        first = _connect(client, srv.port)  # a pooled key; DEPTH keys announced after the handshake
        _wait_for(_settled(client, server, srv.port), "the announced keys to be collected")
        client_requests, server_requests = _kme(client).requests_sent, server_kme.requests_sent

        later = [_connect(client, srv.port) for _ in range(LATER)]
        _wait_for(lambda: server.keys.collected.collecting == 0, "the background collections")

        assert _kme(client).requests_sent == client_requests, "the client asked its KME"
        # The server's only requests: one dec_keys per announcement of DEPTH / 2 keys, after a handshake and
        # off its path (every later handshake got its key from the cache).
        assert server_kme.requests_sent - server_requests == LATER // (DEPTH // 2)
        srv.join()
    assert not srv.errors, srv.errors
    infos = [first, *later]
    assert all((i.mode, i.profile) == ("qkd", "secure") for i in infos)
    key_ids = [i.key_id for i in infos]
    assert len(set(key_ids)) == len(key_ids), "a key was used twice"
    served = [r.key_id for r in srv.results]  # type: ignore[attr-defined]
    assert served == key_ids
    assert client.keys.announced.count(SERVER_NAME, srv.port) == DEPTH  # topped up after the last one
    assert len(server.keys.collected) == DEPTH
    server.close()


def test_server_without_the_option_collects_as_before(
    announcing_client: QKDContext, site_b: Site, server_kme: KmeClient
) -> None:
    server = server_context(site_b, server_kme, qkd="required")  # accept_key_announcements defaults to False
    client = announcing_client
    with OneShotServer(echo_once(server), connections=2) as srv:
        _warm(client)
        server.keys.own_sae_id()  # asked once per context (GET sae/info/me), not per handshake
        before = server_kme.requests_sent
        infos = [_connect(client, srv.port) for _ in range(2)]
        srv.join()
    assert not srv.errors, srv.errors
    assert all(i.mode == "qkd" for i in infos)
    assert server_kme.requests_sent == before + 2  # one dec_keys per handshake
    assert client.keys.announced.count(SERVER_NAME, srv.port) == 0
    assert len(server.keys.collected) == 0


def test_announced_key_the_server_lost_falls_back_once_then_recovers(
    announcing_client: QKDContext, site_b: Site, server_kme: KmeClient
) -> None:
    server = server_context(site_b, server_kme, qkd="preferred", accept_key_announcements=True)
    client = announcing_client
    with OneShotServer(echo_once(server), connections=3) as srv:
        _warm(client)
        _connect(client, srv.port)
        _wait_for(_settled(client, server, srv.port), "the announced keys to be collected")
        # A restart: what the server collected is gone, and its KME already handed those keys out.
        server.keys.collected = CollectedKeys()

        started = time.monotonic()
        fallback = _connect(client, srv.port)
        elapsed = time.monotonic() - started
        assert (fallback.mode, fallback.key_id) == ("classic", None)
        assert elapsed < site_b.kme.timeout, "the refusal took the KME timeout or longer"
        assert client.keys.announced.count(SERVER_NAME, srv.port) == 0, "the lost keys are still offered"
        assert (SERVER_NAME, srv.port) not in client.non_qkd_peers, "a QKD server was taken for a classic one"

        again = _connect(client, srv.port)  # a pooled key the server's KME still holds
        assert (again.mode, again.profile) == ("qkd", "secure")
        srv.join()
    assert not srv.errors, srv.errors
    server.close()


async def test_asyncio_adapters_announce_and_use_collected_keys(
    announcing_client: QKDContext, site_b: Site, server_kme: KmeClient
) -> None:
    server = server_context(site_b, server_kme, qkd="required", accept_key_announcements=True)
    seen: list[ConnectionInfo] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("qkd"))
        data = await reader.read(100)
        writer.write(b"echo:" + data)
        await writer.drain()
        await close_writer(writer)

    async def connect(port: int) -> ConnectionInfo:
        reader, writer = await open_connection(
            HOST, port, context=client, server_hostname=SERVER_NAME, target_sae_id=SERVER_SAE
        )
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.read(100), TIMEOUT) == b"echo:ping"
        info: ConnectionInfo = writer.get_extra_info("qkd")
        await close_writer(writer)
        return info

    async def wait_for(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    client = announcing_client
    listener = await start_server(handle, HOST, 0, context=server)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        await asyncio.to_thread(_warm, client)
        infos = [await connect(port)]
        await wait_for(_settled(client, server, port), "the announced keys to be collected")
        client_requests, server_requests = _kme(client).requests_sent, server_kme.requests_sent
        infos += [await connect(port) for _ in range(LATER)]
        await wait_for(lambda: server.keys.collected.collecting == 0, "the background collections")
        assert _kme(client).requests_sent == client_requests
        assert server_kme.requests_sent - server_requests == LATER // (DEPTH // 2)
        listener.close()
    assert all(i.mode == "qkd" for i in infos)
    assert [i.key_id for i in seen] == [i.key_id for i in infos]
    assert len({i.key_id for i in infos}) == len(infos)
    server.close()


def test_a_collection_after_the_context_ended_is_no_warning(
    site_b: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """A server context dropped while an announced-key collection is still queued (a process ending, as
    ``bench.handshake``'s servers do): the collection meets a closed KME client, which is the shutdown it
    is, not a KME failure worth a WARNING."""
    context = server_context(site_b, site_b.kme, qkd="required", accept_key_announcements=True)
    keys = context.keys
    del context
    gc.collect()  # the context's finalizer ends the key source and the KME client it created
    with caplog.at_level(logging.DEBUG, logger="qkdtls.net"):
        keys._collect_batch(CLIENT_SAE, [str(uuid.uuid4())])  # the job that was still queued
    records = [r for r in caplog.records if getattr(r, "event", None) == "tls.announce_not_collected"]
    assert [r.levelno for r in records] == [logging.DEBUG]
