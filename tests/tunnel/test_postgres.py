"""PostgreSQL on TLS-QKD, unchanged: ``psql`` → client tunnel (site A) → TLS-QKD → server tunnel (site B)
→ a real PostgreSQL server, keyed through the two KMEs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tests.peers.clients import require_tool
from tests.tunnel.conftest import HOST, TIMEOUT, tunnel_pair

from qkdtls.testbed import Testbed

pytestmark = pytest.mark.postgres

SCRIPT = """
CREATE TABLE readings (id int PRIMARY KEY, site text, value double precision);
INSERT INTO readings SELECT g, 'site-' || (g % 7), g * 0.5 FROM generate_series(1, 20000) AS g;
SELECT count(*), sum(value), min(site), max(site) FROM readings;
COPY (SELECT id, md5(id::text) FROM readings ORDER BY id) TO STDOUT;
"""


def _psql(port: int, database: str, script: str) -> subprocess.CompletedProcess[str]:
    dsn = f"host={HOST} port={port} user=postgres dbname={database} sslmode=disable connect_timeout=10"
    return subprocess.run(
        [require_tool("psql"), dsn, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"],
        input=script,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )


def test_psql_through_two_tunnels(testbed: Testbed, tmp_path: Path, postgres_dsn: str) -> None:
    url = urlsplit(postgres_dsn)
    database = url.path.lstrip("/")
    assert url.port is not None
    alpn = {"alpn": ["postgresql"]}
    with tunnel_pair(testbed, tmp_path, url.port, client=alpn, server=alpn) as (a, b):
        result = _psql(a.port("svc"), database, SCRIPT)
        again = _psql(a.port("svc"), database, "SELECT count(*) FROM readings;")
        records_a, records_b = a.wait_records(2), b.wait_records(2)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "20000|100005000|site-0|site-6" in lines
    copied = [line for line in lines if "\t" in line]
    assert len(copied) == 20000 and copied[0].startswith("1\tc4ca4238a0b923820dcc509a6f75849b")
    assert again.stdout.strip() == "20000"
    # Two psql sessions, each its own TLS-QKD connection with its own key, seen alike at both ends.
    assert [r["mode"] for r in records_a + records_b] == ["qkd"] * 4
    assert sorted(r["key_ID"] for r in records_a) == sorted(r["key_ID"] for r in records_b)
    assert len({r["key_ID"] for r in records_a}) == 2
    assert all(r["alpn"] == "postgresql" for r in records_a + records_b)
    assert all(r["server_name"] == "localhost" for r in records_b)  # the client tunnel's SNI
    assert all(r["reason"] == "closed" for r in records_a + records_b)
    big = max(records_b, key=lambda r: r["bytes_down"])
    assert big["bytes_down"] > 20000 * 36  # the COPY output went through
