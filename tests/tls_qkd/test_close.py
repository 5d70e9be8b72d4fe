"""Closing the way OpenSSL-based servers do: close_notify, then wait (bounded) for the peer's end.

A side that closes its socket right after its close_notify makes the kernel answer whatever the peer still
sends (its own close_notify, late data) with a TCP reset, and the reset throws away what the peer has not
received yet. Here the peer reads late with a small receive buffer, so most of the answer still sits in the
closing side's send buffer when the peer writes again: it must still get every byte and a clean end, no
ECONNRESET. Both adapters, TLS-QKD and the classic hand-off, server and client side; and against a peer that
never answers, close stays bounded.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable

import pytest
from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import (
    HOST,
    SERVER_SAE,
    TIMEOUT,
    AioServer,
    Site,
    client_context,
    server_context,
)

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.aio import close_writer, open_connection
from qkdtls.net.socket import CLOSE_LINGER

ANSWER = bytes(range(256)) * 800  # 200 KiB: most of it waits in the server's send buffer
SEND_BUFFER = 1 << 20
RECEIVE_BUFFER = 4096
LATE = 0.4  # the peer's pause before it writes again, then reads


def _blocking_server(site_b: Site, kme_b: KmeClient):  # type: ignore[no-untyped-def]
    context = server_context(site_b, kme_b, qkd="preferred")

    def handle(raw: socket.socket) -> object:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        tls = context.wrap_socket(raw, server_side=True)
        tls.recv(100)
        tls.sendall(ANSWER)
        started = time.monotonic()
        tls.close()
        return time.monotonic() - started

    return handle


async def _aio_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> object:
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    await reader.read(100)
    writer.write(ANSWER)
    started = time.monotonic()
    await close_writer(writer)
    return time.monotonic() - started


def _late_reader(site_b: Site, kme_a: KmeClient, port: int, path: str) -> bytes:
    """A client with a small receive buffer that writes again before it reads the answer."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    raw.settimeout(TIMEOUT)
    raw.connect((HOST, port))
    if path == "qkd":
        tls = client_context(site_b, kme_a, qkd="required").wrap_socket(
            raw, server_hostname="localhost", target_sae_id=SERVER_SAE
        )
    else:
        classic = ssl.create_default_context(cafile=str(site_b.app_ca))
        tls = classic.wrap_socket(raw, server_hostname="localhost")
    with tls:
        tls.sendall(b"request")
        time.sleep(LATE)  # the server has answered and closed meanwhile
        tls.sendall(b"late")  # the kernel resets a closed socket that gets this
        time.sleep(0.1)
        received = b""
        while chunk := tls.recv(65536):  # ConnectionResetError here before
            received += chunk
    return received


@pytest.mark.parametrize("path", ["qkd", "classic"])
@pytest.mark.parametrize("adapter", ["socket", "asyncio"])
def test_server_close_loses_nothing_for_a_peer_that_reads_late(
    adapter: str, path: str, site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    if adapter == "socket":
        with OneShotServer(_blocking_server(site_b, kme_b)) as srv:
            received = _late_reader(site_b, kme_a, srv.port, path)
            srv.join()
        assert not srv.errors, srv.errors
        close_seconds = srv.results[0]
    else:
        with AioServer(server_context(site_b, kme_b, qkd="preferred"), handler=_aio_answer) as aio:
            received = _late_reader(site_b, kme_a, aio.port, path)
            deadline = time.monotonic() + TIMEOUT
            while not aio.results and time.monotonic() < deadline:
                time.sleep(0.01)
        close_seconds = aio.results[0]
        assert aio.infos[0].mode == path
    assert received == ANSWER
    assert isinstance(close_seconds, float) and close_seconds < CLOSE_LINGER  # ended by the peer's close


@pytest.mark.parametrize("adapter", ["socket", "asyncio"])
def test_server_close_is_bounded_when_the_peer_never_answers(
    adapter: str, site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    async def answer_small(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> object:
        await reader.read(100)
        writer.write(b"bye")
        started = time.monotonic()
        await close_writer(writer)
        return time.monotonic() - started

    def handle(raw: socket.socket) -> object:
        tls = server_context(site_b, kme_b, qkd="preferred").wrap_socket(raw, server_side=True)
        tls.recv(100)
        tls.sendall(b"bye")
        started = time.monotonic()
        tls.close()
        return time.monotonic() - started

    client = client_context(site_b, kme_a, qkd="required")
    aio = AioServer(server_context(site_b, kme_b, qkd="preferred"), handler=answer_small)
    with OneShotServer(handle) if adapter == "socket" else aio as srv:  # type: ignore[attr-defined]
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        silent = client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE)
        silent.sendall(b"request")  # then neither reads nor closes
        deadline = time.monotonic() + TIMEOUT
        while not srv.results and time.monotonic() < deadline:
            time.sleep(0.05)
        raw_fd = silent.fileno()
        silent.close()
    [seconds] = srv.results
    assert raw_fd >= 0
    assert isinstance(seconds, float) and CLOSE_LINGER - 0.1 <= seconds < CLOSE_LINGER + 1.0


def _answer_in_pieces(send: Callable[[bytes], object]) -> None:
    """The answer in a few writes: once the first meets a closed socket, the next ones fail."""
    for _ in range(5):
        send(ANSWER)
        time.sleep(0.05)


def _answer_after_close_qkd(site_b: Site, kme_b: KmeClient):  # type: ignore[no-untyped-def]
    context = server_context(site_b, kme_b, qkd="preferred")

    def handle(raw: socket.socket) -> object:
        with context.wrap_socket(raw, server_side=True) as tls:
            while tls.recv(65536):  # up to the client's close_notify
                pass
            time.sleep(0.3)  # the client has closed meanwhile
            _answer_in_pieces(tls.sendall)  # a reset here before
        return None

    return handle


def _answer_after_close_classic(site_b: Site) -> object:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(site_b.app_cert, site_b.app_key)

    def handle(raw: socket.socket) -> object:
        tls = ctx.wrap_socket(raw, server_side=True)
        while tls.recv(65536):
            pass
        time.sleep(0.3)
        _answer_in_pieces(tls.sendall)  # a reset here before
        tls.unwrap()
        return None

    return handle


@pytest.mark.parametrize("path", ["qkd", "classic"])
@pytest.mark.parametrize("adapter", ["socket", "asyncio"])
def test_client_close_waits_for_the_server_to_finish(
    adapter: str, path: str, site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    handler = _answer_after_close_qkd(site_b, kme_b) if path == "qkd" else _answer_after_close_classic(site_b)
    client = client_context(site_b, kme_a, qkd="preferred" if path == "qkd" else "off")
    with OneShotServer(handler) as srv:  # type: ignore[arg-type]
        started = time.monotonic()
        if adapter == "socket":
            raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
            tls = client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE)
            mode = tls.info.mode if tls.info else None
            tls.sendall(b"request")
            tls.close()
        else:

            async def run() -> str:
                _reader, writer = await open_connection(
                    HOST, srv.port, context=client, server_hostname="localhost", target_sae_id=SERVER_SAE
                )
                writer.write(b"request")
                await close_writer(writer)
                return writer.get_extra_info("qkd").mode  # type: ignore[no-any-return]

            mode = asyncio.run(run())
        closed_after = time.monotonic() - started
        srv.join()
    assert not srv.errors, srv.errors
    assert mode == path
    assert closed_after < CLOSE_LINGER + 1.0
