"""Real TLS clients (openssl, curl, gnutls-cli, tlslite-ng, Python ssl) pointed at a loopback port.

Every client runs with a deadline and is killed when it passes; none ever reaches another address than
127.0.0.1. Also: a throw-away PKI (``tls_pki`` fixture) and a one-connection server thread the tests drive.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qkdtls import pki

HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0
# gnutls-cli would resolve "localhost" (maybe to ::1): connect to 127.0.0.1 and name the host explicitly.
GNUTLS_LOCALHOST = (HOST, "--sni-hostname", "localhost", "--verify-hostname", "localhost")
HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@dataclass(frozen=True)
class PeerPki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="session")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> PeerPki:
    root = tmp_path_factory.mktemp("tls-pki")
    ca = pki.create_ca(root, "qkdtls test CA")
    server = pki.issue_server_cert(ca.cert, ca.key, root, "localhost")
    client = pki.issue_client_cert(ca.cert, ca.key, root, "SAE-client")
    return PeerPki(ca.cert, server.cert, server.key, client.cert, client.key)


def server_ssl_context(p: PeerPki) -> ssl.SSLContext:
    """The context classic connections are handed to."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(p.server_cert, p.server_key)
    return ctx


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (run `make system-deps`)")
    return path


@dataclass
class PeerResult:
    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "replace")


def run_peer(
    argv: Sequence[str],
    send: bytes = b"",
    expect: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> PeerResult:
    """Run a client; write ``send``; keep stdin open until ``expect`` shows on stdout (or the peer exits).

    Closing stdin too early makes openssl/gnutls-cli quit before the answer arrives, hence ``expect``.
    """
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list[bytes] = []
    err: list[bytes] = []
    seen = threading.Event()

    def pump(stream: object, sink: list[bytes], watch: bool) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
            sink.append(chunk)
            if watch and expect is not None and expect in b"".join(sink):
                seen.set()
        if watch:
            seen.set()

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, out, True), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, err, False), daemon=True),
    ]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        assert proc.stdin is not None
        if send:
            proc.stdin.write(send)
            proc.stdin.flush()
        if expect is not None:
            timed_out = not seen.wait(timeout)
        proc.stdin.close()
        proc.wait(max(0.1, deadline - time.monotonic()))
    except (BrokenPipeError, ConnectionResetError):
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for t in readers:
            t.join(5)
    return PeerResult(proc.returncode, b"".join(out), b"".join(err), timed_out)


def openssl_client(
    port: int, *extra: str, send: bytes = b"", expect: bytes | None = None, timeout: float = DEFAULT_TIMEOUT
) -> PeerResult:
    argv = [require_tool("openssl"), "s_client", "-connect", f"{HOST}:{port}", "-tls1_3", "-ign_eof", *extra]
    return run_peer(argv, send, expect, timeout)


def gnutls_client(
    port: int, *extra: str, send: bytes = b"", expect: bytes | None = None, timeout: float = DEFAULT_TIMEOUT
) -> PeerResult:
    argv = [require_tool("gnutls-cli"), "-p", str(port), *extra]
    return run_peer(argv, send, expect, timeout)


def curl_client(port: int, ca: Path, *extra: str, timeout: float = DEFAULT_TIMEOUT) -> PeerResult:
    argv = [
        require_tool("curl"), "-sS", "--max-time", str(int(timeout)), "--cacert", str(ca),
        "--resolve", f"localhost:{port}:{HOST}", *extra, f"https://localhost:{port}/",
    ]
    return run_peer(argv, timeout=timeout + 2)


def python_client(port: int, ca: Path, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Python ssl (OpenSSL) as a client: send ``data``, read to close_notify, unwrap."""
    ctx = ssl.create_default_context(cafile=str(ca))
    # suppress_ragged_eofs=False: a server that closes without close_notify makes recv() raise.
    with socket.create_connection((HOST, port), timeout=timeout) as raw, ctx.wrap_socket(
        raw, server_hostname="localhost", suppress_ragged_eofs=False
    ) as tls:
        tls.sendall(data)
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _tlslite_exchange(
    port: int, data: bytes, timeout: float, settings: Any, fact: Callable[[Any], str]
) -> tuple[str, bytes]:
    """A tlslite-ng TLS 1.3 client session: (``fact`` of the connection read after the handshake, since
    tlslite forgets it on close; the response until the server closes)."""
    from tlslite import TLSConnection

    settings.minVersion = (3, 4)
    settings.maxVersion = (3, 4)
    with socket.create_connection((HOST, port), timeout=timeout) as raw:
        conn = TLSConnection(raw)
        conn.handshakeClientCert(settings=settings, serverName="localhost")
        negotiated = fact(conn)
        conn.write(data)
        chunks = []
        while chunk := conn.read():
            chunks.append(bytes(chunk))
        conn.close()
        return negotiated, b"".join(chunks)


def tlslite_client(port: int, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> tuple[str, bytes]:
    """tlslite-ng (pure Python TLS 1.3) as a client: (negotiated version name, response)."""
    from tlslite import HandshakeSettings

    return _tlslite_exchange(port, data, timeout, HandshakeSettings(), lambda conn: conn.getVersionName())


def tlslite_psk_client(
    port: int, identity: bytes, key: bytes, data: bytes, timeout: float = DEFAULT_TIMEOUT
) -> tuple[str, bytes]:
    """tlslite-ng with an external PSK (SHA-256, psk_dhe_ke only): (cipher suite name, response)."""
    from tlslite import HandshakeSettings

    settings = HandshakeSettings()
    settings.pskConfigs = [(identity, key, "sha256")]
    settings.psk_modes = ["psk_dhe_ke"]
    return _tlslite_exchange(port, data, timeout, settings, lambda conn: conn.getCipherName())


class OneShotServer:
    """Accepts connections on an ephemeral loopback port and runs ``handler(sock)`` for each in a thread.

    ``errors`` collects what handlers raised, so a test can assert on the server's outcome.
    """

    def __init__(self, handler: Callable[[socket.socket], object], connections: int = 1) -> None:
        self._handler = handler
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(DEFAULT_TIMEOUT)
        self.port: int = self._listener.getsockname()[1]
        self.results: list[object] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(connections,), daemon=True)

    def _run(self, connections: int) -> None:
        for _ in range(connections):
            try:
                sock, _addr = self._listener.accept()
            except OSError as exc:
                self.errors.append(exc)
                return
            with sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(DEFAULT_TIMEOUT)
                try:
                    self.results.append(self._handler(sock))
                except BaseException as exc:  # reported to the test, never lost in the thread
                    self.errors.append(exc)

    def __enter__(self) -> OneShotServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        self._thread.join(DEFAULT_TIMEOUT)

    def join(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "server thread did not finish"


def qkd_echo_handler(
    config: object,
    keys: dict[str, bytes],
    classic_context: ssl.SSLContext | None = None,
    http: bool = False,
) -> Callable[[socket.socket], object]:
    """A blocking loop around one TLSServer: plays the KME from ``keys`` (key_ID → key), hands classic
    clients to ``classic_context``, echoes the first line (or answers an HTTP request) and closes.

    Returns the handler's outcome: ("qkd", ConnectionInfo, received) or ("classic", info, received).
    """
    from qkdtls.net import handoff
    from qkdtls.tls import events
    from qkdtls.tls.alerts import TLSAlert
    from qkdtls.tls.server import TLSServer

    def complete(received: bytes) -> bool:
        return (b"\r\n\r\n" in received) if http else received.endswith(b"\n")

    def reply(received: bytes) -> bytes:
        return HTTP_OK if http else b"echo:" + received

    def handle(sock: socket.socket) -> object:
        server = TLSServer(config)  # type: ignore[arg-type]
        received = b""
        info = None
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            try:
                server.receive_data(data)
                while (event := server.next_event()) is not None:
                    if isinstance(event, events.NeedQkdKey):
                        server.provide_qkd_key(keys.get(event.key_id))
                    elif isinstance(event, events.HandOff):
                        assert classic_context is not None, "classic client but no classic context"
                        session = handoff.ClassicSession(classic_context, event.initial_data)
                        handoff.handshake_blocking(sock, session, DEFAULT_TIMEOUT)
                        while not complete(received):
                            chunk = handoff.recv_blocking(sock, session, DEFAULT_TIMEOUT)
                            if not chunk:
                                break
                            received += chunk
                        handoff.sendall_blocking(sock, session, reply(received))
                        handoff.close_blocking(sock, session)
                        return ("classic", session.info(), received)
                    elif isinstance(event, events.HandshakeComplete):
                        info = event.info
                    elif isinstance(event, events.ApplicationData):
                        received += event.data
                        if complete(received):
                            server.send_data(reply(received))
                            server.close()
                    elif isinstance(event, events.ConnectionClosed):
                        sock.sendall(server.data_to_send())
                        return ("qkd", info, received)
            except TLSAlert:
                sock.sendall(server.data_to_send())
                raise
            out = server.data_to_send()
            if out:
                sock.sendall(out)
            if not data:
                return ("qkd", info, received)
        raise TimeoutError("QKD test server: no progress before the deadline")

    return handle
