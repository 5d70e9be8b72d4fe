"""Bytes through two real tunnel processes over TLS-QKD: integrity across rekeys, half-close both ways,
back-pressure against a reader that stops, and other connections served meanwhile."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

from tests.tunnel.conftest import (
    HOST,
    TIMEOUT,
    TcpServer,
    TunnelProcess,
    echo,
    pattern,
    recv_all,
    tunnel_pair,
)

from qkdtls.testbed import Testbed

MiB = 1 << 20


def _exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` (from a thread), end our side, read everything back until the tunnel's EOF."""
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = recv_all(sock, limit=len(payload))
        sender.join(TIMEOUT)
    return received


def _lockstep(port: int, payload: bytes, chunk: int) -> bytes:
    """Send ``payload`` a chunk at a time, each read back before the next goes; then end our side."""
    received = bytearray()
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        for offset in range(0, len(payload), chunk):
            part = payload[offset : offset + chunk]
            sock.sendall(part)
            want = len(received) + len(part)
            while len(received) < want:
                data = sock.recv(want - len(received))
                assert data, "the tunnel ended the stream early"
                received += data
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    return bytes(received)


def test_large_transfer_with_rekeys_is_byte_exact(testbed: Testbed, tmp_path: Path) -> None:
    size = 24 * MiB
    payload = pattern(size, seed=1)
    client = {"rekey_after_bytes": 2 * MiB}
    with TcpServer(echo) as target, tunnel_pair(testbed, tmp_path, target.port, client=client) as (a, b):
        # Both directions busy at once: a whole stream up, then back (rekeys are counted on both).
        assert _exchange(a.port("svc"), payload[: 8 * MiB]) == payload[: 8 * MiB]
        # Lockstep: data keeps flowing both ways for the whole transfer, so rekeys happen throughout.
        received = _lockstep(a.port("svc"), payload, 512 * 1024)
        assert len(received) == size
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        records_a, records_b = a.wait_records(2), b.wait_records(2)
    ra, rb = records_a[-1], records_b[-1]
    assert ra["mode"] == rb["mode"] == "qkd" and ra["profile"] == "secure"
    assert ra["key_ID"] == rb["key_ID"] and rb["peer_SAE_ID"] == 1001 and ra["peer_SAE_ID"] == 2001
    assert ra["bytes_up"] == ra["bytes_down"] == rb["bytes_up"] == rb["bytes_down"] == size
    assert ra["reason"] == rb["reason"] == "closed"
    # 48 MiB crossed the TLS connection (24 each way), a fresh QKD key due every 2 MiB of it; a rekey is
    # acknowledged a KME request later, so fewer than 24 happen, the same ones seen from both ends.
    assert ra["rekeys"] >= 6 and rb["rekeys"] == ra["rekeys"], (ra["rekeys"], rb["rekeys"])
    assert records_a[0]["rekeys"] >= 1 and records_a[0]["bytes_down"] == 8 * MiB


def test_no_rekey_after_the_client_side_ended(testbed: Testbed, tmp_path: Path) -> None:
    """The client ends its stream first, then the target sends 8 MiB: the client tunnel's rekey limit is
    passed after its close_notify, when it can no longer send a QkdRekey; it must not try (nor spend a
    key)."""
    payload = pattern(8 * MiB, seed=2)

    def answer_after_eof(conn: socket.socket) -> None:
        assert recv_all(conn) == b"go"
        conn.sendall(payload)

    client = {"rekey_after_bytes": 1 * MiB}
    with (
        TcpServer(answer_after_eof) as target,
        tunnel_pair(testbed, tmp_path, target.port, client=client) as (
            a,
            b,
        ),
    ):
        with socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT) as sock:
            sock.sendall(b"go")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == payload
        (ra,), (rb,) = a.wait_records(1), b.wait_records(1)
    assert not target.errors
    assert ra["reason"] == rb["reason"] == "closed" and ra["rekeys"] == rb["rekeys"] == 0
    assert not a.records("tls.internal_error")


def _client_half_closes_first(conn: socket.socket) -> None:
    got = recv_all(conn)
    conn.sendall(b"you sent %d bytes" % len(got) + b"." * 100_000)


def test_half_close_from_the_client_side(testbed: Testbed, tmp_path: Path) -> None:
    """The client ends its stream; the answer, written after the target saw that end, still arrives."""
    with (
        TcpServer(_client_half_closes_first) as target,
        tunnel_pair(testbed, tmp_path, target.port) as (a, b),
    ):
        with socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT) as sock:
            sock.sendall(b"x" * 5000)
            sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock)
        assert answer == b"you sent 5000 bytes" + b"." * 100_000
        assert a.wait_records(1)[0]["reason"] == "closed" and b.wait_records(1)[0]["reason"] == "closed"
    assert not target.errors


def test_half_close_from_the_server_side(testbed: Testbed, tmp_path: Path) -> None:
    """The target ends its stream first (a banner, then EOF); the client then still sends, and it arrives."""
    received: list[bytes] = []

    def banner_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        received.append(recv_all(conn))

    with TcpServer(banner_then_listen) as target, tunnel_pair(testbed, tmp_path, target.port) as (a, b):
        with socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT) as sock:
            assert recv_all(sock) == b"banner"  # EOF reached us through both tunnels
            time.sleep(0.2)
            sock.sendall(b"after your end " * 1000)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
        b.wait_records(1)
    assert not target.errors
    assert received == [b"after your end " * 1000]


def _push_until_stalled(sock: socket.socket, seconds: float) -> int:
    """Send as fast as the path accepts; stop once nothing more goes for ``seconds`` (bounded: 512 MiB)."""
    sock.setblocking(False)
    chunk = b"\0" * (256 * 1024)
    sent, last_progress = 0, time.monotonic()
    while sent < 512 * MiB and time.monotonic() - last_progress < seconds:
        try:
            n = sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        sent += n
        last_progress = time.monotonic()
    return sent


def test_a_reader_that_stops_keeps_memory_bounded(testbed: Testbed, tmp_path: Path) -> None:
    """Upstream: the target never reads. Downstream: the client never reads. Neither tunnel buffers what
    the stalled reader does not take; a new connection is served meanwhile."""
    release = threading.Event()

    def never_read_then_flood(conn: socket.socket) -> None:
        first = conn.recv(1)
        if first == b"u":  # upstream test: never read again
            release.wait(60)
            return
        conn.setblocking(False)  # downstream test: write until the client's tunnel stops taking it
        _push_until_stalled(conn, 1.5)
        release.wait(60)

    def serve(conn: socket.socket) -> None:
        if conn.recv(1, socket.MSG_PEEK) == b"e":
            echo(conn)
        else:
            never_read_then_flood(conn)

    with TcpServer(serve) as target, tunnel_pair(testbed, tmp_path, target.port) as (a, b):
        rss_before = a.rss_kib() + b.rss_kib()
        up = socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT)
        down = socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT)
        try:
            up.sendall(b"u")
            sent_up = _push_until_stalled(up, 1.5)
            down.sendall(b"d")
            time.sleep(3.0)  # the target floods; nobody reads at the client
            rss_after = a.rss_kib() + b.rss_kib()
            # Another connection is served while both stalled ones hold their buffers.
            started = time.monotonic()
            assert _exchange(a.port("svc"), b"e" + b"ping" * 1000) == b"e" + b"ping" * 1000
            elapsed = time.monotonic() - started
        finally:
            release.set()
            up.close()
            down.close()
    # What stalls is bounded by the kernel's socket buffers on three TCP connections plus the tunnels'
    # high-water marks (256 KiB per transport), not by what the sender would push (up to 512 MiB).
    assert sent_up < 96 * MiB, sent_up
    growth_mib = (rss_after - rss_before) / 1024
    assert growth_mib < 48, f"tunnels grew by {growth_mib:.1f} MiB"
    assert elapsed < 5.0


def test_idle_handshakes_do_not_stall_others(testbed: Testbed, tmp_path: Path) -> None:
    """TCP peers that never send a ClientHello: past max_handshakes the oldest are closed at once, the rest
    at the handshake timeout; real clients are served meanwhile. An idle established connection ends at
    the idle timeout. Failed set-ups are counted in the metrics (their log lines are rate-limited)."""
    server = {"handshake_timeout": 1.5, "idle_timeout": 1.5, "max_handshakes": 8}
    metrics = {"metrics": f"{HOST}:0"}
    with (
        TcpServer(echo) as target,
        tunnel_pair(testbed, tmp_path, target.port, server=server, tunnel=metrics) as (a, b),
    ):
        idle = [socket.create_connection((HOST, b.port("svc")), timeout=TIMEOUT) for _ in range(20)]
        started = time.monotonic()
        assert _exchange(a.port("svc"), b"hello") == b"hello"
        assert time.monotonic() - started < 3.0
        closed_at = []
        for sock in idle:
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:  # evicted: aborted
                pass
            closed_at.append(time.monotonic() - started)
            sock.close()
        with socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT) as quiet:
            quiet.sendall(b"x")
            assert quiet.recv(1) == b"x"
            assert quiet.recv(1) == b""  # idle for 1.5 s: closed
        # The connection is counted once both of its sides are gone, a moment after the client saw EOF.
        deadline = time.monotonic() + TIMEOUT
        text = _metrics(b)
        while 'reason="idle_timeout"' not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text = _metrics(b)
    # 20 idle handshakes and the real client's under a cap of 8: the 13 oldest idle ones were evicted.
    assert 'qkdtls_tunnel_connections_total{mode="none",reason="evicted",service="svc"} 13.0' in text
    assert 'qkdtls_tunnel_connections_total{mode="none",reason="handshake_timeout",service="svc"} 7.0' in text
    assert 'qkdtls_tunnel_connections_total{mode="qkd",reason="idle_timeout",service="svc"} 1.0' in text
    assert sorted(closed_at)[12] < 1.0  # the evicted went at once, not at their deadline


def test_connection_limit(testbed: Testbed, tmp_path: Path) -> None:
    client = {"max_connections": 2}
    with (
        TcpServer(echo) as target,
        tunnel_pair(testbed, tmp_path, target.port, client=client, tunnel={"metrics": f"{HOST}:0"}) as (a, _),
    ):
        held = [socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT) for _ in range(2)]
        for sock in held:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        with socket.create_connection((HOST, a.port("svc")), timeout=TIMEOUT) as third:
            try:
                assert third.recv(1) == b""
            except ConnectionResetError:
                pass
        for sock in held:
            sock.close()
        a.wait_records(2)
        assert _exchange(a.port("svc"), b"again") == b"again"
        metrics = _metrics(a)
    assert 'qkdtls_tunnel_refused_total{service="svc"} 1.0' in metrics


def _metrics(tunnel: TunnelProcess) -> str:
    import urllib.request

    port = tunnel.ports.get("metrics")
    assert port, "no metrics listener"
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=TIMEOUT) as resp:
        return str(resp.read().decode())
