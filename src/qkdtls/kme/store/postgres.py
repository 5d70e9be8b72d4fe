"""PostgreSQL key store, for several KME processes sharing one database.

Same operations and group commit as SQLite (``sql.py``). Batches run on one connection in one dedicated
thread (psycopg's synchronous API; the event loop never blocks on the network). Concurrent processes never
take the same block: free blocks are picked with ``FOR UPDATE SKIP LOCKED`` and marked held by the picking
instance before its commit; the slave side deletes only rows that are still free. Holds of a crashed process
are freed by :meth:`release_stale_holds` once they are older than any peer timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qkdtls.kme.store.base import StoreUnavailable
from qkdtls.kme.store.sql import MIGRATE_COUNTERS_1_TO_2, SCHEMA_VERSION, Op, SqlKeyStore, migrate_2_to_3

try:
    import psycopg
except ImportError:  # pragma: no cover - depends on the installed extras
    psycopg = None  # type: ignore[assignment]

SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blocks (
    link BIGINT NOT NULL, seq BIGINT NOT NULL, direction SMALLINT NOT NULL, data BYTEA NOT NULL,
    held_by TEXT, held_at DOUBLE PRECISION, PRIMARY KEY (link, seq));
CREATE INDEX blocks_free ON blocks (link, direction, seq) WHERE held_by IS NULL;
CREATE INDEX blocks_held ON blocks (held_at) WHERE held_by IS NOT NULL;
CREATE TABLE keys (
    key_id TEXT PRIMARY KEY, link BIGINT NOT NULL, master_sae BIGINT NOT NULL, slaves TEXT NOT NULL,
    pending TEXT NOT NULL, size INTEGER NOT NULL, data BYTEA NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    collected TEXT NOT NULL DEFAULT '');
CREATE INDEX keys_expiry ON keys (expires_at);
CREATE TABLE streams (
    link BIGINT PRIMARY KEY, block_size INTEGER NOT NULL, next_seq BIGINT NOT NULL, carry BYTEA NOT NULL,
    last_file TEXT NOT NULL, imported_bytes BIGINT NOT NULL, histogram BYTEA NOT NULL);
CREATE TABLE ledger (
    link BIGINT NOT NULL, name TEXT NOT NULL, size BIGINT NOT NULL, sha256 TEXT NOT NULL,
    imported_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (link, name));
CREATE TABLE counters (
    link BIGINT NOT NULL, name TEXT NOT NULL, value BIGINT NOT NULL, PRIMARY KEY (link, name));
"""
# Shares of keys relayed over several paths (schema 3), see sqlite.py.
SHARES = """
CREATE TABLE shares (
    key_id TEXT NOT NULL, x INTEGER NOT NULL, link BIGINT NOT NULL, master_sae BIGINT NOT NULL,
    slaves TEXT NOT NULL, pending TEXT NOT NULL, size INTEGER NOT NULL, scheme TEXT NOT NULL,
    k INTEGER NOT NULL, n INTEGER NOT NULL, data BYTEA NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (key_id, x))
"""

log = logging.getLogger(__name__)

# A deadlock or serialization failure rolls the whole batch back; it then runs again (the operations are
# functions of the database state) after a jittered pause, at most this many times.
RETRIES = 4
RETRY_PAUSE = 0.01  # seconds, doubled per attempt, times a random factor in [0.5, 1.5)

_MIGRATION_LOCK = 0x716B64746C73  # advisory lock id: processes starting together create the schema once
_PLACEHOLDER = re.compile(r"\?")


class PostgresKeyStore(SqlKeyStore):
    lock_clause = " FOR UPDATE"
    skip_locked_clause = " FOR UPDATE SKIP LOCKED"
    integrity_errors = (psycopg.IntegrityError,) if psycopg is not None else ()
    retryable_errors = (
        (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) if psycopg is not None else ()
    )

    def __init__(self, url: str, *, connect_timeout: int = 10) -> None:
        super().__init__()
        if psycopg is None:
            raise StoreUnavailable("the PostgreSQL key store needs psycopg (pip install qkdtls[postgres])")
        self._sql_cache: dict[str, str] = {}
        self.retries = 0  # batches run again after a conflict (tests and logs)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kme-pg")
        try:
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout)
            self._migrate()
        except psycopg.Error as exc:
            self._thread.shutdown(wait=False)
            # The URL may carry a password: name only the failure.
            raise StoreUnavailable(f"cannot open PostgreSQL key store: {type(exc).__name__}") from None

    def _migrate(self) -> None:
        with self._conn.cursor() as cur:
            cur.execute("BEGIN")
            try:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                cur.execute("SELECT to_regclass('meta') IS NOT NULL")
                row = cur.fetchone()
                if not (row and row[0]):  # SCHEMA is schema 2; the migrations below bring it up to date
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            cur.execute(statement)
                    cur.execute(
                        "INSERT INTO meta(name, value) VALUES ('schema_version', %s)",
                        (str(SCHEMA_VERSION - 1),),
                    )
                cur.execute("SELECT value FROM meta WHERE name = 'schema_version'")
                version = cur.fetchone()
                if version is not None and int(version[0]) == 1:
                    cur.execute("ALTER TABLE keys ADD COLUMN collected TEXT NOT NULL DEFAULT ''")
                    for statement in MIGRATE_COUNTERS_1_TO_2:
                        cur.execute(statement)
                    cur.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
                    version = ("2",)
                if version is not None and int(version[0]) == 2:
                    for statement in migrate_2_to_3(SHARES):
                        cur.execute(statement)
                    version = ("3",)
                if version is None or int(version[0]) != SCHEMA_VERSION:
                    raise StoreUnavailable(f"key store schema version {version} is not {SCHEMA_VERSION}")
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def _sql(self, text: str) -> str:
        out = self._sql_cache.get(text)
        if out is None:
            out = self._sql_cache[text] = _PLACEHOLDER.sub("%s", text)
        return out

    def _cursor(self) -> Any:
        return self._conn.cursor()

    async def _execute(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run_batch, ops)

    def _run_batch(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """One batch, run again after a deadlock or serialization failure (in this store's own thread, so the
        pause blocks no event loop). Other processes on the database cause these, not the operations."""
        for attempt in range(RETRIES + 1):
            try:
                return super()._run_batch(ops)
            except self.retryable_errors as exc:
                if attempt == RETRIES:
                    raise
                pause = RETRY_PAUSE * 2**attempt * random.uniform(0.5, 1.5)
                self.retries += 1
                log.warning(
                    "key store transaction conflict; retrying",
                    extra={
                        "event": "store.retry",
                        "error": type(exc).__name__,
                        "attempt": attempt + 1,
                        "pause": round(pause, 4),
                    },
                )
                time.sleep(pause)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._closed:
            return
        await self._drain()
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._thread, self._conn.close)
        self._thread.shutdown(wait=True)
