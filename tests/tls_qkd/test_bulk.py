"""Bulk data through QKDSocket: scatter/gather writes the kernel takes in parts, reads into one buffer."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import HOST, SERVER_SAE, TIMEOUT, Site, client_context, server_context

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.socket import send_buffers


def test_upload_through_a_small_send_buffer_arrives_whole_and_in_order(
    site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    payload = os.urandom(1024 * 1024 + 4321)

    def handle(raw: socket.socket) -> object:
        with server_context(site_b, kme_b, qkd="required").wrap_socket(raw, server_side=True) as tls:
            digest = hashlib.sha256()
            got = 0
            chunk_types = set()
            while got < len(payload):
                chunk = tls.recv(100_000)
                assert chunk
                chunk_types.add(type(chunk))
                digest.update(chunk)
                got += len(chunk)
            tls.sendall(digest.digest())
            return chunk_types

    client = client_context(site_b, kme_a, qkd="required")
    with OneShotServer(handle) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # sendmsg returns after part of a batch
        tls = client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE)
        tls.sendall(memoryview(payload))
        answer = tls.recv(32)
        tls.close()
        srv.join()
    assert not srv.errors, srv.errors
    assert answer == hashlib.sha256(payload).digest()
    assert srv.results == [{bytes}]  # recv() returns bytes, as ssl.SSLSocket.recv does


def test_send_buffers_writes_every_buffer_in_order() -> None:
    parts: list[bytes | bytearray] = [os.urandom(n) for n in (1, 70_000, 0, 5, 200_000)]
    parts.append(bytearray(os.urandom(33_333)))
    with socket.create_server((HOST, 0)) as listener:
        sender = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        receiver, _ = listener.accept()
        receiver.settimeout(TIMEOUT)
        with sender, receiver:
            expected = b"".join(parts)
            got = bytearray()
            writer = threading.Thread(target=send_buffers, args=(sender, parts))
            writer.start()
            while len(got) < len(expected):
                chunk = receiver.recv(65536)
                assert chunk
                got += chunk
            writer.join(TIMEOUT)
            assert not writer.is_alive()
    assert got == expected
