"""Real TLS servers on loopback for the client tests: openssl s_server, gnutls-serv, tlslite-ng, Python ssl.

Every server listens on 127.0.0.1 only. ``gnutls-serv`` cannot be told which address to bind (it listens on
all of them), so it runs inside a private network namespace whose only interface is its own loopback, and
the tests open their connection from inside that namespace (``setns`` on one short-lived thread). Every
start waits for the port with a deadline; every process is killed when its fixture ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qkdtls import pki
from qkdtls.tls.alerts import TLSError
from qkdtls.tls.events import ApplicationData, ConnectionClosed, Event, HandshakeComplete

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
IO_TIMEOUT = 5.0
_CLONE_NEWNET = 0x40000000


# -- PKI ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path

    def certificate(self) -> x509.Certificate:
        return pki.load_certificate(self.cert)

    def private_key(self) -> pki.PrivateKey:
        return pki.load_private_key(self.key)


@dataclass(frozen=True)
class ServerPki:
    ca: Identity
    servers: dict[str, Identity]          # key type → server certificate for localhost / 127.0.0.1
    expired: Identity
    wrong_name: Identity
    foreign_ca: Identity
    foreign: Identity                      # issued by a CA the client does not trust
    client: Identity

    def trust(self) -> list[x509.Certificate]:
        return [self.ca.certificate()]


@pytest.fixture(scope="session")
def server_pki(tmp_path_factory: pytest.TempPathFactory) -> ServerPki:
    root = tmp_path_factory.mktemp("server-pki")
    ca = pki.create_ca(root, "qkdtls client-test CA", stem="ca")
    servers = {
        kind: pki.issue_server_cert(ca.cert, ca.key, root, f"server-{kind}", key_type=kind)
        for kind in pki.KEY_TYPES
    }
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = pki.issue_server_cert(ca.cert, ca.key, root, "expired", not_before=past - dt.timedelta(days=30),
                                    not_after=past)
    wrong = pki.issue_server_cert(ca.cert, ca.key, root, "wrong-name", hostnames=("other.example",))
    foreign_ca = pki.create_ca(root, "foreign CA", stem="foreign-ca")
    foreign = pki.issue_server_cert(foreign_ca.cert, foreign_ca.key, root, "foreign-server")
    client = pki.issue_client_cert(ca.cert, ca.key, root, "client-test")
    return ServerPki(
        ca=Identity(ca.cert, ca.key),
        servers={kind: Identity(i.cert, i.key) for kind, i in servers.items()},
        expired=Identity(expired.cert, expired.key),
        wrong_name=Identity(wrong.cert, wrong.key),
        foreign_ca=Identity(foreign_ca.cert, foreign_ca.key),
        foreign=Identity(foreign.cert, foreign.key),
        client=Identity(client.cert, client.key),
    )


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (run `make system-deps`)")
    return path


# -- external server processes -----------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A server subprocess whose output is collected by a reader thread."""

    proc: subprocess.Popen[bytes]
    port: int = 0
    netns_pid: int | None = None
    _output: list[bytes] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: threading.Condition | None = None
    _reader: threading.Thread | None = None

    def start_reader(self) -> None:
        self._changed = threading.Condition(self._lock)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None and self._changed is not None
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            with self._changed:
                self._output.append(chunk)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> bytes:
        with self._lock:
            return b"".join(self._output)

    def wait_output(self, needle: bytes, timeout: float = IO_TIMEOUT) -> bytes:
        """Output so far once ``needle`` appeared; AssertionError after ``timeout``."""
        assert self._changed is not None
        deadline = time.monotonic() + timeout
        with self._changed:
            while needle not in b"".join(self._output):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._output_pending()):
                    raise AssertionError(f"{needle!r} not seen; output: {b''.join(self._output)[-2000:]!r}")
                self._changed.wait(min(remaining, 0.2))
            return b"".join(self._output)

    def _output_pending(self) -> bool:
        return self.proc.stdout is not None and not self.proc.stdout.closed and self.proc.poll() is None

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def connect(self, timeout: float = IO_TIMEOUT) -> socket.socket:
        if self.netns_pid is None:
            sock = socket.create_connection((HOST, self.port), timeout=timeout)
        else:
            sock = connect_in_netns(self.netns_pid, self.port, timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)   # it ends at EOF once the process is gone; then the pipe can close
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def connect_in_netns(pid: int, port: int, timeout: float) -> socket.socket:
    """A TCP connection to 127.0.0.1:port inside the network namespace of ``pid``.

    The socket is created on a throw-away thread that joined the namespace; a socket stays in the
    namespace it was created in, so the caller's threads are never moved.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, object] = {}

    def run() -> None:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                result["error"] = OSError(ctypes.get_errno(), "setns failed")
                return
        finally:
            os.close(fd)
        try:
            result["sock"] = socket.create_connection((HOST, port), timeout=timeout)
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    if "sock" in result:
        return result["sock"]  # type: ignore[return-value]
    raise result.get("error") or TimeoutError("connect in namespace timed out")  # type: ignore[misc]


def start_openssl_server(*args: str) -> ServerProcess:
    """``openssl s_server -tls1_3`` on an ephemeral loopback port (it prints the port it bound)."""
    argv = [require_tool("openssl"), "s_server", "-accept", f"{HOST}:0", "-tls1_3", *args]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = ServerProcess(proc)
    server.start_reader()
    try:
        output = server.wait_output(b"ACCEPT", START_TIMEOUT)
        line = output.split(b"ACCEPT", 1)[1].split(b"\n", 1)[0]
        server.port = int(line.rsplit(b":", 1)[1])
    except BaseException:
        server.stop()
        raise
    return server


GNUTLS_PORT = 5556   # inside its own namespace, so no other process can hold it


def start_gnutls_server(*args: str) -> ServerProcess:
    """``gnutls-serv --echo`` in a private network namespace (see the module docstring)."""
    serv = require_tool("gnutls-serv")
    ip = require_tool("ip")
    command = f"{ip} link set lo up && exec {serv} --echo -p {GNUTLS_PORT} " + " ".join(args)
    argv = [require_tool("unshare"), "--net", "sh", "-c", command]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port=GNUTLS_PORT, netns_pid=proc.pid)
    server.start_reader()
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gnutls-serv exited: {server.output[-2000:]!r}")
            try:
                connect_in_netns(proc.pid, GNUTLS_PORT, 1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def openssl_server(*args: str) -> Iterator[ServerProcess]:
    server = start_openssl_server(*args)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def gnutls_server(*args: str) -> Iterator[ServerProcess]:
    server = start_gnutls_server(*args)
    try:
        yield server
    finally:
        server.stop()


# -- in-process servers (threads) --------------------------------------------------------------------------


class ThreadServer:
    """Accepts connections on an ephemeral loopback port and runs ``handler(sock)`` per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], connections: int = 1) -> None:
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(IO_TIMEOUT)
        self.port: int = self._listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.results: list[object] = []   # what handlers report (e.g. a clean TLS shutdown)
        self._handler = handler
        self._thread = threading.Thread(target=self._run, args=(connections,), daemon=True)
        self._thread.start()

    def _run(self, connections: int) -> None:
        try:
            for _ in range(connections):
                sock, _addr = self._listener.accept()
                sock.settimeout(IO_TIMEOUT)
                with sock:
                    try:
                        self._handler(sock)
                    except Exception as exc:   # reported to the test through .errors
                        self.errors.append(exc)
        except OSError as exc:
            self.errors.append(exc)

    def connect(self, timeout: float = IO_TIMEOUT) -> socket.socket:
        return socket.create_connection((HOST, self.port), timeout=timeout)

    def stop(self) -> None:
        self._listener.close()
        self._thread.join(IO_TIMEOUT)


def python_ssl_echo(identity: Identity, client_ca: Path | None = None) -> ThreadServer:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert, identity.key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)

    def handle(sock: socket.socket) -> None:
        with ctx.wrap_socket(sock, server_side=True) as tls:
            data = tls.recv(65536)
            tls.sendall(b"echo:" + data)
            tls.unwrap()   # sends close_notify and waits for the client's
            server.results.append("clean shutdown")

    server = ThreadServer(handle)
    return server


def tlslite_echo(identity: Identity, curves: Sequence[str] | None = None) -> ThreadServer:
    """tlslite-ng server; ``curves`` limits its groups (a client share for none of them → HelloRetryRequest
    with a cookie; "x25519mlkem768" needs the kyber-py package)."""
    from tlslite import X509, HandshakeSettings, TLSConnection, X509CertChain, parsePEMKey

    chain = X509CertChain([X509().parse(identity.cert.read_text())])
    key = parsePEMKey(identity.key.read_text(), private=True)
    settings = HandshakeSettings()
    settings.minVersion = (3, 4)
    settings.maxVersion = (3, 4)
    if curves is not None:
        settings.eccCurves = list(curves)
        settings.keyShares = [c for c in settings.keyShares if c in curves]

    def handle(sock: socket.socket) -> None:
        conn = TLSConnection(sock)
        conn.handshakeServer(certChain=chain, privateKey=key, settings=settings)
        data = conn.read()
        conn.write(b"echo:" + bytes(data))
        conn.close()

    return ThreadServer(handle)


# -- driving a sans-I/O client over a real socket ----------------------------------------------------------


class Driver:
    """Moves bytes between a socket and a sans-I/O connection; every wait has a deadline."""

    def __init__(
        self, sock: socket.socket, conn: object, incoming: Callable[[bytes], bytes] | None = None
    ) -> None:
        self.sock = sock
        self.conn = conn
        self.incoming = incoming   # rewrites the peer's bytes before the connection sees them
        self.events: list[Event] = []
        self.received = bytearray()
        self.sent = bytearray()   # everything the connection wrote, for wire-level assertions
        self.closed = False
        sock.settimeout(0.2)

    def flush(self) -> None:
        data = self.conn.data_to_send()  # type: ignore[attr-defined]
        if data:
            self.sent += data
            self.sock.sendall(data)

    def _drain(self) -> None:
        while (event := self.conn.next_event()) is not None:  # type: ignore[attr-defined]
            self.events.append(event)
            if isinstance(event, ApplicationData):
                self.received += event.data
            elif isinstance(event, ConnectionClosed):
                self.closed = True

    def pump_until(self, done: Callable[[], bool], timeout: float = IO_TIMEOUT) -> None:
        """Exchange bytes until ``done()``; TimeoutError after ``timeout``. TLS errors propagate after
        the alert the connection queued has been sent."""
        deadline = time.monotonic() + timeout
        self.flush()
        self._drain()
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("peer exchange did not finish in time")
            if self.closed:
                raise AssertionError(f"connection closed early: {self.events}")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if self.incoming is not None and data:
                data = self.incoming(data)
            try:
                self.conn.receive_data(data)  # type: ignore[attr-defined]
            finally:
                with contextlib.suppress(OSError):
                    self.flush()
            self._drain()
            if not data:
                self.closed = True

    def handshake(self, timeout: float = IO_TIMEOUT) -> HandshakeComplete:
        self.conn.initiate()  # type: ignore[attr-defined]
        self.pump_until(lambda: any(isinstance(e, HandshakeComplete) for e in self.events), timeout)
        return next(e for e in self.events if isinstance(e, HandshakeComplete))

    def expect(self, needle: bytes, timeout: float = IO_TIMEOUT) -> bytes:
        self.pump_until(lambda: needle in self.received, timeout)
        return bytes(self.received)

    def send(self, data: bytes) -> None:
        self.conn.send_data(data)  # type: ignore[attr-defined]
        self.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError, TLSError):
            self.conn.close()  # type: ignore[attr-defined]
            self.flush()
        self.sock.close()


def pem_chain(paths: Sequence[Path]) -> list[x509.Certificate]:
    return [pki.load_certificate(p) for p in paths]


def private_key_pem(identity: Identity) -> bytes:
    return identity.private_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
