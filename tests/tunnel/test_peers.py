"""Independent programs through the tunnels: curl to an HTTP server, a stock ``openssl s_client -psk`` with
a key taken from the KME straight to a server-side tunnel, and ``required`` refusing classic peers."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.peers.clients import openssl_client, require_tool
from tests.tls_qkd.conftest import CLIENT_SAE, SERVER_SAE, site_for
from tests.tunnel.conftest import (
    HOST,
    TIMEOUT,
    TcpServer,
    TunnelProcess,
    client_service,
    echo,
    server_service,
    tunnel_pair,
)

from qkdtls.etsi014.client import KmeClient
from qkdtls.testbed import Testbed

BODY = os.urandom(3 * 1024 * 1024 + 17)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several requests on one tunnelled connection

    def do_GET(self) -> None:
        body = BODY if self.path == "/big" else b"hello over TLS-QKD\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer((HOST, 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_curl_through_both_tunnels(testbed: Testbed, tmp_path: Path) -> None:
    curl = require_tool("curl")
    out = tmp_path / "big"
    with http_server() as port, tunnel_pair(testbed, tmp_path, port) as (a, b):
        url = f"http://{HOST}:{a.port('svc')}"
        # Two requests on one kept-alive connection (curl reuses it), then the large body.
        result = subprocess.run(
            [curl, "-sS", "--fail", "-o", "/dev/null", f"{url}/small", "-o", str(out), f"{url}/big"],
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(BODY).digest()
        (record,) = b.wait_records(1)
    assert record["mode"] == "qkd" and record["peer_SAE_ID"] == CLIENT_SAE
    assert record["bytes_down"] > len(BODY)


def _echo_once(conn: socket.socket) -> None:
    """One read echoed, then the end (``openssl s_client -ign_eof`` waits for the server to close)."""
    conn.sendall(conn.recv(65536))


def test_openssl_psk_client_straight_to_a_server_tunnel(testbed: Testbed, tmp_path: Path) -> None:
    """SAE 1001 takes a key from its KME and hands it to a stock OpenSSL client as an external PSK."""
    with KmeClient(site_for(testbed, CLIENT_SAE).kme) as kme:
        key = kme.get_key(SERVER_SAE)
    service = server_service(testbed, 0)
    with TcpServer(_echo_once) as target:
        service["connect"] = f"{HOST}:{target.port}"
        with TunnelProcess(tmp_path, "site-b", {"services": {"svc": service}}) as b:
            result = openssl_client(
                b.port("svc"),
                "-psk", key.key.hex(), "-psk_identity", f"qkd1:{CLIENT_SAE}:{key.key_ID}",
                "-ciphersuites", "TLS_AES_128_GCM_SHA256", "-servername", "localhost",
                send=b"ping through the tunnel\n", expect=b"ping through the tunnel\n",
            )  # fmt: skip
            (record,) = b.wait_records(1)
    assert not result.timed_out, result.output
    assert result.stdout.count(b"ping through the tunnel\n") == 1, result.output
    assert record["mode"] == "qkd" and record["key_ID"] == key.key_ID and record["peer_SAE_ID"] == CLIENT_SAE


def test_required_server_tunnel_refuses_a_classic_client(testbed: Testbed, tmp_path: Path) -> None:
    service = server_service(testbed, 0)
    with TcpServer(echo) as target:
        service["connect"] = f"{HOST}:{target.port}"
        with TunnelProcess(tmp_path, "site-b", {"services": {"svc": service}}) as b:
            _, _, ca = testbed.app_server_credentials(SERVER_SAE)
            refused = openssl_client(
                b.port("svc"), "-CAfile", str(ca), "-servername", "localhost", send=b"x\n"
            )
            (record,) = b.wait_records(1)
    assert "insufficient security" in refused.output.lower(), refused.output
    assert record["reason"] == "policy" and record["mode"] is None
    assert target.accepted == 0  # nothing reached the plaintext target


def test_required_client_tunnel_refuses_a_classic_server(testbed: Testbed, tmp_path: Path) -> None:
    """The remote end is a plain TLS 1.3 server (Python ssl): the local client's connection is closed and
    no byte of it leaves in a classic connection."""
    cert, key, _ = testbed.app_server_credentials(SERVER_SAE)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    got: list[bytes] = []

    def classic(conn: socket.socket) -> None:
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                got.append(tls.recv(100))
        except (ssl.SSLError, OSError):
            pass

    with TcpServer(classic) as server:
        doc = {"services": {"svc": client_service(testbed, server.port)}}
        with TunnelProcess(tmp_path, "site-a", doc) as a:
            with socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT) as sock:
                sock.sendall(b"secret")
                try:
                    assert sock.recv(100) == b""
                except ConnectionResetError:
                    pass
            (record,) = a.wait_records(1)
    assert record["reason"] == "policy", record
    assert got in ([], [b""])


def test_preferred_server_tunnel_serves_classic_tls(testbed: Testbed, tmp_path: Path) -> None:
    """Under ``preferred`` a classic TLS 1.3 client (openssl, certificate checked) gets the service."""
    service = server_service(testbed, 0, qkd="preferred")
    with TcpServer(_echo_once) as target:
        service["connect"] = f"{HOST}:{target.port}"
        with TunnelProcess(tmp_path, "site-b", {"services": {"svc": service}}) as b:
            _, _, ca = testbed.app_server_credentials(SERVER_SAE)
            result = openssl_client(
                b.port("svc"), "-CAfile", str(ca), "-servername", "localhost", "-verify_return_error",
                send=b"classic ping\n", expect=b"classic ping\n",
            )  # fmt: skip
            (record,) = b.wait_records(1)
    assert b"classic ping\n" in result.stdout and "Verify return code: 0" in result.output
    assert record["mode"] == "classic" and record["key_ID"] is None


def test_two_services_one_process(testbed: Testbed, tmp_path: Path) -> None:
    """A configuration with several services; the KME table shared at the top level."""
    with TcpServer(echo) as target, http_server() as web:
        b_doc = {
            "kme": server_service(testbed, 0)["kme"],
            "services": {
                "echo": {k: v for k, v in server_service(testbed, target.port).items() if k != "kme"},
                "web": {k: v for k, v in server_service(testbed, web).items() if k != "kme"},
            },
        }
        with TunnelProcess(tmp_path, "site-b", b_doc) as b:
            a_doc = {
                "services": {
                    "echo": client_service(testbed, b.port("echo")),
                    "web": client_service(testbed, b.port("web")),
                }
            }
            with TunnelProcess(tmp_path, "site-a", a_doc) as a:
                with socket.create_connection((HOST, a.port("echo")), timeout=TIMEOUT) as sock:
                    sock.sendall(b"one")
                    assert sock.recv(3) == b"one"
                with socket.create_connection((HOST, a.port("web")), timeout=TIMEOUT) as sock:
                    sock.sendall(b"GET /small HTTP/1.0\r\n\r\n")
                    answer = b""
                    while data := sock.recv(65536):
                        answer += data
                assert answer.endswith(b"hello over TLS-QKD\n")
                records = b.wait_records(2)
    assert sorted(r["service"] for r in records) == ["echo", "web"]
    assert all(r["mode"] == "qkd" for r in records)


def test_half_close_over_classic_tls(testbed: Testbed, tmp_path: Path) -> None:
    """The classic path (OpenSSL after the hand-off) half-closes too: the target's end of stream reaches
    a Python ssl client as close_notify, and what the client sends afterwards still reaches the target."""
    received: list[bytes] = []

    def banner_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while more := conn.recv(65536):
            data += more
        received.append(data)

    service = server_service(testbed, 0, qkd="preferred")
    _, _, ca = testbed.app_server_credentials(SERVER_SAE)
    ctx = ssl.create_default_context(cafile=str(ca))
    with TcpServer(banner_then_listen) as target:
        service["connect"] = f"{HOST}:{target.port}"
        with TunnelProcess(tmp_path, "site-b", {"services": {"svc": service}}) as b:
            raw = socket.create_connection((HOST, b.port("svc")), timeout=TIMEOUT)
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                got = b""
                while more := tls.recv(100):
                    got += more
                assert got == b"banner"
                tls.sendall(b"after the server's close_notify")
                tls.unwrap()
            (record,) = b.wait_records(1)
    assert received == [b"after the server's close_notify"]
    assert record["mode"] == "classic" and record["reason"] == "closed"
