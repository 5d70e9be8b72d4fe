"""Classic connections handed to OpenSSL after their first bytes were read, against real clients.

Covers the five hand-off pitfalls: alerts flushed on SSLError (blocking and asyncio), unparsable input left
to OpenSSL, no busy loop on a partial ClientHello, close_notify on close.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest
from tests.peers.clients import (
    GNUTLS_LOCALHOST,
    HOST,
    HTTP_OK,
    OneShotServer,
    PeerPki,
    curl_client,
    gnutls_client,
    openssl_client,
    python_client,
    server_ssl_context,
    tls_pki,
    tlslite_client,
)

from qkdtls.net.handoff import (
    ClassicSession,
    HandOffTimeout,
    close_async,
    close_blocking,
    handshake_async,
    handshake_blocking,
    recv_async,
    recv_blocking,
    send_async,
    sendall_blocking,
)

__all__ = ["tls_pki"]  # the fixture, imported for pytest

pytestmark = pytest.mark.peers
TIMEOUT = 10.0


def read_first_bytes(sock: socket.socket, at_most: int) -> bytes:
    """What the QKD server would have consumed before deciding: part or all of the first record."""
    data = b""
    while len(data) < at_most:
        chunk = sock.recv(at_most - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big"):
            break
    return data


def echo_handler(p: PeerPki, first: int = 1 << 16, http: bool = False):  # type: ignore[no-untyped-def]
    def handle(sock: socket.socket) -> bytes:
        session = ClassicSession(server_ssl_context(p), read_first_bytes(sock, first))
        handshake_blocking(sock, session, TIMEOUT)
        received = b""
        while not (http and b"\r\n\r\n" in received) and not received.endswith(b"\n"):
            chunk = recv_blocking(sock, session, TIMEOUT)
            if not chunk:
                break
            received += chunk
        sendall_blocking(sock, session, HTTP_OK if http else b"echo:" + received)
        close_blocking(sock, session)
        return received

    return handle


def test_openssl_s_client_completes_via_handoff(tls_pki: PeerPki) -> None:
    with OneShotServer(echo_handler(tls_pki)) as server:
        result = openssl_client(
            server.port, "-CAfile", str(tls_pki.ca_cert), send=b"ping\n", expect=b"echo:ping"
        )
        server.join()
    assert "echo:ping" in result.output, result.output
    assert "Verify return code: 0 (ok)" in result.output
    assert server.errors == [] and server.results == [b"ping\n"]


def test_partial_client_hello_is_completed_by_openssl(tls_pki: PeerPki) -> None:
    # Only 7 bytes were consumed by the QKD side; OpenSSL must get them first, then the rest from the socket.
    with OneShotServer(echo_handler(tls_pki, first=7)) as server:
        data = python_client(server.port, tls_pki.ca_cert, b"hello\n")
        server.join()
    assert data == b"echo:hello\n" and server.errors == []


def test_curl_completes_via_handoff(tls_pki: PeerPki) -> None:
    with OneShotServer(echo_handler(tls_pki, http=True)) as server:
        result = curl_client(server.port, tls_pki.ca_cert, "--tlsv1.3")
        server.join()
    assert result.returncode == 0 and result.stdout == b"ok", result.output
    assert server.errors == []


def test_gnutls_cli_completes_via_handoff(tls_pki: PeerPki) -> None:
    with OneShotServer(echo_handler(tls_pki)) as server:
        result = gnutls_client(
            server.port, "--x509cafile", str(tls_pki.ca_cert), *GNUTLS_LOCALHOST,
            send=b"gnu\n", expect=b"echo:gnu"
        )
        server.join()
    assert "echo:gnu" in result.output, result.output
    assert server.errors == []


def test_tlslite_completes_via_handoff(tls_pki: PeerPki) -> None:
    with OneShotServer(echo_handler(tls_pki)) as server:
        version, data = tlslite_client(server.port, b"lite\n")
        server.join()
    assert version == "TLS 1.3" and data == b"echo:lite\n" and server.errors == []


def test_python_ssl_sees_close_notify(tls_pki: PeerPki) -> None:
    # python_client reads with suppress_ragged_eofs=False: without close_notify recv() raises SSLEOFError.
    with OneShotServer(echo_handler(tls_pki)) as server:
        assert python_client(server.port, tls_pki.ca_cert, b"bye\n") == b"echo:bye\n"
        server.join()
    assert server.errors == []


def _tls12_only_client(port: int, ca: str) -> ssl.SSLError:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as raw, pytest.raises(ssl.SSLError) as info:
        ctx.wrap_socket(raw, server_hostname="localhost")
    return info.value


def tls13_only_handler(p: PeerPki):  # type: ignore[no-untyped-def]
    def handle(sock: socket.socket) -> None:
        ctx = server_ssl_context(p)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        handshake_blocking(sock, ClassicSession(ctx, read_first_bytes(sock, 1 << 16)), TIMEOUT)

    return handle


def test_fatal_alert_is_flushed_on_ssl_error(tls_pki: PeerPki) -> None:
    with OneShotServer(tls13_only_handler(tls_pki)) as server:
        error = _tls12_only_client(server.port, str(tls_pki.ca_cert))
        server.join()
    assert "PROTOCOL_VERSION" in str(error)  # the client received OpenSSL's protocol_version alert
    assert len(server.errors) == 1 and isinstance(server.errors[0], ssl.SSLError)


@pytest.mark.parametrize(
    "first",
    [
        bytes.fromhex("1603010005") + b"\x01\x00\x00\x01\x00",  # ClientHello with a 1-byte body
        bytes.fromhex("1603010008" "01000004" "03030000"),  # ClientHello cut inside the random
    ],
)
def test_unparsable_client_hello_gets_openssl_alert(tls_pki: PeerPki, first: bytes) -> None:
    def handle(sock: socket.socket) -> None:
        handshake_blocking(sock, ClassicSession(server_ssl_context(tls_pki), sock.recv(1 << 16)), TIMEOUT)

    with OneShotServer(handle) as server, socket.create_connection((HOST, server.port), TIMEOUT) as client:
        client.sendall(first)
        answer = client.recv(100)
        server.join()
    assert answer[:1] == b"\x15" and answer[5:6] == b"\x02", answer.hex()  # a fatal alert record
    assert answer[6] in (10, 47, 50, 70), answer.hex()
    assert len(server.errors) == 1 and isinstance(server.errors[0], ssl.SSLError)


async def test_asyncio_pump_flushes_alert_and_serves(tls_pki: PeerPki) -> None:
    outcomes: list[object] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ctx = server_ssl_context(tls_pki)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        first = await asyncio.wait_for(reader.read(1 << 16), TIMEOUT)
        session = ClassicSession(ctx, first)
        try:
            await handshake_async(reader, writer, session, TIMEOUT)
            data = await recv_async(reader, writer, session, TIMEOUT)
            await send_async(writer, session, b"echo:" + data)
            await close_async(writer, session)
            outcomes.append(data)
        except ssl.SSLError as exc:
            outcomes.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        error = await asyncio.to_thread(_tls12_only_client, port, str(tls_pki.ca_cert))
        assert "PROTOCOL_VERSION" in str(error)
        data = await asyncio.to_thread(python_client, port, tls_pki.ca_cert, b"async\n")
        assert data == b"echo:async\n"
    assert isinstance(outcomes[0], ssl.SSLError) and outcomes[1] == b"async\n"


async def test_asyncio_partial_client_hello_times_out_without_spinning(tls_pki: PeerPki) -> None:
    results: list[BaseException] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = ClassicSession(server_ssl_context(tls_pki), await reader.read(3))
        try:
            await handshake_async(reader, writer, session, 0.5)
        except HandOffTimeout as exc:
            results.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        _reader, writer = await asyncio.open_connection(HOST, port)
        cpu, wall = time.process_time(), time.monotonic()
        writer.write(bytes.fromhex("16030100c8010000c4"))  # the start of a ClientHello, then silence
        await writer.drain()
        for _ in range(40):
            if results:
                break
            await asyncio.sleep(0.05)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        writer.close()
    assert results and isinstance(results[0], HandOffTimeout)
    assert cpu < 0.5 * wall, (cpu, wall)  # waited on the fd, did not spin on it


def test_session_reports_classic_info(tls_pki: PeerPki) -> None:
    def handle(sock: socket.socket) -> object:
        session = ClassicSession(server_ssl_context(tls_pki), b"")
        handshake_blocking(sock, session, TIMEOUT)
        info = session.info(server_name="localhost")
        sendall_blocking(sock, session, b"x")
        close_blocking(sock, session)
        return info

    with OneShotServer(handle) as server:
        python_client(server.port, tls_pki.ca_cert, b"")
        server.join()
    info = server.results[0]
    assert info.mode == "classic" and info.version == "TLSv1.3" and info.server_name == "localhost"  # type: ignore[attr-defined]
    assert "repr" not in repr(ClassicSession(server_ssl_context(tls_pki)))
