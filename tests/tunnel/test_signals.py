"""Operating a running tunnel under load: SIGHUP reloads without dropping established connections (an
invalid file changes nothing), SIGTERM stops accepting and lets running connections finish within the grace
period, then closes what is left."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

from tests.tunnel.conftest import (
    HOST,
    TIMEOUT,
    TcpServer,
    TunnelProcess,
    client_service,
    echo,
    pattern,
    server_service,
)

from qkdtls.testbed import Testbed, free_port

CHUNK = 64 * 1024


class Load:
    """``n`` connections, each sending a chunk and reading it back in a loop until stopped; then each
    half-closes and expects the tunnel's end of stream. Every byte is compared."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.rounds = [0] * n
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        data = pattern(CHUNK * 4, seed=i)
        try:
            with socket.create_connection((HOST, self.port), timeout=TIMEOUT) as sock:
                while not self.stop.is_set():
                    offset = (self.rounds[i] % 4) * CHUNK
                    part = data[offset : offset + CHUNK]
                    sock.sendall(part)
                    got = b""
                    while len(got) < CHUNK:
                        more = sock.recv(CHUNK - len(got))
                        if not more:
                            raise AssertionError(f"connection {i}: stream ended early")
                        got += more
                    if got != part:
                        raise AssertionError(f"connection {i}: bytes differ in round {self.rounds[i]}")
                    self.rounds[i] += 1
                sock.shutdown(socket.SHUT_WR)
                if sock.recv(1) != b"":
                    raise AssertionError(f"connection {i}: data after the end")
        except BaseException as exc:  # reported to the test
            self.errors.append(exc)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT
        while min(self.rounds) < 3 and not self.errors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not self.errors and min(self.rounds) >= 3, (self.errors, self.rounds)
        return self

    def progress(self, rounds: int = 3) -> None:
        """Every connection makes ``rounds`` more round trips (it is still served)."""
        start = list(self.rounds)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not self.errors:
            if all(now - before >= rounds for now, before in zip(self.rounds, start, strict=True)):
                return
            time.sleep(0.02)
        raise AssertionError(f"connections stalled: {self.errors or self.rounds}")

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(TIMEOUT)


def _wait_event(tunnel: TunnelProcess, event: str, count: int = 1) -> list[dict[str, object]]:
    records = tunnel.wait_records(count, event=event)
    assert len(records) >= count, f"no {event} in {tunnel.log.read_text()[-2000:]}"
    return records


def _ping(port: int) -> bytes:
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while data := sock.recv(100):
            out += data
    return out


def test_sighup_reloads_without_dropping_connections(testbed: Testbed, tmp_path: Path) -> None:
    with TcpServer(echo) as target:
        b = TunnelProcess(tmp_path, "site-b", {"services": {"svc": server_service(testbed, target.port)}})
        with b:
            a_doc = {"services": {"svc": client_service(testbed, b.port("svc"))}}
            with TunnelProcess(tmp_path, "site-a", a_doc) as a, Load(a.port("svc"), 6) as load:
                # An invalid file: refused with the field named, nothing changes.
                broken = {"services": {"svc": {**client_service(testbed, b.port("svc")), "qkd": "sometimes"}}}
                a.write(broken)
                a.signal(signal.SIGHUP)
                (failure,) = _wait_event(a, "tunnel.reload_failed")
                assert "services.svc.qkd" in str(failure["reason"])
                load.progress()
                # A valid one: the service changes (a new context for new connections, same socket), a
                # second service appears; the server side reloads too.
                second = free_port()
                a.write({
                    "services": {
                        "svc": client_service(testbed, b.port("svc"), idle_timeout=120.0, prefetch=2),
                        "svc2": client_service(testbed, b.port("svc"), accept=f"{HOST}:{second}"),
                    }
                })  # fmt: skip
                b.write({"services": {"svc": server_service(testbed, target.port, idle_timeout=120.0)}})
                a.signal(signal.SIGHUP)
                b.signal(signal.SIGHUP)
                _wait_event(a, "tunnel.reloaded")
                _wait_event(b, "tunnel.reloaded")
                load.progress()
                assert _ping(a.port("svc")) == b"ping"
                assert _ping(second) == b"ping"
                load.progress()
            assert not load.errors, load.errors
            records = a.wait_records(8)
    assert len(records) == 8
    assert all(r["reason"] == "closed" and r["mode"] == "qkd" for r in records), records
    assert sorted(r["service"] for r in records) == ["svc"] * 7 + ["svc2"]


def test_sigterm_lets_running_connections_finish(testbed: Testbed, tmp_path: Path) -> None:
    with TcpServer(echo) as target:
        b = TunnelProcess(tmp_path, "site-b", {"services": {"svc": server_service(testbed, target.port)}})
        with b:
            a_doc = {
                "tunnel": {"grace_period": 20.0},
                "services": {"svc": client_service(testbed, b.port("svc"))},
            }
            a = TunnelProcess(tmp_path, "site-a", a_doc).start()
            port = a.port("svc")
            try:
                with Load(port, 6) as load:
                    a.signal(signal.SIGTERM)
                    _wait_event(a, "tunnel.draining")
                    # No new connection is accepted; the running ones are still served.
                    try:
                        refused = _ping(port) != b"ping"
                    except OSError:
                        refused = True
                    assert refused
                    load.progress(5)
                    stopped_at = time.monotonic()
                # The last connection ended: the process exits well before the grace period is over.
                assert a.wait(TIMEOUT) == 0
                assert time.monotonic() - stopped_at < 10.0
                assert not load.errors, load.errors
            finally:
                a.stop()
            records = a.records()
    assert len(records) == 6 and all(r["reason"] == "closed" for r in records), records


def test_sigterm_closes_what_outlives_the_grace_period(testbed: Testbed, tmp_path: Path) -> None:
    with TcpServer(echo) as target:
        b = TunnelProcess(tmp_path, "site-b", {"services": {"svc": server_service(testbed, target.port)}})
        with b:
            a_doc = {
                "tunnel": {"grace_period": 1.0},
                "services": {"svc": client_service(testbed, b.port("svc"))},
            }
            a = TunnelProcess(tmp_path, "site-a", a_doc).start()
            try:
                with socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT) as sock:
                    sock.sendall(b"x")
                    assert sock.recv(1) == b"x"
                    started = time.monotonic()
                    a.signal(signal.SIGTERM)
                    assert sock.recv(1) == b""  # closed after the grace period
                    assert 0.8 < time.monotonic() - started < 8.0
                assert a.wait(TIMEOUT) == 0
            finally:
                a.stop()
            (record,) = a.records()
            (far_end,) = b.wait_records(1)
    assert record["reason"] == "shutdown"
    # The server side saw a clean end (close_notify), not a reset.
    assert far_end["reason"] == "closed"
