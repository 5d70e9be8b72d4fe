"""Key folders → store: file rules, carry-over, ledger across restarts, delete_after_import."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qkdtls.kme.ingest import Ingestor, LinkFolder
from qkdtls.kme.store import KeyStore, open_store

PEER = 2


def write_key_file(folder: Path, name: str, data: bytes) -> None:
    """What a QKD stack does: write under a hidden temporary name, then rename atomically."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    tmp.rename(folder / name)


async def blocks_of(store: KeyStore, direction: int = 0) -> list[bytes]:
    free = await store.free_blocks(PEER, direction)
    if free == 0:
        return []
    held = await store.hold_blocks(PEER, direction, free)
    await store.release_blocks(PEER, [b.seq for b in held])
    return [b.data for b in held]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "kme-2"
    path.mkdir()
    return path


async def test_only_complete_key_files_in_name_order(tmp_path: Path, folder: Path) -> None:
    store = open_store(f"sqlite://{tmp_path / 'a.sqlite3'}")
    try:
        ing = Ingestor(store, 1, [LinkFolder(PEER, folder)], 32)
        stream = os.urandom(32 * 6 + 10)
        write_key_file(folder, "0002.key", stream[50:])
        write_key_file(folder, "0001.key", stream[:50])  # arrives later, sorts first
        (folder / "0003.key.part").write_bytes(b"p" * 64)  # still being written
        (folder / ".0004.key").write_bytes(b"h" * 64)
        (folder / "0005.txt").write_bytes(b"t" * 64)
        (folder / "sub.key").mkdir()
        os.symlink(folder / "0001.key", folder / "0006.key")
        assert await ing.scan() == len(stream)
        assert await ing.scan() == 0
        assert await blocks_of(store, 0) == [stream[i * 32 : i * 32 + 32] for i in (0, 2, 4)]
        assert await blocks_of(store, 1) == [stream[i * 32 : i * 32 + 32] for i in (1, 3, 5)]
        # The 10 trailing bytes wait for the next file.
        write_key_file(folder, "0007.key", b"\x01" * 22)
        assert await ing.scan() == 22
        assert (await blocks_of(store, 0))[-1] == stream[-10:] + b"\x01" * 22
    finally:
        await store.close()


async def test_late_file_out_of_order_is_refused(tmp_path: Path, folder: Path) -> None:
    store = open_store(f"sqlite://{tmp_path / 'a.sqlite3'}")
    try:
        ing = Ingestor(store, 1, [LinkFolder(PEER, folder)], 32)
        write_key_file(folder, "0002.key", b"a" * 64)
        assert await ing.scan() == 64
        write_key_file(folder, "0001.key", b"b" * 64)  # too late: would desynchronise the peers
        assert await ing.scan() == 0
        assert (folder / "0001.key").exists()
        assert await store.free_blocks(PEER, 0) + await store.free_blocks(PEER, 1) == 2
    finally:
        await store.close()


async def test_restart_never_imports_a_byte_twice(tmp_path: Path, folder: Path) -> None:
    url = f"sqlite://{tmp_path / 'a.sqlite3'}"
    write_key_file(folder, "0001.key", os.urandom(100))
    store = open_store(url)
    assert await Ingestor(store, 1, [LinkFolder(PEER, folder)], 32).scan() == 100
    await store.close()
    write_key_file(folder, "0002.key", os.urandom(28))
    store = open_store(url)
    try:
        assert await Ingestor(store, 1, [LinkFolder(PEER, folder)], 32).scan() == 28
        stats = await store.link_stats(PEER)
        assert stats.imported_bytes == 128 and stats.free_blocks == {0: 2, 1: 2}
    finally:
        await store.close()


async def test_delete_after_import_and_local_link(tmp_path: Path, folder: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    store = open_store(f"sqlite://{tmp_path / 'a.sqlite3'}")
    try:
        ing = Ingestor(
            store, 1, [LinkFolder(PEER, folder, delete_after_import=True), LinkFolder(1, local)], 32
        )
        write_key_file(folder, "0001.key", os.urandom(64))
        write_key_file(local, "0001.key", os.urandom(96))
        assert await ing.scan() == 160
        assert not (folder / "0001.key").exists() and (local / "0001.key").exists()
        assert (await store.link_stats(1)).free_blocks == {0: 3, 1: 0}
        # A file moved in from elsewhere is picked up like any other.
        other = tmp_path / "elsewhere.bin"
        other.write_bytes(os.urandom(32))
        other.rename(folder / "0002.key")
        assert await ing.scan() == 32
        assert not (folder / "0002.key").exists()
    finally:
        await store.close()


async def test_missing_folder_is_logged_not_fatal(tmp_path: Path) -> None:
    store = open_store("sqlite://:memory:")
    try:
        assert await Ingestor(store, 1, [LinkFolder(PEER, tmp_path / "absent")], 32).scan() == 0
    finally:
        await store.close()


async def test_run_polls_until_cancelled(tmp_path: Path, folder: Path) -> None:
    import asyncio

    store = open_store(f"sqlite://{tmp_path / 'a.sqlite3'}")
    task = asyncio.create_task(Ingestor(store, 1, [LinkFolder(PEER, folder)], 32).run(interval=0.01))
    try:
        write_key_file(folder, "0001.key", os.urandom(64))
        for _ in range(200):
            if await store.free_blocks(PEER, 0):
                break
            await asyncio.sleep(0.01)
        assert await store.free_blocks(PEER, 0) == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.close()
