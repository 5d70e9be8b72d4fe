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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qkdtls.kme.store.base import (
    DELIVERED,
    EXISTS,
    INCONSISTENT,
    MISMATCH,
    QUOTA,
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
    RelayDecision,
    RelayIntake,
    RelayKeys,
    RelayShares,
    ShortStock,
    StoredKey,
    StoreError,
    StoreUnavailable,
    Swept,
    UncollectedQuota,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
SCHEMA_VERSION = 3
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
    # Counter rows read in this batch. Only the batch's end writes counters, so a row read once holds
    # for the whole batch (and for savepoints rolled back within it).
    stored: Deltas = field(default_factory=dict)

    def add(self, link: int, name: str, delta: int) -> None:
        if delta:
            key = (link, name)
            self.deltas[key] = self.deltas.get(key, 0) + delta

    def counter(self, link: int, name: str, stored: int) -> int:
        """A counter's value as this operation sees it: the stored row plus the batch's changes so far."""
        key = (link, name)
        return stored + self.earlier.get(key, 0) + self.deltas.get(key, 0)

    def read_counter(self, link: int, name: str) -> int:
        """:meth:`counter`, reading the stored row at most once per batch."""
        key = (link, name)
        stored = self.stored.get(key)
        if stored is None:
            self.cur.execute("SELECT value FROM counters WHERE link = ? AND name = ?", key)
            row = self.cur.fetchone()
            stored = self.stored[key] = int(row[0]) if row else 0
        return self.counter(link, name, stored)


Op = Callable[[Tx], Any]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(seqs: Sequence[int]) -> list[Sequence[int]]:
    return [seqs[i : i + _IN_CHUNK] for i in range(0, len(seqs), _IN_CHUNK)]


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _join(ids: Sequence[int]) -> str:
    return ",".join(str(i) for i in ids)


def _windows(text: str) -> dict[int, float]:
    """``keys.collected``: ``sae@deadline,...``, the slaves that collected the key and until when (epoch
    seconds) each may collect it again."""
    out: dict[int, float] = {}
    for item in text.split(","):
        if item:
            sae, _, deadline = item.partition("@")
            out[int(sae)] = float(deadline)
    return out


def _join_windows(windows: dict[int, float]) -> str:
    return ",".join(f"{sae}@{deadline!r}" for sae, deadline in windows.items())


_UNCOLLECTED = "uncollected:"


def uncollected_counter(master_sae: int) -> str:
    """Counter name: keys of a master SAE stored on a link and not yet collected by every slave. Summed
    over a link's masters, it is the link's count of reserved keys."""
    return f"{_UNCOLLECTED}{master_sae}"


def _uncollected(tx: Tx, rows: Sequence[tuple[Any, Any, Any]], link: int | None = None) -> dict[int, int]:
    """Per master SAE: the uncollected counters among the stored ``rows`` (link, name, value), plus this
    batch's changes to uncollected counters (of ``link``, or of every link)."""
    counts = {(int(k), str(n)): int(v) for k, n, v in rows if str(n).startswith(_UNCOLLECTED)}
    for key in (*tx.earlier, *tx.deltas):
        if key[1].startswith(_UNCOLLECTED) and link in (None, key[0]):
            counts.setdefault(key, 0)
    out: dict[int, int] = {}
    for (on_link, name), value in counts.items():
        master = int(name[len(_UNCOLLECTED) :])
        out[master] = out.get(master, 0) + tx.counter(on_link, name, value)
    return out


# Schema 1 → 2, after each backend added the ``collected`` column: the count of uncollected keys is kept
# per master SAE instead of per link. In schema 1 every stored key was uncollected.
MIGRATE_COUNTERS_1_TO_2 = (
    "INSERT INTO counters(link, name, value) "
    "SELECT link, 'uncollected:' || CAST(master_sae AS TEXT), COUNT(*) FROM keys GROUP BY link, master_sae",
    "DELETE FROM counters WHERE name = 'keys'",
)


def migrate_2_to_3(shares_table: str) -> tuple[str, ...]:
    """Schema 2 → 3: the ``shares`` table of multi-path relays (its column types are the backend's)."""
    return (
        shares_table.replace("CREATE TABLE shares", "CREATE TABLE IF NOT EXISTS shares"),
        "CREATE INDEX IF NOT EXISTS shares_expiry ON shares (expires_at)",
        "UPDATE meta SET value = '3' WHERE name = 'schema_version'",
    )


class _Refused(Exception):
    """A relay delivery that changes nothing (rolled back to its savepoint); ``outcome`` says why."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class SqlKeyStore(KeyStore):
    """Subclasses provide the connection, the schema and how a batch runs (inline or in a thread)."""

    lock_clause = ""
    skip_locked_clause = ""
    # The driver's exception for a violated constraint (set by each subclass).
    integrity_errors: tuple[type[Exception], ...] = ()
    # Failures that say nothing about the operation (a deadlock, a serialization conflict): the whole
    # transaction is rolled back and the caller may run the batch again (PostgreSQL does, see postgres.py).
    retryable_errors: tuple[type[Exception], ...] = ()

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
            except self.retryable_errors:
                raise
            except Exception:
                return None
        self._write_counters(cur, total)
        return results

    def _run_ops_isolated(self, cur: Any, ops: list[Op]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        total: Deltas = {}
        stored: Deltas = {}
        wrapped = _Cur(cur, self._sql)
        for op in ops:
            tx = Tx(wrapped, self.holder, self.lock_clause, self.skip_locked_clause, {}, total, stored)
            cur.execute("SAVEPOINT op")
            try:
                result = op(tx)
            except self.retryable_errors:
                raise
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
        self,
        link: int,
        name: str,
        data: bytes,
        sha256: str,
        block_size: int,
        *,
        local: bool,
        offset: int = 0,
        total: int | None = None,
    ) -> int | None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        end = offset + len(data)
        if total is None:
            total = end
        if offset < 0 or end > total:
            raise ValueError("the part must lie within the file")

        def op(tx: Tx) -> int | None:
            cur = tx.cur
            cur.execute(f"SELECT size, sha256 FROM ledger WHERE link = ? AND name = ?{tx.lock}", (link, name))
            entry = cur.fetchone()
            if entry is not None:
                done, digest = entry
                if digest != sha256:
                    raise ImportRejected(f"{name} was imported before with other content")
                if end <= done:
                    return None  # this part committed before (a restart, or another process)
                if offset != done:
                    raise ImportRejected(f"{name}: part at byte {offset} does not follow byte {done}")
            elif offset != 0:
                raise ImportRejected(f"{name}: part at byte {offset} but nothing of the file was imported")
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
            if entry is None and name <= last:
                raise ImportRejected(f"{name} sorts before the last imported file {last}")
            if entry is not None and name != last:
                raise ImportRejected(f"{name}: another file was imported after its first part")
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
            if entry is None:
                cur.execute(
                    "INSERT INTO ledger(link, name, size, sha256, imported_at) VALUES (?, ?, ?, ?, ?)",
                    (link, name, end, sha256, time.time()),
                )
            else:
                cur.execute(
                    "UPDATE ledger SET size = ?, imported_at = ? WHERE link = ? AND name = ?",
                    (end, time.time(), link, name),
                )
            if local:
                tx.add(link, "free0", full)
            else:  # seqs next_seq .. next_seq+full-1 alternate directions
                odd = (full + (next_seq % 2)) // 2
                tx.add(link, "free1", odd)
                tx.add(link, "free0", full - odd)
            return len(data)

        return await self._do(op)

    async def import_progress(self, link: int, name: str) -> tuple[int, str] | None:
        def op(tx: Tx) -> tuple[int, str] | None:
            tx.cur.execute("SELECT size, sha256 FROM ledger WHERE link = ? AND name = ?", (link, name))
            row = tx.cur.fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

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

    def _check_uncollected(self, tx: Tx, link: int, master_sae: int, count: int, limit: int) -> None:
        """UncollectedQuota if ``count`` more keys would leave the master above ``limit`` (0: no cap).

        Exact within one process (the batch's own changes are counted); PostgreSQL processes sharing a
        database may each pass the check with their batch in flight, so the cap is exceeded by at most
        those batches."""
        if limit <= 0:
            return
        current = tx.read_counter(link, uncollected_counter(master_sae))
        if current + count > limit:
            raise UncollectedQuota(current, limit)

    def _insert_keys(
        self,
        tx: Tx,
        link: int,
        keys: Sequence[StoredKey],
        master_sae: int,
        slaves: Sequence[int],
        size_bits: int,
        expires_at: float,
        pending: Sequence[int] | None = None,
    ) -> None:
        ids = [k.key_id for k in keys]
        if len(set(ids)) != len(ids):
            raise BlocksTaken("duplicate key IDs")
        slave_text = _join(slaves)
        pending_text = slave_text if pending is None else _join(pending)
        rows = [
            (k.key_id, link, master_sae, slave_text, pending_text, size_bits, k.data, expires_at)
            for k in keys
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
        tx.add(link, uncollected_counter(master_sae), len(keys))

    async def take_reserved(
        self,
        link: int,
        direction: int,
        keys: Sequence[NewKeySpec],
        master_sae: int,
        slaves: Sequence[int],
        size_bits: int,
        expires_at: float,
        *,
        max_uncollected: int = 0,
    ) -> None:
        def op(tx: Tx) -> None:
            wanted = [seq for k in keys for seq in k.blocks]
            if len(set(wanted)) != len(wanted):
                raise BlocksTaken("a block is named twice")
            self._check_uncollected(tx, link, master_sae, len(keys), max_uncollected)
            data = self._take_named(tx, link, direction, wanted)
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
        *,
        max_uncollected: int = 0,
    ) -> list[StoredKey]:
        def op(tx: Tx) -> list[StoredKey]:
            self._check_uncollected(tx, link, master_sae, count, max_uncollected)
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
        self,
        master_sae: int,
        slave_sae: int,
        key_ids: Sequence[str],
        *,
        unicast_only: bool = False,
        recollect_window: float = 0.0,
    ) -> list[StoredKey]:
        def op(tx: Tx) -> list[StoredKey]:
            now = time.time()
            found: dict[str, StoredKey] = {}
            missing = not_slave = multicast = 0
            for key_id in dict.fromkeys(key_ids):
                tx.cur.execute(
                    "SELECT link, master_sae, slaves, pending, collected, data, expires_at FROM keys "
                    f"WHERE key_id = ?{tx.lock}",
                    (key_id,),
                )
                row = tx.cur.fetchone()
                if row is None or row[1] != master_sae:
                    missing += 1
                    continue
                link, _, slaves, pending, collected, data, expires_at = row
                holders = _ids(slaves)
                if slave_sae not in holders:
                    not_slave += 1
                    continue
                if unicast_only and len(holders) > 1:
                    multicast += 1
                    continue
                left = _ids(pending)
                again = slave_sae not in left
                if not again:
                    self._first_collection(
                        tx, key_id, link, master_sae, slave_sae, left, collected, expires_at, now,
                        recollect_window,
                    )  # fmt: skip
                elif _windows(collected).get(slave_sae, 0.0) <= now:
                    missing += 1  # collected before, and its re-collection window is over
                    continue
                found[key_id] = StoredKey(key_id, bytes(data), tuple(holders), again)
            if not_slave:
                raise NotASlave(f"{not_slave} keys are not addressed to SAE {slave_sae}")
            if multicast:
                raise MulticastRefused(f"{multicast} keys have several slaves")
            if missing:
                raise KeysNotFound(f"{missing} keys not found")
            return [found[k] for k in key_ids]

        return await self._do(op)

    @staticmethod
    def _first_collection(
        tx: Tx,
        key_id: str,
        link: int,
        master_sae: int,
        slave_sae: int,
        left: list[int],
        collected: str,
        expires_at: float,
        now: float,
        window: float,
    ) -> None:
        left.remove(slave_sae)
        windows = _windows(collected)
        if window > 0:
            windows[slave_sae] = now + window
        if left:  # other slaves still to come: the reservation TTL still runs, and outlives this window
            tx.cur.execute(
                "UPDATE keys SET pending = ?, collected = ?, expires_at = ? WHERE key_id = ?",
                (_join(left), _join_windows(windows), max(expires_at, windows.get(slave_sae, 0.0)), key_id),
            )
            return
        tx.add(link, uncollected_counter(master_sae), -1)
        last = max(windows.values(), default=0.0)
        if last > now:  # kept until the last window ends (then erased by expire())
            tx.cur.execute(
                "UPDATE keys SET pending = '', collected = ?, expires_at = ? WHERE key_id = ?",
                (_join_windows(windows), last, key_id),
            )
            tx.add(link, "window", 1)
        else:
            tx.cur.execute("DELETE FROM keys WHERE key_id = ?", (key_id,))

    # -- relay (docs/design.md, network relay) ---------------------------------------------------------------

    async def read_named(self, link: int, direction: int, seqs: Sequence[int]) -> dict[int, bytes]:
        def op(tx: Tx) -> dict[int, bytes]:
            return self._select_named(tx.cur, link, direction, seqs)

        return await self._do(op)

    @staticmethod
    def _select_named(cur: Any, link: int, direction: int, seqs: Sequence[int]) -> dict[int, bytes]:
        wanted = list(dict.fromkeys(seqs))
        data: dict[int, bytes] = {}
        for chunk in _chunks(wanted):
            cur.execute(
                f"SELECT seq, data FROM blocks WHERE link = ? AND direction = ? AND held_by IS NULL "
                f"AND seq IN ({_marks(len(chunk))})",
                (link, direction, *chunk),
            )
            data.update((seq, bytes(d)) for seq, d in cur.fetchall())
        if len(data) != len(wanted) or len(wanted) != len(seqs):
            raise BlocksTaken(f"{len(wanted) - len(data)} named blocks are not free on link {link}")
        return data

    def _take_named(self, tx: Tx, link: int, direction: int, seqs: Sequence[int]) -> dict[int, bytes]:
        """Delete the named free blocks of a direction (the peer's: a reservation or a relay message) and
        return their bytes; BlocksTaken unless every one was free and named once."""
        wanted = list(dict.fromkeys(seqs))
        data: dict[int, bytes] = {}
        for chunk in _chunks(wanted):
            tx.cur.execute(
                f"DELETE FROM blocks WHERE link = ? AND direction = ? AND held_by IS NULL "
                f"AND seq IN ({_marks(len(chunk))}) RETURNING seq, data",
                (link, direction, *chunk),
            )
            data.update((seq, bytes(d)) for seq, d in tx.cur.fetchall())
        if len(data) != len(wanted) or len(wanted) != len(seqs):
            raise BlocksTaken(f"{len(wanted) - len(data)} named blocks are not free on link {link}")
        tx.add(link, f"free{direction}", -len(data))
        return data

    def _spend_rows(self, tx: Tx, link: int, seqs: Sequence[int]) -> int:
        """Delete blocks this instance holds; how many were."""
        return self._delete_held(tx, link, seqs)

    def _spend(self, tx: Tx, spend: Mapping[int, Sequence[int]]) -> None:
        for link, seqs in spend.items():
            unique = list(dict.fromkeys(seqs))
            if self._spend_rows(tx, link, unique) != len(unique):
                raise LostHold(f"{len(unique)} held blocks on link {link} are no longer held")

    def _spent(self, spend: Mapping[int, Sequence[int]]) -> None:
        """Called after held blocks were deleted (the SQLite store drops their holds in memory)."""

    async def spend_held(self, spend: Mapping[int, Sequence[int]]) -> None:
        def op(tx: Tx) -> None:
            self._spend(tx, spend)

        await self._do(op)
        self._spent(spend)

    async def relay_accept(
        self, intake: RelayIntake, decide: Callable[[dict[int, bytes]], RelayDecision | None]
    ) -> tuple[RelayDecision | None, list[str]]:
        def op(tx: Tx) -> tuple[RelayDecision | None, list[str]]:
            data = self._take_named(tx, intake.link, intake.direction, intake.seqs)
            decision = decide(data)
            if decision is None:  # not authentic: what it named is burnt, nothing else happens
                tx.add(intake.link, "burnt", len(data))
                return None, []
            self._spend(tx, intake.spend)
            return decision, [self._deliver(tx, intake.link, d) for d in decision.deliveries]

        decision, outcomes = await self._do(op)
        if decision is not None:
            self._spent(intake.spend)
        return decision, outcomes

    def _deliver(self, tx: Tx, link: int, delivery: RelayKeys | RelayShares) -> str:
        """One delivery, all or nothing (a savepoint; the batch's counter changes are restored with it)."""
        saved = dict(tx.deltas)
        tx.cur.execute("SAVEPOINT relay_delivery")
        try:
            if isinstance(delivery, RelayKeys):
                self._check_uncollected(
                    tx, link, delivery.master_sae, len(delivery.keys), delivery.max_uncollected
                )
                self._insert_keys(
                    tx, link, delivery.keys, delivery.master_sae, delivery.slaves, delivery.size_bits,
                    delivery.expires_at, delivery.pending,
                )  # fmt: skip
            else:
                self._deliver_shares(tx, link, delivery)
        except (_Refused, BlocksTaken, UncollectedQuota) as exc:
            tx.cur.execute("ROLLBACK TO SAVEPOINT relay_delivery")
            tx.cur.execute("RELEASE SAVEPOINT relay_delivery")
            tx.deltas.clear()
            tx.deltas.update(saved)
            if isinstance(exc, _Refused):
                if exc.outcome == INCONSISTENT and isinstance(delivery, RelayShares):
                    self._erase_relayed(tx, delivery.key_ids)
                return exc.outcome
            return QUOTA if isinstance(exc, UncollectedQuota) else EXISTS
        tx.cur.execute("RELEASE SAVEPOINT relay_delivery")
        return DELIVERED

    def _deliver_shares(self, tx: Tx, link: int, d: RelayShares) -> None:
        meta = (d.master_sae, _join(d.slaves), _join(d.pending), d.size_bits, d.scheme, d.k, d.n)
        complete: list[StoredKey] = []
        inconsistent = False
        for key_id, value in zip(d.key_ids, d.values, strict=True):
            tx.cur.execute(
                "SELECT x, master_sae, slaves, pending, size, scheme, k, n, data FROM shares "
                f"WHERE key_id = ? ORDER BY x{tx.lock}",
                (key_id,),
            )
            rows = tx.cur.fetchall()
            if any((int(r[1]), r[2], r[3], int(r[4]), r[5], int(r[6]), int(r[7])) != meta for r in rows):
                raise _Refused(MISMATCH)
            if any(int(r[0]) == d.x for r in rows):
                raise _Refused(EXISTS)
            shares = sorted([(int(r[0]), bytes(r[8])) for r in rows] + [(d.x, value)])
            if len(shares) > d.k and not d.consistent(shares):
                inconsistent = True
                continue
            if len(shares) == d.k:
                complete.append(StoredKey(key_id, d.combine(shares)))
            if len(shares) == d.n:  # every share arrived and agrees: none is needed any more
                tx.cur.execute("DELETE FROM shares WHERE key_id = ?", (key_id,))
            else:
                tx.cur.execute(
                    "INSERT INTO shares(key_id, x, link, master_sae, slaves, pending, size, scheme, k, n, "
                    "data, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key_id, d.x, link, *meta, value, d.expires_at),
                )
        if inconsistent:
            raise _Refused(INCONSISTENT)
        if complete:
            self._check_uncollected(tx, link, d.master_sae, len(complete), d.max_uncollected)
            self._insert_keys(
                tx, link, complete, d.master_sae, d.slaves, d.size_bits, d.expires_at, d.pending
            )

    def _erase_relayed(self, tx: Tx, key_ids: Sequence[str]) -> None:
        """Erase keys whose shares disagree, and their shares: a corrupted key is never delivered."""
        for key_id in key_ids:
            tx.cur.execute("DELETE FROM keys WHERE key_id = ? RETURNING link, master_sae, pending", (key_id,))
            for link, master_sae, pending in tx.cur.fetchall():
                if pending:
                    tx.add(int(link), uncollected_counter(int(master_sae)), -1)
                else:
                    tx.add(int(link), "window", -1)
            tx.cur.execute("DELETE FROM shares WHERE key_id = ?", (key_id,))

    # -- housekeeping ---------------------------------------------------------------------------------------

    async def expire(self, now: float, limit: int = 1000) -> Swept:
        def op(tx: Tx) -> Swept:
            tx.cur.execute(
                "DELETE FROM keys WHERE key_id IN "
                "(SELECT key_id FROM keys WHERE expires_at < ? ORDER BY expires_at LIMIT ?) "
                "RETURNING link, key_id, master_sae, pending",
                (now, limit),
            )
            swept = Swept([], [])
            for link, key_id, master_sae, pending in tx.cur.fetchall():
                link = int(link)
                if pending:
                    tx.add(link, uncollected_counter(int(master_sae)), -1)
                    tx.add(link, "expired", 1)
                    swept.expired.append((link, str(key_id)))
                else:
                    tx.add(link, "window", -1)
                    swept.erased.append((link, str(key_id)))
            # Shares of relayed keys that never got all their siblings (a path failed): nobody waits for them.
            tx.cur.execute(
                "DELETE FROM shares WHERE (key_id, x) IN "
                "(SELECT key_id, x FROM shares WHERE expires_at < ? LIMIT ?)",
                (now, limit),
            )
            return swept

        return await self._do(op)

    async def uncollected_by_master(self) -> dict[int, int]:
        def op(tx: Tx) -> dict[int, int]:
            tx.cur.execute("SELECT link, name, value FROM counters WHERE name LIKE ?", ("uncollected:%",))
            return {m: n for m, n in _uncollected(tx, tx.cur.fetchall()).items() if n}

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
            for name in ("free0", "free1", "burnt", "expired", "window"):
                counters[name] = tx.counter(link, name, counters.get(name, 0))
            reserved = sum(_uncollected(tx, [(link, n, v) for n, v in counters.items()], link).values())
            tx.cur.execute("SELECT imported_bytes, histogram FROM streams WHERE link = ?", (link,))
            row = tx.cur.fetchone()
            imported, hist = (int(row[0]), _HIST.unpack(bytes(row[1]))) if row else (0, (0,) * 256)
            return LinkStats(
                link=link,
                free_blocks={0: counters.get("free0", 0), 1: counters.get("free1", 0)},
                reserved_keys=reserved,
                imported_bytes=imported,
                burnt_blocks=counters.get("burnt", 0),
                expired_keys=counters.get("expired", 0),
                histogram=tuple(hist),
                recollectable_keys=counters.get("window", 0),
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
