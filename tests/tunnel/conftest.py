"""Real ``qkdtls tunnel`` processes on loopback between the two KMEs of the testbed.

Site A (KME 1, SAE 1001) runs the client-side tunnel, site B (KME 2, SAE 2001) the server-side one, which
forwards to a plaintext target started by the test (an echo server, an HTTP server, PostgreSQL). Each tunnel
is its own process, started from a TOML file it can be made to reload, with JSON log lines in a file: the
tests read the one record per connection from there.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.tls_qkd.conftest import CLIENT_SAE, SERVER_SAE, TESTBED_SAES

from qkdtls.testbed import Testbed

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
TIMEOUT = 20.0
VERBOSE = bool(os.environ.get("QKDTLS_TUNNEL_TEST_VERBOSE"))  # every INFO line of the tunnels in their logs


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    root = tmp_path_factory.mktemp("tunnel-testbed")
    # Enough key material for the rekeying transfers: 1 MiB per link direction pair.
    with Testbed.create(
        root, saes=TESTBED_SAES, initial_key_bytes=1 << 20, service={"recollect_window": 0.0}
    ) as tb:
        yield tb


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for tunnel configurations: scalars, arrays and nested tables."""
    scalars = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    out = "\n".join(scalars) + ("\n" if scalars else "")
    for key, value in doc.items():
        if isinstance(value, dict):
            name = f"{prefix}.{key}" if prefix else key
            out += f"\n[{name}]\n" + to_toml(value, name)
    return out


def kme_table(tb: Testbed, sae_id: int) -> dict[str, Any]:
    cert, key, ca = tb.sae_credentials(sae_id)
    return {
        "url": tb.sae_url(tb.kme_of(sae_id)),
        "cert": str(cert),
        "key": str(key),
        "ca": str(ca),
        "timeout": 3.0,
    }


class TunnelProcess:
    """``qkdtls tunnel --config`` in its own process; ``port(name)`` of each service once it is ready."""

    def __init__(self, root: Path, name: str, doc: dict[str, Any]) -> None:
        self.root = root
        self.name = name
        self.config = root / f"{name}.toml"
        self.ready = root / f"{name}.ready.json"
        self.log = root / f"{name}.log"
        self.write(doc)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, Any] = {}

    def write(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.config.write_text(to_toml(doc))

    def start(self) -> TunnelProcess:
        self.ready.unlink(missing_ok=True)
        verbose = ["-v"] if VERBOSE else []
        argv = [sys.executable, "-m", "qkdtls", "--log-format", "json", *verbose, "tunnel",
                "--config", str(self.config), "--ready-file", str(self.ready)]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tunnel {self.name} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"tunnel {self.name} not ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.ports = json.loads(self.ready.read_text())
        return self

    def port(self, service: str) -> int:
        return int(self.ports["services"][service])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def records(self, event: str = "tunnel.connection") -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == event:
                    out.append(doc)
        return out

    def wait_records(
        self, count: int, timeout: float = TIMEOUT, event: str = "tunnel.connection"
    ) -> list[dict[str, Any]]:
        """At least ``count`` records (a connection's record is written when both of its sides are gone)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.records(event)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def __enter__(self) -> TunnelProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_service(tb: Testbed, target_port: int, **overrides: Any) -> dict[str, Any]:
    cert, key, _ = tb.app_server_credentials(SERVER_SAE)
    service = {
        "mode": "server",
        "accept": f"{HOST}:0",
        "connect": f"{HOST}:{target_port}",
        "qkd": "required",
        "cert": str(cert),
        "key": str(key),
        "allowed_peer_sae_ids": [CLIENT_SAE],
        "kme": kme_table(tb, SERVER_SAE),
    }
    service.update(overrides)
    return service


def client_service(tb: Testbed, server_port: int, **overrides: Any) -> dict[str, Any]:
    _, _, ca = tb.app_server_credentials(SERVER_SAE)
    service = {
        "mode": "client",
        "accept": f"{HOST}:0",
        "connect": f"{HOST}:{server_port}",
        "qkd": "required",
        "target_sae_id": SERVER_SAE,
        "sni": "localhost",
        "cafile": str(ca),
        "kme": kme_table(tb, CLIENT_SAE),
    }
    service.update(overrides)
    return service


@contextlib.contextmanager
def tunnel_pair(
    tb: Testbed,
    root: Path,
    target_port: int,
    *,
    server: dict[str, Any] | None = None,
    client: dict[str, Any] | None = None,
    tunnel: dict[str, Any] | None = None,
) -> Iterator[tuple[TunnelProcess, TunnelProcess]]:
    """A server-side tunnel (site B) in front of ``target_port`` and a client-side one (site A) to it."""
    extra = {"tunnel": tunnel} if tunnel else {}
    b = TunnelProcess(
        root, "site-b", {**extra, "services": {"svc": server_service(tb, target_port, **(server or {}))}}
    )
    with b:
        a_doc = {**extra, "services": {"svc": client_service(tb, b.port("svc"), **(client or {}))}}
        with TunnelProcess(root, "site-a", a_doc) as a:
            yield a, b


# -- plaintext targets ---------------------------------------------------------------------------------------


class TcpServer:
    """A plaintext TCP server on loopback running ``handler(conn)`` in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            with conn:
                self.handler(conn)
        except Exception as exc:  # reported to the test
            self.errors.append(exc)

    def __enter__(self) -> TcpServer:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._acceptor.join(2)
        self.sock.close()
        for t in self._threads:
            t.join(2)


def echo(conn: socket.socket) -> None:
    """Echo until the client's end of stream, then end ours (half-close kept)."""
    while data := conn.recv(262144):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks = []
    total = 0
    while data := sock.recv(262144):
        chunks.append(data)
        total += len(data)
        assert total <= limit
    return b"".join(chunks)


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random bytes: a shifted, dropped or repeated chunk shows in the comparison."""
    return random.Random(seed).randbytes(size)
