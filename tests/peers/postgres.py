"""A real PostgreSQL 15 server for the tests, started once per session on a free loopback port.

The tests run as root and PostgreSQL refuses to, so the cluster belongs to the ``postgres`` user and every
server command goes through ``runuser``. The server listens on 127.0.0.1 only and on a Unix socket inside
its own temporary directory, so parallel test sessions never meet. Durability is switched off: these tests
check behaviour, not crash safety of PostgreSQL itself.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdtls.testbed import free_port

PG_BIN = Path(os.environ.get("QKDTLS_PG_BIN", "/usr/lib/postgresql/15/bin"))
_db_counter = itertools.count()


def _as_postgres(*args: str, timeout: float = 60) -> None:
    result = subprocess.run(
        ["runuser", "-u", "postgres", "--", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{Path(args[0]).name} failed ({result.returncode}): {result.stderr.strip()[-2000:]}"
        )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """DSN of the maintenance database ``postgres`` on a private server; stopped after the session."""
    missing = [name for name in ("initdb", "pg_ctl") if not (PG_BIN / name).exists()]
    if missing or shutil.which("runuser") is None:
        pytest.fail(
            f"PostgreSQL 15 server binaries not found in {PG_BIN} (need initdb, pg_ctl) or no runuser"
        )
    base = Path(tempfile.mkdtemp(prefix="qkdtls-pg-"))
    shutil.chown(base, user="postgres", group="postgres")
    data = base / "data"
    _as_postgres(
        str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"
    )
    # The port is drawn outside the kernel's ephemeral range (testbed.free_port), but another process may
    # still bind it between the draw and the server's start: then draw again, a bounded number of times.
    attempts = 4
    for attempt in range(1, attempts + 1):
        port = free_port()
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
        try:
            _as_postgres(
                str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-o", options,
                "-w", "-t", "60", "start",
            )  # fmt: skip
            break
        except RuntimeError as exc:
            log_tail = (base / "server.log").read_text(errors="replace")[-2000:]
            if attempt == attempts or "could not bind" not in log_tail:
                raise RuntimeError(f"PostgreSQL did not start on port {port}: {exc}\n{log_tail}") from None
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        try:
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    import psycopg

    name = f"t{os.getpid()}_{next(_db_counter)}"
    with psycopg.connect(postgres_server, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
