"""The blocking QKDSocket as applications use it: close_notify, half-close, unwrap, makefile, bulk data.

RFC 8446 §6.1: close_notify closes only the sender's write side, so a server may still answer after the
client's close_notify; ``s_client`` relies on that when its input ends.
"""

from __future__ import annotations

import socket

import pytest
from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import HOST, SERVER_SAE, TIMEOUT, Site, client_context, server_context

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.context import QKDContext


def _client(context: QKDContext, port: int):  # type: ignore[no-untyped-def]
    raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
    return context.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE)


def _read_all(tls) -> bytes:  # type: ignore[no-untyped-def]
    chunks = []
    while chunk := tls.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("server_policy", ["required", "off"], ids=["qkd", "classic-handoff"])
def test_server_answers_after_client_half_close(
    server_policy: str, site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    def handle(raw: socket.socket) -> object:
        with server_context(site_b, kme_b, qkd=server_policy).wrap_socket(raw, server_side=True) as tls:
            request = _read_all(tls)  # up to the client's close_notify
            tls.sendall(b"got " + request)
            return tls.info

    client = client_context(site_b, kme_a, qkd="preferred")
    with OneShotServer(handle) as srv:
        tls = _client(client, srv.port)
        tls.sendall(b"request")
        tls.shutdown(socket.SHUT_WR)  # close_notify + FIN: our write side only
        answer = _read_all(tls)
        tls.close()
        srv.join()
    assert not srv.errors, srv.errors
    assert answer == b"got request"


def test_unwrap_and_makefile(site_b: Site, kme_a: KmeClient, kme_b: KmeClient) -> None:
    server = server_context(site_b, kme_b, qkd="required")

    def handle(raw: socket.socket) -> object:
        tls = server.wrap_socket(raw, server_side=True)
        with tls.makefile("rwb") as stream:
            line = stream.readline()
            stream.write(line.upper())
            stream.flush()
        plain = tls.unwrap()  # close_notify both ways, then the TCP socket is ours again
        plain.sendall(b"plain after TLS")
        return None

    client = client_context(site_b, kme_a, qkd="required")
    with OneShotServer(handle) as srv:
        tls = _client(client, srv.port)
        reader = tls.makefile("rb")
        tls.sendall(b"hello line\n")
        assert reader.readline() == b"HELLO LINE\n"
        reader.close()
        plain = tls.unwrap()
        assert plain.recv(100) == b"plain after TLS"
        plain.close()
        srv.join()
    assert not srv.errors, srv.errors


def test_large_transfer_and_recv_into(site_b: Site, kme_a: KmeClient, kme_b: KmeClient) -> None:
    size = 4 * 1024 * 1024 + 123  # not a multiple of the record size

    def handle(raw: socket.socket) -> object:
        with server_context(site_b, kme_b, qkd="required").wrap_socket(raw, server_side=True) as tls:
            tls.sendall(bytes(range(256)) * (size // 256) + bytes(size % 256))
            return None

    client = client_context(site_b, kme_a, qkd="required")
    with OneShotServer(handle) as srv:
        tls = _client(client, srv.port)
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = tls.recv_into(view[got:], min(100_000, size - got))
            assert n > 0
            got += n
        assert tls.recv(1) == b""  # close_notify after the data
        tls.close()
        srv.join()
    assert buffer == bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert not srv.errors, srv.errors
