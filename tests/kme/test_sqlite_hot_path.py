"""The SQLite store's hot path: holds in memory with a read-ahead of free blocks, no commit to hold."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest

from qkdtls.kme.store import LostHold, ShortStock, StoreUnavailable
from qkdtls.kme.store import sqlite as sqlite_store
from qkdtls.kme.store.holds import VolatileHolds
from qkdtls.kme.store.sql import LAZY_DELAY
from qkdtls.kme.store.sqlite import SqliteKeyStore

LINK = 2


async def feed(store: SqliteKeyStore, data: bytes, name: str) -> None:
    await store.import_file(LINK, name, data, hashlib.sha256(data).hexdigest(), 32, local=False)


@pytest.fixture
async def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SqliteKeyStore:
    monkeypatch.setattr(sqlite_store, "READ_AHEAD", 4)  # refills happen after a few holds
    s = SqliteKeyStore(str(tmp_path / "kme.sqlite3"))
    yield s  # type: ignore[misc]
    await s.close()


async def test_holds_follow_seq_order_across_refills_and_new_imports(store: SqliteKeyStore) -> None:
    stream = os.urandom(32 * 20)
    await feed(store, stream, "1.key")  # direction 0: seqs 0, 2, ..., 18
    first = await store.hold_blocks(LINK, 0, 3)
    second = await store.hold_blocks(LINK, 0, 6)  # beyond what was read ahead
    await feed(store, os.urandom(32 * 4), "2.key")  # seqs 20..23 arrive above the frontier
    third = await store.hold_blocks(LINK, 0, 3)
    assert [b.seq for b in first + second + third] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    assert all(b.data == stream[b.seq * 32 : (b.seq + 1) * 32] for b in first + second)
    with pytest.raises(ShortStock):
        await store.hold_blocks(LINK, 0, 1)


async def test_released_blocks_are_handed_out_first_again(store: SqliteKeyStore) -> None:
    await feed(store, os.urandom(32 * 20), "1.key")
    a = await store.hold_blocks(LINK, 1, 2)
    b = await store.hold_blocks(LINK, 1, 2)
    assert await store.release_blocks(LINK, [x.seq for x in a]) == 2
    assert await store.release_blocks(LINK, [x.seq for x in a]) == 0  # no longer held
    assert [x.seq for x in await store.hold_blocks(LINK, 1, 3)] == [1, 3, 9]
    await store.consume_held(LINK, [x.seq for x in b])
    assert await store.release_blocks(LINK, [x.seq for x in b]) == 0  # consumed: gone for good
    with pytest.raises(LostHold):
        await store.consume_held(LINK, [x.seq for x in b])
    assert await store.free_blocks(LINK, 1) == 10 - 2 - 3


async def test_concurrent_holds_over_refills_are_disjoint(store: SqliteKeyStore) -> None:
    await feed(store, os.urandom(32 * 200), "1.key")
    results = await asyncio.gather(
        *(store.hold_blocks(LINK, 0, 3) for _ in range(40)), return_exceptions=True
    )
    got = sorted(b.seq for r in results if isinstance(r, list) for b in r)
    assert got == list(range(0, 198, 2))  # 33 holds of 3 out of 100 blocks, the oldest ones
    assert sum(isinstance(r, ShortStock) for r in results) == 7


async def test_holds_are_not_written_and_vanish_with_the_process(tmp_path: Path) -> None:
    path = str(tmp_path / "kme.sqlite3")
    first = SqliteKeyStore(path)
    await feed(first, os.urandom(32 * 8), "1.key")
    held = await first.hold_blocks(LINK, 0, 3)
    await first.consume_held(LINK, [held[0].seq])
    await first.close()  # blocks 2 and 4 were held: a process ending forgets them
    second = SqliteKeyStore(path)
    try:
        assert [b.seq for b in await second.hold_blocks(LINK, 0, 3)] == [2, 4, 6]
        assert (await second.link_stats(LINK)).free_blocks == {0: 0, 1: 4}
    finally:
        await second.close()


async def test_holding_and_releasing_run_no_transaction(
    store: SqliteKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await feed(store, os.urandom(32 * 16), "1.key")  # 8 blocks per direction
    await store.hold_blocks(LINK, 0, 1)
    extra = await store.hold_blocks(LINK, 0, 1)
    batches: list[int] = []
    real = store._run_batch

    def counting(ops):  # type: ignore[no-untyped-def]
        # Reading blocks ahead is a read-only transaction (no fsync): not counted.
        if not all("_read_ahead" in op.__qualname__ for op in ops):
            batches.append(len(ops))
        return real(ops)

    monkeypatch.setattr(store, "_run_batch", counting)
    held = await store.hold_blocks(LINK, 0, 2)
    assert await store.release_blocks(LINK, [b.seq for b in held]) == 2
    held = await store.hold_blocks(LINK, 0, 3)
    assert batches == []  # no transaction, so no fsync, for volatile holds
    await store.consume_held(LINK, [b.seq for b in held])
    assert batches == []  # the deletion waits for a commit to ride on...
    assert await store.free_blocks(LINK, 0) == 8 - 1 - 3 - 1  # ...yet the blocks no longer count as free
    assert batches == [2]  # the status read took the deletion along
    await store.consume_held(LINK, [extra[0].seq])
    await asyncio.sleep(LAZY_DELAY * 3)
    assert batches == [2, 1]  # alone, it commits after LAZY_DELAY


async def test_deferred_deletions_commit_before_close(tmp_path: Path) -> None:
    path = str(tmp_path / "kme.sqlite3")
    first = SqliteKeyStore(path)
    await feed(first, os.urandom(32 * 8), "1.key")
    held = await first.hold_blocks(LINK, 0, 4)
    await first.consume_held(LINK, [b.seq for b in held])
    await first.close()  # at once: the close commits the queued deletion
    second = SqliteKeyStore(path)
    try:
        assert (await second.link_stats(LINK)).free_blocks == {0: 0, 1: 4}
        with pytest.raises(ShortStock):
            await second.hold_blocks(LINK, 0, 1)
    finally:
        await second.close()


async def test_closed_store_refuses_holds_and_consumes(store: SqliteKeyStore) -> None:
    await feed(store, os.urandom(32 * 8), "1.key")
    held = await store.hold_blocks(LINK, 0, 1)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.hold_blocks(LINK, 0, 1)
    with pytest.raises(StoreUnavailable):
        await store.consume_held(LINK, [held[0].seq])


def test_volatile_holds_release_only_stale_ones() -> None:
    from qkdtls.kme.store.base import Block

    holds = VolatileHolds()
    holds.add_read(LINK, 0, [Block(0, b"a"), Block(2, b"b"), Block(4, b"c")])
    holds.add_read(LINK, 0, [Block(2, b"b")])  # read twice: ignored
    assert holds.available(LINK, 0) == 3 and holds.frontier(LINK, 0) == 4
    old = holds.hold(LINK, 0, 1)
    assert old is not None and holds.hold(LINK, 0, 3) is None
    cutoff = time.time() + 1
    assert holds.release_older_than(cutoff, limit=10) == 1
    assert holds.held_count(LINK, 0) == 0 and holds.available(LINK, 0) == 3


def test_client_certificate_is_read_once_per_connection(tmp_path: Path) -> None:
    import ssl
    from types import SimpleNamespace

    from qkdtls.kme import auth
    from qkdtls.pki import create_ca, issue_client_cert

    class Connection:  # stands for the SSL object of one kept-alive connection
        def __init__(self, der: bytes | None) -> None:
            self.der, self.reads = der, 0

        def getpeercert(self, binary_form: bool) -> bytes | None:
            self.reads += 1
            return self.der

    def request(conn: Connection) -> object:
        transport = SimpleNamespace(get_extra_info=lambda name: conn if name == "ssl_object" else None)
        return SimpleNamespace(transport=transport)

    ca = create_ca(tmp_path, "test CA")
    issued = issue_client_cert(ca.cert, ca.key, tmp_path, "SAE 1001", serial=1001)
    der = ssl.PEM_cert_to_DER_cert(issued.cert.read_text())
    with_cert, without = Connection(der), Connection(None)
    first = auth.peer_certificate(request(with_cert))  # type: ignore[arg-type]
    assert first is not None and first.serial == 1001
    assert auth.peer_certificate(request(with_cert)) is first  # type: ignore[arg-type]
    assert auth.peer_certificate(request(without)) is None  # type: ignore[arg-type]
    assert auth.peer_certificate(request(without)) is None  # type: ignore[arg-type]
    assert with_cert.reads == 1 and without.reads == 1
    ctx = auth.server_context(issued.cert, issued.key, [ca.cert], require_client_cert=True)
    assert ctx.options & ssl.OP_NO_RENEGOTIATION  # the cached identity of a connection cannot change


async def test_free_blocks_are_read_along_the_primary_key(store: SqliteKeyStore) -> None:
    await feed(store, os.urandom(32 * 64), "1.key")
    conn = store._conn
    assert not conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'blocks' "
        "AND name NOT LIKE 'sqlite_autoindex%'"
    ).fetchall()
    for sql in (
        "SELECT seq, data FROM blocks WHERE link = 2 AND direction = 1 AND held_by IS NULL AND seq > 10 "
        "ORDER BY seq LIMIT 4",
        "SELECT seq, data FROM blocks WHERE link = 2 AND direction = 0 AND held_by IS NULL "
        "ORDER BY seq LIMIT 4",
    ):
        plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "USING PRIMARY KEY" in plan and "TEMP B-TREE" not in plan, plan


async def test_indexes_of_earlier_releases_are_dropped(tmp_path: Path) -> None:
    path = str(tmp_path / "kme.sqlite3")
    first = SqliteKeyStore(path)
    first._conn.execute("CREATE INDEX blocks_free ON blocks (link, direction, seq) WHERE held_by IS NULL")
    await first.close()
    second = SqliteKeyStore(path)
    try:
        names = [r[0] for r in second._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")]
        assert "blocks_free" not in names
    finally:
        await second.close()
