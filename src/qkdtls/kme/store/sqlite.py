"""SQLite key store (the default): one connection, called synchronously in the event loop.

Direct calls were measured 2-3x faster than aiosqlite's thread hop, and group commit (see ``sql.py``) bounds
how long one batch blocks the loop. Committing in a dedicated writer thread instead (the loop serving HTTP
during the fsync) was measured too: here an fsync takes 0.2-2 ms, and the thread's GIL hand-overs and
smaller batches cost about a fifth more CPU per key cycle for no gain in cycles per second.

The database is opened in WAL mode with ``synchronous=FULL`` (a power loss must not roll back a deletion and
so hand a key out twice), ``secure_delete=ON`` (deleted key bytes are overwritten) and
``locking_mode=EXCLUSIVE``: one KME process owns the file. That single owner is what lets holds live in
memory only (``holds.py``): they die with the process anyway, so holding and releasing never touch the
database, and only consuming or burning blocks commits. Several processes on one database need the
PostgreSQL store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from qkdtls.kme.store.base import Block, LinkStats, LostHold, ShortStock, StoreUnavailable
from qkdtls.kme.store.holds import VolatileHolds
from qkdtls.kme.store.sql import (
    MIGRATE_COUNTERS_1_TO_2,
    SCHEMA_VERSION,
    SqlKeyStore,
    Tx,
    _chunks,
    _Cur,
    _marks,
    migrate_2_to_3,
)

log = logging.getLogger(__name__)

# Free blocks read into memory per refill: one read per this many held blocks, a few KiB of key material.
READ_AHEAD = 512

SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blocks (
    link INTEGER NOT NULL, seq INTEGER NOT NULL, direction INTEGER NOT NULL, data BLOB NOT NULL,
    held_by TEXT, held_at REAL, PRIMARY KEY (link, seq)) WITHOUT ROWID;
CREATE TABLE keys (
    id INTEGER PRIMARY KEY, key_id TEXT NOT NULL UNIQUE, link INTEGER NOT NULL, master_sae INTEGER NOT NULL,
    slaves TEXT NOT NULL, pending TEXT NOT NULL, size INTEGER NOT NULL, data BLOB NOT NULL,
    expires_at REAL NOT NULL, collected TEXT NOT NULL DEFAULT '');
CREATE INDEX keys_expiry ON keys (expires_at);
CREATE TABLE streams (
    link INTEGER PRIMARY KEY, block_size INTEGER NOT NULL, next_seq INTEGER NOT NULL, carry BLOB NOT NULL,
    last_file TEXT NOT NULL, imported_bytes INTEGER NOT NULL, histogram BLOB NOT NULL);
CREATE TABLE ledger (
    link INTEGER NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    imported_at REAL NOT NULL, PRIMARY KEY (link, name)) WITHOUT ROWID;
CREATE TABLE counters (
    link INTEGER NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (link, name)) WITHOUT ROWID;
"""
# Shares of keys relayed over several paths, kept until enough (and then all) shares arrived (schema 3).
SHARES = """
CREATE TABLE shares (
    key_id TEXT NOT NULL, x INTEGER NOT NULL, link INTEGER NOT NULL, master_sae INTEGER NOT NULL,
    slaves TEXT NOT NULL, pending TEXT NOT NULL, size INTEGER NOT NULL, scheme TEXT NOT NULL,
    k INTEGER NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (key_id, x)) WITHOUT ROWID
"""


class SqliteKeyStore(SqlKeyStore):
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: str, *, busy_timeout_ms: int = 5000) -> None:
        super().__init__()
        self.path = path
        self._holds = VolatileHolds()
        self._refilling: dict[tuple[int, int], asyncio.Lock] = {}
        try:
            self._conn = sqlite3.connect(path, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self._conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            if path != ":memory:":
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreUnavailable(f"cannot switch {path} to WAL mode")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA secure_delete = ON")
            self._migrate()
            # One process owns this file (exclusive lock): holds left by a previous run are orphans.
            self._conn.execute("BEGIN IMMEDIATE")
            released = self._conn.execute(
                "UPDATE blocks SET held_by = NULL, held_at = NULL WHERE held_by IS NOT NULL "
                "RETURNING link, direction"
            ).fetchall()
            for link, direction in released:
                self._conn.execute(
                    "INSERT INTO counters(link, name, value) VALUES (?, ?, 1) ON CONFLICT (link, name) "
                    "DO UPDATE SET value = counters.value + 1",
                    (link, f"free{direction}"),
                )
            self._conn.execute("COMMIT")
            self.released_at_open = len(released)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open key store {path}: {exc}") from None

    def _migrate(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            if not exists:  # SCHEMA is schema 2; the migrations below bring it to SCHEMA_VERSION
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta(name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION - 1),)
                )
            version = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if version is not None and int(version[0]) == 1:
                # Rows in insertion order (rowid) instead of by key ID: collected keys now stay for their
                # re-collection window, and appending to a time-ordered table dirties far fewer pages per
                # commit than inserting at random key IDs (measured: about 12 µs less per key).
                conn.execute("ALTER TABLE keys RENAME TO keys_1")
                conn.execute("DROP INDEX keys_expiry")
                for statement in SCHEMA.split(";"):
                    if "TABLE keys " in statement or "INDEX keys_expiry" in statement:
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO keys(key_id, link, master_sae, slaves, pending, size, data, expires_at) "
                    "SELECT key_id, link, master_sae, slaves, pending, size, data, expires_at FROM keys_1 "
                    "ORDER BY expires_at"
                )
                conn.execute("DROP TABLE keys_1")  # secure_delete overwrites its pages
                for statement in MIGRATE_COUNTERS_1_TO_2:
                    conn.execute(statement)
                conn.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
                version = ("2",)
            if version is not None and int(version[0]) == 2:
                for statement in migrate_2_to_3(SHARES):
                    conn.execute(statement)
                version = ("3",)
            if version is None or int(version[0]) != SCHEMA_VERSION:
                raise StoreUnavailable(f"key store schema version {version} is not {SCHEMA_VERSION}")
            # Indexes of earlier releases: holds live in memory here, so free blocks are found by walking
            # the primary key (link, seq) from the read-ahead frontier, and each index cost a page per commit.
            conn.execute("DROP INDEX IF EXISTS blocks_free")
            conn.execute("DROP INDEX IF EXISTS blocks_held")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _cursor(self) -> Any:
        return self._conn.cursor()

    def _begin(self, cur: Any) -> None:
        cur.execute("BEGIN IMMEDIATE")

    async def close(self) -> None:
        if self._closed:
            return
        await self._drain()
        self._closed = True
        self._conn.close()

    # -- holds in memory (see holds.py) ---------------------------------------------------------------------

    async def _read_ahead(self, link: int, direction: int, above: int, limit: int) -> list[Block]:
        def op(tx: Tx) -> list[Block]:
            tx.cur.execute(
                "SELECT seq, data FROM blocks WHERE link = ? AND direction = ? "
                "AND held_by IS NULL AND seq > ? ORDER BY seq LIMIT ?",
                (link, direction, above, limit),
            )
            return [Block(seq, bytes(data)) for seq, data in tx.cur.fetchall()]

        return await self._do(op)

    async def hold_blocks(self, link: int, direction: int, count: int) -> list[Block]:
        if self._closed:
            raise StoreUnavailable("key store is closed")
        taken = self._holds.hold(link, direction, count)
        if taken is not None:
            return taken
        # One refill per direction at a time: the frontier only moves under this lock.
        lock = self._refilling.setdefault((link, direction), asyncio.Lock())
        async with lock:
            for _ in range(64):  # each read adds up to READ_AHEAD blocks; concurrent holders may take them
                short = count - self._holds.available(link, direction)
                if short <= 0:
                    break
                limit = max(short, READ_AHEAD)
                rows = await self._read_ahead(link, direction, self._holds.frontier(link, direction), limit)
                self._holds.add_read(link, direction, rows)
                if len(rows) < limit:
                    break
            taken = self._holds.hold(link, direction, count)
        if taken is None:
            raise ShortStock(self._holds.available(link, direction))
        return taken

    async def read_named(self, link: int, direction: int, seqs: Sequence[int]) -> dict[int, bytes]:
        # Read at once, outside the group commit: this process is the file's only user and runs its
        # transactions inline, so no write is half done here, and a relay hop does not wait for a commit
        # (an fsync) it has no part in before it can forward.
        if self._closed:
            raise StoreUnavailable("key store is closed")
        try:
            return self._select_named(_Cur(self._conn.cursor(), self._sql), link, direction, seqs)
        except sqlite3.Error as exc:
            log.error("key store read failed", extra={"event": "store.failed", "error": repr(exc)})
            raise StoreUnavailable("key store failed") from None

    async def release_blocks(self, link: int, seqs: Sequence[int]) -> int:
        return self._holds.release(link, seqs)

    def _delete_rows(self, tx: Tx, link: int, seqs: Sequence[int]) -> int:
        deleted = 0
        for chunk in _chunks(list(seqs)):
            tx.cur.execute(
                f"DELETE FROM blocks WHERE link = ? AND held_by IS NULL AND seq IN ({_marks(len(chunk))}) "
                "RETURNING direction",
                (link, *chunk),
            )
            for (direction,) in tx.cur.fetchall():
                tx.add(link, f"free{direction}", -1)
                deleted += 1
        return deleted

    async def consume_held(self, link: int, seqs: Sequence[int]) -> None:
        """Deliverable once every block is still held; the deletion commits later (``_do_later``).

        Not waiting for that commit keeps an fsync off every cross-KME ``enc_keys``, and the deletions of
        concurrent requests share one commit. Safe because the peer KME's committed reservation, not this
        deletion, is what keeps the blocks from a second delivery: if this process dies first, the restarted
        KME finds the blocks free again, the peer refuses them (409) and they are burnt.
        """
        if self._closed:
            raise StoreUnavailable("key store is closed")
        unique = list(dict.fromkeys(seqs))
        if not self._holds.all_held(link, unique):
            raise LostHold(f"{len(unique)} held blocks on link {link} are no longer held")
        self._holds.consume(link, unique)

        def op(tx: Tx) -> None:
            if self._delete_rows(tx, link, unique) != len(unique):
                raise LostHold(f"{len(unique)} held blocks on link {link} are gone from the store")

        def done(ok: bool, value: Any) -> None:
            if ok or isinstance(value, LostHold):
                self._holds.forget(link, unique)
            if not ok:
                # Still held as consumed, so never handed out again by this process; after a restart the
                # peer refuses them (409) and they are burnt.
                log.error(
                    "deleting delivered blocks failed",
                    extra={
                        "event": "store.failed",
                        "link": link,
                        "blocks": len(unique),
                        "error": repr(value),
                    },
                )

        self._do_later(op, done)

    def _spend_rows(self, tx: Tx, link: int, seqs: Sequence[int]) -> int:
        # Holds live in memory: the rows of held blocks look free in the database, and only this process
        # deletes blocks of its own directions.
        if not self._holds.all_held(link, seqs):
            return -1
        return self._delete_rows(tx, link, seqs)

    def _spent(self, spend: Mapping[int, Sequence[int]]) -> None:
        for link, seqs in spend.items():
            self._holds.forget(link, seqs)

    async def burn_held(self, link: int, seqs: Sequence[int]) -> int:
        if self._closed:
            raise StoreUnavailable("key store is closed")
        ours = self._holds.held_only(link, seqs)

        def op(tx: Tx) -> int:
            burnt = self._delete_rows(tx, link, ours)
            tx.add(link, "burnt", burnt)
            return burnt

        burnt = await self._do(op) if ours else 0
        self._holds.forget(link, ours)
        return burnt

    async def release_stale_holds(self, held_before: float, limit: int = 10_000) -> int:
        return self._holds.release_older_than(held_before, limit)

    async def free_blocks(self, link: int, direction: int) -> int:
        return await super().free_blocks(link, direction) - self._holds.held_count(link, direction)

    async def link_stats(self, link: int) -> LinkStats:
        stats = await super().link_stats(link)
        free = {d: n - self._holds.held_count(link, d) for d, n in stats.free_blocks.items()}
        return dataclasses.replace(stats, free_blocks=free)
