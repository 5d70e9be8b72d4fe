"""Key store: the re-collection window, the uncollected-keys counter and quota, and schema migration (real
SQLite files and a real PostgreSQL server)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from qkdtls.kme.keyid import random_key_id
from qkdtls.kme.store import (
    KeysNotFound,
    KeyStore,
    NewKeySpec,
    NotASlave,
    UncollectedQuota,
    open_store,
)

from .test_store import LINK, LOCAL, feed

MASTER = 7


async def _local_key(store: KeyStore, slaves: list[int]) -> tuple[str, bytes]:
    [key] = await store.take_local(LOCAL, 1, 1, 256, random_key_id, MASTER, slaves, time.time() + 600)
    return key.key_id, key.data


async def test_the_slave_may_collect_again_within_its_window_then_the_key_is_erased(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 4), link=LOCAL)
    kid, data = await _local_key(store, [8])
    got = await store.collect(MASTER, 8, [kid], recollect_window=600)
    assert got[0].data == data and got[0].slaves == (8,) and not got[0].again
    stats = await store.link_stats(LOCAL)
    assert (stats.reserved_keys, stats.recollectable_keys) == (0, 1)  # delivered, kept for the window
    again = await store.collect(MASTER, 8, [kid], recollect_window=600)
    assert again[0].data == data and again[0].again  # same bytes
    with pytest.raises(NotASlave):
        await store.collect(MASTER, 9, [kid])
    with pytest.raises(KeysNotFound):
        await store.collect(8, MASTER, [kid])  # the master asking as a slave of its slave
    # The window's end erases it: expire() with a clock past the window (it never runs early).
    swept = await store.expire(time.time() + 10)
    assert (swept.expired, swept.erased) == ([], [])
    swept = await store.expire(time.time() + 601)
    assert (swept.expired, swept.erased) == ([], [(LOCAL, kid)])
    with pytest.raises(KeysNotFound):
        await store.collect(MASTER, 8, [kid], recollect_window=600)
    stats = await store.link_stats(LOCAL)
    assert (stats.reserved_keys, stats.recollectable_keys, stats.expired_keys) == (0, 0, 0)


async def test_a_window_that_ended_refuses_before_the_sweep(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 4), link=LOCAL)
    kid, _ = await _local_key(store, [8])
    await store.collect(MASTER, 8, [kid], recollect_window=0.05)
    await asyncio.sleep(0.1)
    with pytest.raises(KeysNotFound):
        await store.collect(MASTER, 8, [kid], recollect_window=0.05)
    assert (await store.expire(time.time())).erased == [(LOCAL, kid)]


async def test_without_a_window_the_last_collection_deletes(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 4), link=LOCAL)
    kid, _ = await _local_key(store, [8])
    await store.collect(MASTER, 8, [kid])
    with pytest.raises(KeysNotFound):
        await store.collect(MASTER, 8, [kid])
    stats = await store.link_stats(LOCAL)
    assert (stats.reserved_keys, stats.recollectable_keys) == (0, 0)
    assert await store.expire(time.time() + 3600) == type(await store.expire(0))([], [])


async def test_multicast_windows_are_per_slave_and_the_last_collection_starts_the_erasure(
    store: KeyStore,
) -> None:
    await feed(store, os.urandom(32 * 4), link=LOCAL)
    kid, data = await _local_key(store, [8, 9])
    await store.collect(MASTER, 9, [kid], recollect_window=0.05)  # 9 first, a short window
    assert (await store.link_stats(LOCAL)).reserved_keys == 1  # still awaited by 8
    await asyncio.sleep(0.1)
    with pytest.raises(KeysNotFound):  # 9's own window is over, though the key is still stored for 8
        await store.collect(MASTER, 9, [kid])
    assert (await store.collect(MASTER, 8, [kid], recollect_window=600))[0].data == data
    assert (await store.collect(MASTER, 8, [kid], recollect_window=600))[0].data == data
    stats = await store.link_stats(LOCAL)
    assert (stats.reserved_keys, stats.recollectable_keys) == (0, 1)
    assert (await store.expire(time.time() + 300)).erased == []
    assert (await store.expire(time.time() + 601)).erased == [(LOCAL, kid)]


async def test_a_short_reservation_ttl_does_not_cut_a_slaves_window(store: KeyStore) -> None:
    await feed(store, os.urandom(32 * 4), link=LOCAL)
    [key] = await store.take_local(LOCAL, 1, 1, 256, random_key_id, MASTER, [8, 9], time.time() + 1)
    await store.collect(MASTER, 8, [key.key_id], recollect_window=600)
    assert (await store.expire(time.time() + 30)).expired == []  # 9 may still come; 8's window runs
    assert (await store.collect(MASTER, 8, [key.key_id]))[0].data == key.data
    swept = await store.expire(time.time() + 601)
    assert swept.expired == [(LOCAL, key.key_id)]  # 9 never came: it expired uncollected


async def test_uncollected_keys_are_counted_per_master_and_capped(store_url: str) -> None:
    store = open_store(store_url)
    try:
        await feed(store, os.urandom(32 * 16), link=LOCAL)
        await feed(store, os.urandom(32 * 16))
        ids = [k.key_id for k in await store.take_local(
            LOCAL, 3, 1, 256, random_key_id, MASTER, [8], time.time() + 60, max_uncollected=4
        )]  # fmt: skip
        with pytest.raises(UncollectedQuota) as info:
            await store.take_local(
                LOCAL, 2, 1, 256, random_key_id, MASTER, [8], time.time() + 60, max_uncollected=4
            )
        assert (info.value.uncollected, info.value.limit) == (3, 4)
        await store.take_reserved(
            LINK, 0, [NewKeySpec(random_key_id(), (0,))], 10, [20], 256, time.time() + 60, max_uncollected=1
        )
        with pytest.raises(UncollectedQuota):  # nothing changes: block 2 stays free
            await store.take_reserved(
                LINK, 0, [NewKeySpec(random_key_id(), (2,))], 10, [20], 256, time.time() + 60,
                max_uncollected=1,
            )  # fmt: skip
        assert await store.free_blocks(LINK, 0) == 7
        assert await store.uncollected_by_master() == {MASTER: 3, 10: 1}
        await store.collect(MASTER, 8, ids[:2], recollect_window=60)  # collected: no longer counted
        assert await store.uncollected_by_master() == {MASTER: 1, 10: 1}
        assert len(await store.take_local(
            LOCAL, 3, 1, 256, random_key_id, MASTER, [8], time.time() - 1, max_uncollected=4
        )) == 3  # fmt: skip
        assert (await store.expire(time.time())).expired  # those three expired uncollected
        assert await store.uncollected_by_master() == {MASTER: 1, 10: 1}
    finally:
        await store.close()
    reopened = open_store(store_url)  # the count lives in the store: a restart keeps it
    try:
        assert await reopened.uncollected_by_master() == {MASTER: 1, 10: 1}
        with pytest.raises(UncollectedQuota):
            await reopened.take_local(
                LOCAL, 4, 1, 256, random_key_id, MASTER, [8], time.time() + 60, max_uncollected=4
            )
    finally:
        await reopened.close()


def _downgrade_to_schema_1(store_url: str) -> None:
    """Turn a fresh store into what the previous release wrote: no ``collected`` column, no per-master
    counters (every stored key was uncollected then)."""
    statements = [
        "ALTER TABLE keys DROP COLUMN collected",
        "INSERT INTO counters(link, name, value) "
        "SELECT link, 'keys', COUNT(*) FROM keys WHERE pending != '' GROUP BY link",
        "DELETE FROM counters WHERE name LIKE 'uncollected:%'",
        "UPDATE meta SET value = '1' WHERE name = 'schema_version'",
    ]
    if store_url.startswith("sqlite"):  # schema 1 kept keys by key ID (WITHOUT ROWID)
        statements[:1] = [
            "CREATE TABLE keys_1 (key_id TEXT PRIMARY KEY, link INTEGER NOT NULL, "
            "master_sae INTEGER NOT NULL, slaves TEXT NOT NULL, pending TEXT NOT NULL, "
            "size INTEGER NOT NULL, data BLOB NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID",
            "INSERT INTO keys_1 SELECT key_id, link, master_sae, slaves, pending, size, data, expires_at "
            "FROM keys",
            "DROP TABLE keys",
            "ALTER TABLE keys_1 RENAME TO keys",
            "CREATE INDEX keys_expiry ON keys (expires_at)",
        ]
        import sqlite3

        conn = sqlite3.connect(store_url.removeprefix("sqlite://"), isolation_level=None)
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)


async def test_a_schema_1_store_is_migrated(store_url: str) -> None:
    store = open_store(store_url)
    await feed(store, os.urandom(32 * 8), link=LOCAL)
    kid, data = await _local_key(store, [8])
    await _local_key(store, [8, 9])
    await store.close()
    _downgrade_to_schema_1(store_url)
    migrated = open_store(store_url)
    try:
        assert await migrated.uncollected_by_master() == {MASTER: 2}
        assert (await migrated.link_stats(LOCAL)).reserved_keys == 2
        assert (await migrated.collect(MASTER, 8, [kid], recollect_window=60))[0].data == data
        assert (await migrated.collect(MASTER, 8, [kid], recollect_window=60))[0].data == data
        assert await migrated.uncollected_by_master() == {MASTER: 1}
    finally:
        await migrated.close()
