"""SQL implementation of :class:`KeyStore` shared by SQLite and PostgreSQL, with group commit.

Every public method queues one operation (a plain function over a DB-API cursor). A flusher runs all queued
operations in one transaction (a refused one is rolled back alone, see ``_apply``): with
``synchronous=FULL`` a commit costs one fsync (0.2-2 ms here and about 120 µs of CPU, more under load), so
batching the operations of concurrent requests into one commit is what keeps throughput flat under load.
Writes nobody waits for (``_do_later``) ride on the next commit. Counter updates are aggregated per batch
and applied last in a fixed order, so concurrent PostgreSQL writers lock counter rows in the same order.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qkdtls.kme.store.base import (
    Block,
    BlocksTaken,
    ImportRejected,
    KeysNotFound,
    KeyStore,
    LinkStats,
    LostHold,
    MulticastRefused,
    NewKeySpec,
    NotASlave,
    ShortStock,
    StoredKey,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
SCHEMA_VERSION = 1
MAX_BATCH = 512
# Loop turns a batch waits for more operations before it commits (see ``_flush``).
GATHER_TURNS = 8
# A deferred write (see ``_do_later``) waits at most this long for another commit to ride on.
LAZY_DELAY = 0.02
_IN_CHUNK = 500  # stays far below SQLite's bound-parameter limit
_HIST = struct.Struct("<256Q")
_EMPTY_HIST = _HIST.pack(*([0] * 256))


Deltas = dict[tuple[int, str], int]
_NONE: Deltas = {}


@dataclass(slots=True)
class Tx:
    """What an operation sees: a cursor, this instance's holder token and its counter deltas."""

    cur: Any
    holder: str
    lock: str  # row-locking suffix for SELECTs that precede a write ("" on SQLite: one writer anyway)
    skip_locked: str
    # Counter changes are written once per batch, after its last operation. ``deltas`` receives this
    # operation's; ``earlier`` holds those of the batch's operations before it that are not in ``deltas``.
    deltas: Deltas = field(default_factory=dict)
    earlier: Deltas = field(default_factory=lambda: _NONE)

    def add(self, link: int, name: str, delta: int) -> None:
        if delta:
            key = (link, name)
            self.deltas[key] = self.deltas.get(key, 0) + delta

    def counter(self, link: int, name: str, stored: int) -> int:
        """A counter's value as this operation sees it: the stored row plus the batch's changes so far."""
        key = (link, name)
        return stored + self.earlier.get(key, 0) + self.deltas.get(key, 0)


Op = Callable[[Tx], Any]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(seqs: Sequence[int]) -> list[Sequence[int]]:
    return [seqs[i : i + _IN_CHUNK] for i in range(0, len(seqs), _IN_CHUNK)]


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _join(ids: Sequence[int]) -> str:
    return ",".join(str(i) for i in ids)


class SqlKeyStore(KeyStore):
    """Subclasses provide the connection, the schema and how a batch runs (inline or in a thread)."""

    lock_clause = ""
    skip_locked_clause = ""
    # The driver's exception for a violated constraint (set by each subclass).
    integrity_errors: tuple[type[Exception], ...] = ()

    def __init__(self) -> None:
        self.holder = secrets.token_hex(8)
        # Waiter: the caller's future, or the callback of a deferred write (``_do_later``).
        self._pending: list[tuple[Op, asyncio.Future[Any] | Callable[[bool, Any], None]]] = []
        self._waiting = 0  # queued operations whose caller awaits a future
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None
        # The loop of the first operation; a store serves one event loop (like the KME that owns it).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- plumbing -------------------------------------------------------------------------------------------

    def _sql(self, text: str) -> str:
        return text

    def _cursor(self) -> Any:
        raise NotImplementedError

    def _begin(self, cur: Any) -> None:
        cur.execute("BEGIN")

    async def _execute(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        return self._run_batch(ops)

    def _run_batch(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """Run ``ops`` in one transaction: (ok, result or exception) each. Raises only if COMMIT fails."""
        cur = self._cursor()
        results = self._apply(cur, ops)
        self._commit(cur)
        return results

    def _apply(self, cur: Any, ops: list[Op]) -> list[tuple[bool, Any]]:
        """Open a transaction and run ``ops`` in it, leaving it open for :meth:`_commit`.

        The operations first run back to back. Only if one of them fails is the transaction rolled back and
        the batch run again with a savepoint around each operation, so that the failed one is undone alone:
        refusals are rare, and two statements per operation saved on every batch are not. Operations are
        functions of the database state, so running them again is sound.
        """
        try:
            self._begin(cur)
            results = self._run_ops(cur, ops)
            if results is None:
                self._rollback(cur)
                self._begin(cur)
                results = self._run_ops_isolated(cur, ops)
        except BaseException:
            self._rollback(cur)
            raise
        return results

    def _run_ops(self, cur: Any, ops: list[Op]) -> list[tuple[bool, Any]] | None:
        """Every operation in turn, or None as soon as one raises (the transaction then needs a rollback)."""
        total: Deltas = {}
        tx = Tx(_Cur(cur, self._sql), self.holder, self.lock_clause, self.skip_locked_clause, total)
        results: list[tuple[bool, Any]] = []
        for op in ops:
            try:
                results.append((True, op(tx)))
            except Exception:
                return None
        self._write_counters(cur, total)
        return results

    def _run_ops_isolated(self, cur: Any, ops: list[Op]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        total: Deltas = {}
        wrapped = _Cur(cur, self._sql)
        for op in ops:
            tx = Tx(wrapped, self.holder, self.lock_clause, self.skip_locked_clause, {}, total)
            cur.execute("SAVEPOINT op")
            try:
                result = op(tx)
            except Exception as exc:
                cur.execute("ROLLBACK TO SAVEPOINT op")
                cur.execute("RELEASE SAVEPOINT op")
                results.append((False, exc))
            else:
                cur.execute("RELEASE SAVEPOINT op")
                for key, delta in tx.deltas.items():
                    total[key] = total.get(key, 0) + delta
                results.append((True, result))
        self._write_counters(cur, total)
        return results

    def _write_counters(self, cur: Any, total: Deltas) -> None:
        # In a fixed order, so that concurrent PostgreSQL writers lock counter rows in the same order.
        for (link, name), delta in sorted(total.items()):
            if delta:
                cur.execute(
                    self._sql(
                        "INSERT INTO counters(link, name, value) VALUES (?, ?, ?) "
                        "ON CONFLICT (link, name) DO UPDATE SET value = counters.value + excluded.value"
                    ),
                    (link, name, delta),
                )

    def _commit(self, cur: Any) -> None:
        try:
            cur.execute("COMMIT")
        except BaseException:
            self._rollback(cur)
            raise

    @staticmethod
    def _rollback(cur: Any) -> None:
        try:
            cur.execute("ROLLBACK")
        except Exception:  # the connection may be gone, or the failed COMMIT already ended the transaction
            pass

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            # Looked up once, not per operation: get_running_loop() makes a getpid() system call each time.
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def _do(self, op: Callable[[Tx], T]) -> T:
        if self._closed:
            raise StoreUnavailable("key store is closed")
        loop = self._running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._pending.append((op, fut))
        self._waiting += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await fut

    def _do_later(self, op: Op, done: Callable[[bool, Any], None]) -> None:
        """Queue a write nobody waits for: it rides on the next commit, or commits alone after LAZY_DELAY.

        ``done(ok, result_or_exception)`` is called after the commit (or the failure)."""
        if self._closed:
            raise StoreUnavailable("key store is closed")
        loop = self._running_loop()
        self._pending.append((op, done))
        if (self._flusher is None or self._flusher.done()) and self._lazy_timer is None:
            self._lazy_timer = loop.call_later(LAZY_DELAY, self._flush_lazy)

    def _flush_lazy(self) -> None:
        self._lazy_timer = None
        if self._pending and (self._flusher is None or self._flusher.done()):
            self._flusher = self._running_loop().create_task(self._flush(force=True))

    async def _flush(self, *, force: bool = False) -> None:
        # Let the requests already read from sockets reach the store first: parsing, the handler and its
        # operation take a few loop turns, and a turn with nothing to do costs microseconds, far less than
        # the commit (an fsync) that their operations would otherwise each need.
        for _ in range(GATHER_TURNS):
            await asyncio.sleep(0)
        # Deferred writes alone do not start a commit (only their timer or a waiting caller does).
        while self._pending and (force or self._waiting):
            force = False
            batch = [
                (op, w)
                for op, w in self._pending[:MAX_BATCH]
                if not isinstance(w, asyncio.Future) or not w.done()
            ]
            del self._pending[:MAX_BATCH]
            self._waiting = sum(1 for _, w in self._pending if isinstance(w, asyncio.Future))
            if not batch:
                continue
            try:
                outcome: list[tuple[bool, Any]] = await self._execute([op for op, _ in batch])
            except Exception as exc:
                log.error("key store transaction failed", extra={"event": "store.failed", "error": repr(exc)})
                outcome = [(False, StoreUnavailable("key store failed"))] * len(batch)
            for (_, waiter), (ok, value) in zip(batch, outcome, strict=True):
                if not isinstance(waiter, asyncio.Future):
                    waiter(ok, value)
                elif waiter.done():
                    continue
                elif ok:
                    waiter.set_result(value)
                elif isinstance(value, StoreError):
                    waiter.set_exception(value)
                else:
                    log.error(
                        "key store operation failed", extra={"event": "store.failed", "error": repr(value)}
                    )
                    waiter.set_exception(StoreUnavailable("key store failed"))
            await asyncio.sleep(0)
        if self._pending and self._lazy_timer is None and self._loop is not None:
            self._lazy_timer = self._loop.call_later(LAZY_DELAY, self._flush_lazy)

    async def _drain(self) -> None:
        """Wait for the flusher, then commit whatever is still queued (deferred writes included)."""
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        while True:
            if self._flusher is not None and not self._flusher.done():
                await self._flusher
            if not self._pending:
                return
            self._flusher = self._running_loop().create_task(self._flush(force=True))

    # -- key folders ----------------------------------------------------------------------------------------

    async def import_file(
        self, link: int, name: str, data: bytes, sha256: str, block_size: int, *, local: bool
    ) -> int | None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")

        def op(tx: Tx) -> int | None:
            cur = tx.cur
            cur.execute(f"SELECT sha256 FROM ledger WHERE link = ? AND name = ?{tx.lock}", (link, name))
            row = cur.fetchone()
            if row is not None:
                if row[0] != sha256:
                    raise ImportRejected(f"{name} was imported before with other content")
                return None
            cur.execute(
                "SELECT block_size, next_seq, carry, last_file, imported_bytes, histogram FROM streams "
                f"WHERE link = ?{tx.lock}",
                (link,),
            )
            row = cur.fetchone()
            if row is None:
                bs, next_seq, carry, last, imported, hist = block_size, 0, b"", "", 0, _EMPTY_HIST
                cur.execute(
                    "INSERT INTO streams(link, block_size, next_seq, carry, last_file, imported_bytes, "
                    "histogram) VALUES (?, ?, 0, ?, '', 0, ?)",
                    (link, block_size, b"", _EMPTY_HIST),
                )
            else:
                bs, next_seq, carry, last, imported, hist = row
            if bs != block_size:
                raise ImportRejected(f"link {link} was started with {bs}-byte blocks, not {block_size}")
            if name <= last:
                raise ImportRejected(f"{name} sorts before the last imported file {last}")
            stream = bytes(carry) + data
            full = len(stream) // bs
            rows = [
                (link, next_seq + i, 0 if local else (next_seq + i) % 2, stream[i * bs : (i + 1) * bs])
                for i in range(full)
            ]
            if rows:
                cur.executemany("INSERT INTO blocks(link, seq, direction, data) VALUES (?, ?, ?, ?)", rows)
            counts = list(_HIST.unpack(bytes(hist)))
            for value, n in Counter(data).items():
                counts[value] += n
            cur.execute(
                "UPDATE streams SET next_seq = ?, carry = ?, last_file = ?, imported_bytes = ?, "
                "histogram = ? WHERE link = ?",
                (next_seq + full, stream[full * bs :], name, imported + len(data), _HIST.pack(*counts), link),
            )
            cur.execute(
                "INSERT INTO ledger(link, name, size, sha256, imported_at) VALUES (?, ?, ?, ?, ?)",
                (link, name, len(data), sha256, time.time()),
            )
            if local:
                tx.add(link, "free0", full)
            else:  # seqs next_seq .. next_seq+full-1 alternate directions
                odd = (full + (next_seq % 2)) // 2
                tx.add(link, "free1", odd)
                tx.add(link, "free0", full - odd)
            return len(data)

        return await self._do(op)

    # -- master side ----------------------------------------------------------------------------------------

    async def hold_blocks(self, link: int, direction: int, count: int) -> list[Block]:
        def op(tx: Tx) -> list[Block]:
            cur = tx.cur
            cur.execute(
                "SELECT seq, data FROM blocks "
                f"WHERE link = ? AND direction = ? AND held_by IS NULL ORDER BY seq LIMIT ?{tx.skip_locked}",
                (link, direction, count),
            )
            rows = cur.fetchall()
            if len(rows) < count:
                raise ShortStock(len(rows))
            now = time.time()
            seqs = [r[0] for r in rows]
            for chunk in _chunks(seqs):
                cur.execute(
                    "UPDATE blocks SET held_by = ?, held_at = ? "
                    f"WHERE link = ? AND seq IN ({_marks(len(chunk))})",
                    (tx.holder, now, link, *chunk),
                )
            tx.add(link, f"free{direction}", -count)
            return [Block(seq, bytes(data)) for seq, data in rows]

        return await self._do(op)

    async def release_blocks(self, link: int, seqs: Sequence[int]) -> int:
        def op(tx: Tx) -> int:
            released = 0
            for chunk in _chunks(list(seqs)):
                tx.cur.execute(
                    "UPDATE blocks SET held_by = NULL, held_at = NULL "
                    f"WHERE link = ? AND held_by = ? AND seq IN ({_marks(len(chunk))}) RETURNING direction",
                    (link, tx.holder, *chunk),
                )
                for (direction,) in tx.cur.fetchall():
                    tx.add(link, f"free{direction}", 1)
                    released += 1
            return released

        return await self._do(op)

    def _delete_held(self, tx: Tx, link: int, seqs: Sequence[int]) -> int:
        deleted = 0
        for chunk in _chunks(list(seqs)):
            tx.cur.execute(
                f"DELETE FROM blocks WHERE link = ? AND held_by = ? AND seq IN ({_marks(len(chunk))})",
                (link, tx.holder, *chunk),
            )
            deleted += tx.cur.rowcount
        return deleted

    async def consume_held(self, link: int, seqs: Sequence[int]) -> None:
        def op(tx: Tx) -> None:
            if self._delete_held(tx, link, seqs) != len(set(seqs)):
                raise LostHold(f"{len(seqs)} held blocks on link {link} are no longer held")

        await self._do(op)

    async def burn_held(self, link: int, seqs: Sequence[int]) -> int:
        def op(tx: Tx) -> int:
            burnt = self._delete_held(tx, link, seqs)
            tx.add(link, "burnt", burnt)
            return burnt

        return await self._do(op)

    # -- slave side and local pairs -------------------------------------------------------------------------

    def _insert_keys(
        self,
        tx: Tx,
        link: int,
        keys: Sequence[StoredKey],
        master_sae: int,
        slaves: Sequence[int],
        size_bits: int,
        expires_at: float,
    ) -> None:
        ids = [k.key_id for k in keys]
        if len(set(ids)) != len(ids):
            raise BlocksTaken("duplicate key IDs")
        slave_text = _join(slaves)
        rows = [
            (k.key_id, link, master_sae, slave_text, slave_text, size_bits, k.data, expires_at) for k in keys
        ]
        insert = (
            "INSERT INTO keys(key_id, link, master_sae, slaves, pending, size, data, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        # A key ID already in use violates the primary key: that is the check, no SELECT before.
        try:
            if len(rows) == 1:
                tx.cur.execute(insert, rows[0])
            else:
                tx.cur.executemany(insert, rows)
        except self.integrity_errors:
            raise BlocksTaken("a key ID is already in use") from None
        tx.add(link, "keys", len(keys))

    async def take_reserved(
        self,
        link: int,
        direction: int,
        keys: Sequence[NewKeySpec],
        master_sae: int,
        slaves: Sequence[int],
        size_bits: int,
        expires_at: float,
    ) -> None:
        def op(tx: Tx) -> None:
            wanted = [seq for k in keys for seq in k.blocks]
            if len(set(wanted)) != len(wanted):
                raise BlocksTaken("a block is named twice")
            data: dict[int, bytes] = {}
            for chunk in _chunks(wanted):
                tx.cur.execute(
                    f"DELETE FROM blocks WHERE link = ? AND direction = ? AND held_by IS NULL "
                    f"AND seq IN ({_marks(len(chunk))}) RETURNING seq, data",
                    (link, direction, *chunk),
                )
                data.update((seq, bytes(d)) for seq, d in tx.cur.fetchall())
            if len(data) != len(wanted):
                raise BlocksTaken(f"{len(wanted) - len(data)} blocks are not free on link {link}")
            tx.add(link, f"free{direction}", -len(wanted))
            nbytes = size_bits // 8
            built = [StoredKey(k.key_id, b"".join(data[s] for s in k.blocks)[:nbytes]) for k in keys]
            if any(len(k.data) != nbytes for k in built):
                raise BlocksTaken("blocks too short for the key size")
            self._insert_keys(tx, link, built, master_sae, slaves, size_bits, expires_at)

        await self._do(op)

    async def take_local(
        self,
        link: int,
        count: int,
        blocks_per_key: int,
        size_bits: int,
        make_id: Callable[[bytes], str],
        master_sae: int,
        slaves: Sequence[int],
        expires_at: float,
    ) -> list[StoredKey]:
        def op(tx: Tx) -> list[StoredKey]:
            need = count * blocks_per_key
            tx.cur.execute(
                "SELECT seq, data FROM blocks "
                f"WHERE link = ? AND direction = 0 AND held_by IS NULL ORDER BY seq LIMIT ?{tx.skip_locked}",
                (link, need),
            )
            rows = tx.cur.fetchall()
            if len(rows) < need:
                raise ShortStock(len(rows))
            seqs = [r[0] for r in rows]
            for chunk in _chunks(seqs):
                tx.cur.execute(
                    f"DELETE FROM blocks WHERE link = ? AND seq IN ({_marks(len(chunk))})", (link, *chunk)
                )
            tx.add(link, "free0", -need)
            nbytes = size_bits // 8
            keys = []
            for i in range(count):
                material = b"".join(bytes(d) for _, d in rows[i * blocks_per_key : (i + 1) * blocks_per_key])
                material = material[:nbytes]
                keys.append(StoredKey(make_id(material), material))
            self._insert_keys(tx, link, keys, master_sae, slaves, size_bits, expires_at)
            return keys

        return await self._do(op)

    async def collect(
        self, master_sae: int, slave_sae: int, key_ids: Sequence[str], *, unicast_only: bool = False
    ) -> list[StoredKey]:
        def op(tx: Tx) -> list[StoredKey]:
            found: dict[str, StoredKey] = {}
            missing = not_slave = multicast = 0
            for key_id in dict.fromkeys(key_ids):
                tx.cur.execute(
                    f"SELECT link, master_sae, slaves, pending, data FROM keys WHERE key_id = ?{tx.lock}",
                    (key_id,),
                )
                row = tx.cur.fetchone()
                if row is None or row[1] != master_sae:
                    missing += 1
                    continue
                link, _, slaves, pending, data = row
                holders = _ids(slaves)
                if slave_sae not in holders:
                    not_slave += 1
                    continue
                if unicast_only and len(holders) > 1:
                    multicast += 1
                    continue
                left = _ids(pending)
                if slave_sae not in left:
                    missing += 1
                    continue
                left.remove(slave_sae)
                if left:
                    tx.cur.execute("UPDATE keys SET pending = ? WHERE key_id = ?", (_join(left), key_id))
                else:
                    tx.cur.execute("DELETE FROM keys WHERE key_id = ?", (key_id,))
                    tx.add(link, "keys", -1)
                found[key_id] = StoredKey(key_id, bytes(data), tuple(holders))
            if not_slave:
                raise NotASlave(f"{not_slave} keys are not addressed to SAE {slave_sae}")
            if multicast:
                raise MulticastRefused(f"{multicast} keys have several slaves")
            if missing:
                raise KeysNotFound(f"{missing} keys not found")
            return [found[k] for k in key_ids]

        return await self._do(op)

    # -- housekeeping ---------------------------------------------------------------------------------------

    async def expire(self, now: float, limit: int = 10_000) -> list[tuple[int, str]]:
        def op(tx: Tx) -> list[tuple[int, str]]:
            tx.cur.execute(
                "DELETE FROM keys WHERE key_id IN "
                "(SELECT key_id FROM keys WHERE expires_at < ? ORDER BY expires_at LIMIT ?) "
                "RETURNING link, key_id",
                (now, limit),
            )
            gone = [(int(link), str(key_id)) for link, key_id in tx.cur.fetchall()]
            for link, _ in gone:
                tx.add(link, "keys", -1)
                tx.add(link, "expired", 1)
            return gone

        return await self._do(op)

    async def release_stale_holds(self, held_before: float, limit: int = 10_000) -> int:
        def op(tx: Tx) -> int:
            tx.cur.execute(
                "UPDATE blocks SET held_by = NULL, held_at = NULL WHERE (link, seq) IN "
                "(SELECT link, seq FROM blocks WHERE held_by IS NOT NULL AND held_at < ? LIMIT ?) "
                "RETURNING link, direction",
                (held_before, limit),
            )
            rows = tx.cur.fetchall()
            for link, direction in rows:
                tx.add(link, f"free{direction}", 1)
            return len(rows)

        return await self._do(op)

    async def free_blocks(self, link: int, direction: int) -> int:
        def op(tx: Tx) -> int:
            tx.cur.execute(
                "SELECT value FROM counters WHERE link = ? AND name = ?", (link, f"free{direction}")
            )
            row = tx.cur.fetchone()
            return tx.counter(link, f"free{direction}", int(row[0]) if row else 0)

        return await self._do(op)

    async def link_stats(self, link: int) -> LinkStats:
        def op(tx: Tx) -> LinkStats:
            tx.cur.execute("SELECT name, value FROM counters WHERE link = ?", (link,))
            counters = {name: int(value) for name, value in tx.cur.fetchall()}
            for name in ("free0", "free1", "keys", "burnt", "expired"):
                counters[name] = tx.counter(link, name, counters.get(name, 0))
            tx.cur.execute("SELECT imported_bytes, histogram FROM streams WHERE link = ?", (link,))
            row = tx.cur.fetchone()
            imported, hist = (int(row[0]), _HIST.unpack(bytes(row[1]))) if row else (0, (0,) * 256)
            return LinkStats(
                link=link,
                free_blocks={0: counters.get("free0", 0), 1: counters.get("free1", 0)},
                reserved_keys=counters.get("keys", 0),
                imported_bytes=imported,
                burnt_blocks=counters.get("burnt", 0),
                expired_keys=counters.get("expired", 0),
                histogram=tuple(hist),
            )

        return await self._do(op)


class _Cur:
    """A cursor wrapper that rewrites ``?`` placeholders to the driver's style (cached per statement)."""

    __slots__ = ("_cur", "_sql")

    def __init__(self, cur: Any, sql: Callable[[str], str]) -> None:
        self._cur = cur
        self._sql = sql

    def execute(self, text: str, params: Sequence[Any] = ()) -> None:
        self._cur.execute(self._sql(text), params)

    def executemany(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cur.executemany(self._sql(text), rows)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)
