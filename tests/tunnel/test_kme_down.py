"""A KME that goes down: new connections fail cleanly under ``required`` and fall back to classic TLS 1.3
under ``preferred``; established connections go on (a rekey that finds no key is postponed); service comes
back with the KME."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.tls_qkd.conftest import TESTBED_SAES
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

from qkdtls.testbed import Testbed


@pytest.fixture
def own_testbed(tmp_path: Path) -> Iterator[Testbed]:
    with Testbed.create(tmp_path / "tb", saes=TESTBED_SAES, initial_key_bytes=1 << 18) as tb:
        yield tb


def _round_trip(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        more = sock.recv(len(data) - len(got))
        assert more, "stream ended"
        got += more
    assert got == data


def _attempt(port: int) -> str:
    """One connection: 'served' (echo came back), or 'closed' when the tunnel ended it."""
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        try:
            _round_trip(sock, b"hello")
        except (AssertionError, ConnectionResetError):
            return "closed"
        return "served"


def test_kme_outage(own_testbed: Testbed, tmp_path: Path) -> None:
    tb = own_testbed
    with TcpServer(echo) as target:
        b_doc = {"services": {"svc": server_service(tb, target.port, qkd="preferred")}}
        with TunnelProcess(tmp_path, "site-b", b_doc) as b:
            a_doc = {
                "services": {
                    "req": client_service(tb, b.port("svc"), rekey_after_bytes=128 * 1024),
                    "pref": client_service(tb, b.port("svc"), qkd="preferred"),
                }
            }
            with TunnelProcess(tmp_path, "site-a", a_doc) as a:
                established = socket.create_connection((HOST, a.port("req")), timeout=TIMEOUT)
                _round_trip(established, b"before")

                tb.stop_kme(1)  # the client side's KME
                started = time.monotonic()
                assert _attempt(a.port("req")) == "closed"
                assert time.monotonic() - started < 5.0  # a refused KME connection fails at once
                assert _attempt(a.port("pref")) == "served"
                # The established connection goes on; the rekeys it is due find no key and are postponed.
                _round_trip(established, pattern(512 * 1024, seed=3))
                records = a.wait_records(2)
                assert [r["reason"] for r in records] == ["kme_unavailable", "closed"]
                assert records[0]["service"] == "req" and records[0]["mode"] is None
                assert records[1]["service"] == "pref" and records[1]["mode"] == "classic"

                tb.start_kme(1)
                assert _attempt(a.port("req")) == "served"

                # The server side's KME: a key for site B needs a reservation there, so site A's KME
                # refuses too; required fails, preferred goes classic.
                tb.stop_kme(2)
                assert _attempt(a.port("req")) == "closed"
                assert _attempt(a.port("pref")) == "served"
                _round_trip(established, b"after both outages")
                established.shutdown(socket.SHUT_WR)
                assert established.recv(1) == b""
                established.close()
                records = a.wait_records(6)
                postponed = a.records("tls.rekey_postponed")
    by_order = [(r["service"], r["mode"], r["reason"]) for r in records]
    assert by_order[2] == ("req", "qkd", "closed")  # after the KME came back
    assert by_order[3] == ("req", None, "kme_unavailable")
    assert by_order[4][1:] == ("classic", "closed") and by_order[4][0] == "pref"
    assert by_order[5] == ("req", "qkd", "closed")  # the connection that lived through both outages
    assert len(by_order) == 6
    assert postponed  # the rekeys due while a KME was down waited for a key instead of ending it
