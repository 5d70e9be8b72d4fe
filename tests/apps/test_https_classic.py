"""The HTTPS server and client over classic TLS 1.3 (Python ssl on both sides, and curl)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from qkdtls.apps.https import HttpsError, HttpsServer, https_get
from qkdtls.pki import PkiLayout


@pytest.fixture
def server(classic_server_context: ssl.SSLContext):
    with HttpsServer(classic_server_context, handshake_timeout=3, idle_timeout=3) as srv:
        yield srv


def test_get_page_and_status(server: HttpsServer, classic_client_context: ssl.SSLContext) -> None:
    page = https_get(server.url, classic_client_context)
    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    assert b"TLSv1.3" in page.body
    status = https_get(server.url + "status", classic_client_context).json()
    assert status["mode"] == "classic"
    assert status["version"] == "TLSv1.3"
    assert status["key_ID"] is None
    assert https_get(server.url + "missing", classic_client_context).status == 404


def test_curl_reads_status(server: HttpsServer, pki: PkiLayout) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is required (scripts/install-system-deps.sh installs it)"
    out = subprocess.run(
        [curl, "-sS", "--max-time", "10", "--cacert", str(pki.trust_bundle), server.url + "status"],
        capture_output=True, timeout=20, check=True,
    )
    assert b'"mode": "classic"' in out.stdout
    head = subprocess.run(
        [curl, "-sS", "-I", "--max-time", "10", "--cacert", str(pki.trust_bundle), server.url],
        capture_output=True, timeout=20, check=True,
    )
    assert head.stdout.startswith(b"HTTP/1.1 200") and b"content-length:" in head.stdout.lower()


def test_malformed_request_gets_400(server: HttpsServer, classic_client_context: ssl.SSLContext) -> None:
    with socket.create_connection(server.address, timeout=5) as raw, classic_client_context.wrap_socket(
        raw, server_hostname="127.0.0.1"
    ) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_failed_handshake_is_counted_and_server_keeps_serving(
    server: HttpsServer, classic_client_context: ssl.SSLContext
) -> None:
    with socket.create_connection(server.address, timeout=5) as raw:
        raw.sendall(b"this is not TLS\r\n\r\n")
        raw.settimeout(5)
        try:
            raw.recv(100)
        except ConnectionResetError:
            pass
    assert https_get(server.url, classic_client_context).status == 200
    assert server.handshakes_failed >= 1


def test_concurrent_clients(server: HttpsServer, classic_client_context: ssl.SSLContext) -> None:
    results: list[int] = []

    def fetch() -> None:
        results.append(https_get(server.url + "status", classic_client_context).status)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200] * 8


def test_rejects_non_https_url(classic_client_context: ssl.SSLContext) -> None:
    with pytest.raises(HttpsError):
        https_get("http://127.0.0.1:1/", classic_client_context)


def test_close_with_idle_keepalive_connection_is_prompt(classic_server_context: ssl.SSLContext,
                                                         classic_client_context: ssl.SSLContext) -> None:
    server = HttpsServer(classic_server_context, idle_timeout=30).start()
    raw = socket.create_connection(server.address, timeout=5)
    tls = classic_client_context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert tls.recv(4096).startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 2
    tls.close()


def _raw_exchange(server: HttpsServer, ctx: ssl.SSLContext, request: bytes) -> bytes:
    with socket.create_connection(server.address, timeout=5) as raw, ctx.wrap_socket(
        raw, server_hostname="127.0.0.1"
    ) as tls:
        tls.sendall(request)
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
            if b"\r\n\r\n" in answer and not request.startswith(b"GET"):
                break
    return answer


def test_other_methods_and_oversized_bodies_are_refused(
    server: HttpsServer, classic_client_context: ssl.SSLContext
) -> None:
    post = _raw_exchange(server, classic_client_context,
                         b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert post.startswith(b"HTTP/1.1 405 ")
    huge = _raw_exchange(server, classic_client_context,
                         b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"x" * 70000)
    assert huge.startswith(b"HTTP/1.1 413 ")


def test_a_silent_client_does_not_block_others(
    server: HttpsServer, classic_client_context: ssl.SSLContext
) -> None:
    with socket.create_connection(server.address, timeout=5):  # never sends a ClientHello
        start = time.monotonic()
        assert https_get(server.url, classic_client_context).status == 200
        assert time.monotonic() - start < 2
