"""KeyStore behaviour on real SQLite files and a real PostgreSQL server (same tests for both)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qkdtls.kme.keyid import random_key_id
from qkdtls.kme.store import (
    BlocksTaken,
    ImportRejected,
    KeysNotFound,
    KeyStore,
    LostHold,
    MulticastRefused,
    NewKeySpec,
    NotASlave,
    ShortStock,
    open_store,
)

LINK, LOCAL = 2, 1


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'kme.sqlite3'}"
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[KeyStore]:
    s = open_store(store_url)
    try:
        yield s
    finally:
        await s.close()


async def feed(
    store: KeyStore, data: bytes, name: str = "000001.key", link: int = LINK, bs: int = 32
) -> int | None:
    return await store.import_file(
        link, name, data, hashlib.sha256(data).hexdigest(), bs, local=link == LOCAL
    )


async def test_import_cuts_blocks_carries_partial_and_splits_directions(store: KeyStore) -> None:
    stream = os.urandom(32 * 5 + 7 + 32 * 3)
    assert await feed(store, stream[:100], "a.key") == 100  # 3 blocks + 4 bytes carried
    assert await feed(store, stream[100:], "b.key") == len(stream) - 100
    stats = await store.link_stats(LINK)
    assert stats.imported_bytes == len(stream)
    assert stats.free_blocks == {0: 4, 1: 4}  # 8 full blocks, 7 bytes still carried
    held0 = await store.hold_blocks(LINK, 0, 4)
    held1 = await store.hold_blocks(LINK, 1, 4)
    assert [b.seq for b in held0] == [0, 2, 4, 6] and [b.seq for b in held1] == [1, 3, 5, 7]
    for b in held0 + held1:
        assert b.data == stream[b.seq * 32 : (b.seq + 1) * 32]
    assert sum(stats.histogram) == len(stream)


async def test_ledger_refuses_reimport_reuse_and_disorder(store: KeyStore) -> None:
    assert await feed(store, b"x" * 64, "0002.key") == 64
    assert await feed(store, b"x" * 64, "0002.key") is None  # same content: already imported
    with pytest.raises(ImportRejected):
        await feed(store, b"y" * 64, "0002.key")
    with pytest.raises(ImportRejected):
        await feed(store, b"z" * 64, "0001.key")  # sorts before the last import
    with pytest.raises(ImportRejected):
        await feed(store, b"z" * 64, "0003.key", bs=16)
    assert (await store.link_stats(LINK)).free_blocks == {0: 1, 1: 1}


async def test_local_link_uses_every_block(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 4), link=LOCAL)
    assert (await store.link_stats(LOCAL)).free_blocks == {0: 4, 1: 0}


async def test_hold_release_consume_burn(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 8))
    with pytest.raises(ShortStock):
        await store.hold_blocks(LINK, 0, 5)
    held = await store.hold_blocks(LINK, 0, 2)
    assert await store.free_blocks(LINK, 0) == 2
    assert await store.release_blocks(LINK, [b.seq for b in held]) == 2
    assert await store.free_blocks(LINK, 0) == 4
    held = await store.hold_blocks(LINK, 0, 2)
    await store.consume_held(LINK, [b.seq for b in held])
    with pytest.raises(LostHold):
        await store.consume_held(LINK, [b.seq for b in held])
    held = await store.hold_blocks(LINK, 0, 2)
    assert await store.burn_held(LINK, [b.seq for b in held]) == 2
    stats = await store.link_stats(LINK)
    assert stats.free_blocks == {0: 0, 1: 4} and stats.burnt_blocks == 2


async def test_stale_hold_is_released_and_then_lost(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 4))
    held = await store.hold_blocks(LINK, 1, 2)
    assert await store.release_stale_holds(time.time() - 60) == 0
    assert await store.release_stale_holds(time.time() + 1) == 2
    with pytest.raises(LostHold):
        await store.consume_held(LINK, [b.seq for b in held])
    assert await store.free_blocks(LINK, 1) == 2


async def test_take_reserved_then_collect_once(store: KeyStore) -> None:
    stream = os.urandom(32 * 8)
    await feed(store, stream)
    kid = random_key_id()
    await store.take_reserved(LINK, 1, [NewKeySpec(kid, (3, 1))], 10, [20], 256 + 128, time.time() + 60)
    with pytest.raises(BlocksTaken):  # already consumed: nothing changes
        await store.take_reserved(
            LINK, 1, [NewKeySpec(random_key_id(), (5, 3))], 10, [20], 512, time.time() + 60
        )
    with pytest.raises(BlocksTaken):  # direction 0 block named as direction 1
        await store.take_reserved(
            LINK, 1, [NewKeySpec(random_key_id(), (2,))], 10, [20], 256, time.time() + 60
        )
    with pytest.raises(BlocksTaken):  # key ID reuse
        await store.take_reserved(LINK, 1, [NewKeySpec(kid, (5,))], 10, [20], 256, time.time() + 60)
    with pytest.raises(BlocksTaken):  # key ID reuse by the second of two keys: the first is undone too
        two = [NewKeySpec(random_key_id(), (5,)), NewKeySpec(kid, (7,))]
        await store.take_reserved(LINK, 1, two, 10, [20], 256, time.time() + 60)
    stats = await store.link_stats(LINK)
    assert stats.free_blocks == {0: 4, 1: 2} and stats.reserved_keys == 1
    with pytest.raises(NotASlave):
        await store.collect(10, 21, [kid])
    with pytest.raises(KeysNotFound):
        await store.collect(11, 20, [kid])  # other master
    with pytest.raises(KeysNotFound):  # all or nothing
        await store.collect(10, 20, [kid, random_key_id()])
    [key] = await store.collect(10, 20, [kid])
    assert key.data == stream[96:128] + stream[32:48]
    with pytest.raises(KeysNotFound):
        await store.collect(10, 20, [kid])
    assert (await store.link_stats(LINK)).reserved_keys == 0


async def test_local_multicast_key_erased_after_last_slave(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 4), link=LOCAL)
    keys = await store.take_local(LOCAL, 2, 2, 512, random_key_id, 7, [8, 9], time.time() + 60)
    assert len(keys) == 2 and all(len(k.data) == 64 for k in keys)
    with pytest.raises(ShortStock):
        await store.take_local(LOCAL, 1, 1, 256, random_key_id, 7, [8], time.time() + 60)
    ids = [k.key_id for k in keys]
    with pytest.raises(MulticastRefused):  # a slave that takes only unicast keys: nothing changes
        await store.collect(7, 8, ids, unicast_only=True)
    got = await store.collect(7, 8, ids)
    assert [k.data for k in got] == [k.data for k in keys] and [k.slaves for k in got] == [(8, 9)] * 2
    with pytest.raises(KeysNotFound):
        await store.collect(7, 8, ids)
    assert [k.data for k in await store.collect(7, 9, ids[::-1])] == [k.data for k in keys[::-1]]
    assert (await store.link_stats(LOCAL)).reserved_keys == 0


async def test_expiry_deletes_only_due_keys(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 4), link=LOCAL)
    [old] = await store.take_local(LOCAL, 1, 1, 256, random_key_id, 7, [8], time.time() - 1)
    [new] = await store.take_local(LOCAL, 1, 1, 256, random_key_id, 7, [8], time.time() + 60)
    assert await store.expire(time.time()) == [(LOCAL, old.key_id)]
    with pytest.raises(KeysNotFound):
        await store.collect(7, 8, [old.key_id])
    assert (await store.collect(7, 8, [new.key_id]))[0].data == new.data
    stats = await store.link_stats(LOCAL)
    assert stats.expired_keys == 1 and stats.reserved_keys == 0


async def test_concurrent_holds_are_disjoint(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 400))
    results = await asyncio.gather(
        *(store.hold_blocks(LINK, 0, 3) for _ in range(70)), return_exceptions=True
    )
    got = [b.seq for r in results if isinstance(r, list) for b in r]
    assert len(got) == len(set(got)) == 198  # 66 holds of 3 out of 200 blocks
    assert sum(isinstance(r, ShortStock) for r in results) == 4
    assert await store.free_blocks(LINK, 0) == 2


async def test_state_survives_reopen(store_url: str) -> None:
    stream = os.urandom(32 * 6 + 5)
    first = open_store(store_url)
    await feed(first, stream[:40], "1.key")
    await feed(first, stream[40:], "2.key")
    await first.take_reserved(
        LINK, 0, [NewKeySpec(kid := random_key_id(), (0,))], 10, [20], 256, time.time() + 60
    )
    await first.hold_blocks(LINK, 1, 2)  # a hold of a process that then dies
    await first.close()
    second = open_store(store_url)
    try:
        assert await feed(second, stream[40:], "2.key") is None
        assert (await second.collect(10, 20, [kid]))[0].data == stream[:32]
        if store_url.startswith("sqlite"):  # one owner process: orphan holds are freed at open
            assert await second.free_blocks(LINK, 1) == 3
        else:  # shared database: only stale holds are freed
            assert await second.free_blocks(LINK, 1) == 1
            assert await second.release_stale_holds(time.time() + 1) == 2
        stats = await second.link_stats(LINK)
        assert stats.imported_bytes == len(stream) and stats.free_blocks == {0: 2, 1: 3}
    finally:
        await second.close()


async def test_store_refuses_work_after_close(store_url: str) -> None:
    s = open_store(store_url)
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(Exception, match="closed"):
        await s.free_blocks(LINK, 0)


def test_unknown_url_scheme() -> None:
    with pytest.raises(ValueError):
        open_store("mysql://localhost/kme")


@pytest.mark.postgres
async def test_two_postgres_instances_never_share_a_block(postgres_dsn: str) -> None:
    a, b = open_store(postgres_dsn), open_store(postgres_dsn)
    try:
        await feed(a, os.urandom(32 * 600))
        got = await asyncio.gather(*(s.hold_blocks(LINK, 0, 5) for _ in range(30) for s in (a, b)))
        seqs = [blk.seq for r in got for blk in r]
        assert len(seqs) == len(set(seqs)) == 300
        assert await a.free_blocks(LINK, 0) == 0
    finally:
        await a.close()
        await b.close()


async def test_sqlite_file_has_one_owner(tmp_path: Path) -> None:
    from qkdtls.kme.store import StoreUnavailable
    from qkdtls.kme.store.sqlite import SqliteKeyStore

    path = str(tmp_path / "owned.sqlite3")
    owner = SqliteKeyStore(path)
    try:
        await owner.free_blocks(LINK, 0)
        with pytest.raises(StoreUnavailable):
            SqliteKeyStore(path, busy_timeout_ms=50)
    finally:
        await owner.close()
    await SqliteKeyStore(path).close()  # free again once the owner closed


@pytest.mark.postgres
async def test_postgres_picks_free_blocks_through_the_partial_index(postgres_dsn: str) -> None:
    import psycopg

    s = open_store(postgres_dsn)
    try:
        await feed(s, os.urandom(32 * 20_000))
    finally:
        await s.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("ANALYZE blocks")
        plan = conn.execute(
            "EXPLAIN SELECT seq, data FROM blocks WHERE link = 2 AND direction = 0 AND held_by IS NULL "
            "ORDER BY seq LIMIT 4 FOR UPDATE SKIP LOCKED"
        ).fetchall()
    assert "blocks_free" in " ".join(str(row[0]) for row in plan)
