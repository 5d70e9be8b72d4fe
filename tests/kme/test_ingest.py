"""Key folders → store: file rules, carry-over, ledger across restarts, delete_after_import."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from qkdtls.etsi014.client import KmeClient, KmeClientSettings
from qkdtls.kme import ingest as ingest_module
from qkdtls.kme.ingest import Ingestor, LinkFolder, NotAKeyFile, read_key_file
from qkdtls.kme.store import ImportRejected, KeyStore, open_store
from qkdtls.testbed import Testbed

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


async def stream_of(store: KeyStore) -> bytes:
    """The free blocks of both directions in sequence order (direction i % 2 holds block i)."""
    even, odd = await blocks_of(store, 0), await blocks_of(store, 1)
    out = [b""] * (len(even) + len(odd))
    out[0::2], out[1::2] = even, odd
    return b"".join(out)


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


# --- what the ingestor opens: no symlink, no FIFO, even when swapped in after the listing -----------------


def test_read_key_file_refuses_symlinks_and_fifos(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 64)
    os.symlink(secret, tmp_path / "link.key")
    with pytest.raises(NotAKeyFile, match="symbolic link"):
        read_key_file(tmp_path / "link.key")
    os.mkfifo(tmp_path / "fifo.key")
    with pytest.raises(NotAKeyFile, match="not a regular file"):
        read_key_file(tmp_path / "fifo.key")  # no writer: a blocking open would hang here
    (tmp_path / "big.key").write_bytes(b"b" * 100)
    with pytest.raises(ImportRejected, match="larger than 64"):
        read_key_file(tmp_path / "big.key", max_bytes=64)
    good = read_key_file(tmp_path / "big.key")
    assert good.data == b"b" * 100 and good.sha256 == hashlib.sha256(b"b" * 100).hexdigest()
    assert "b" * 10 not in repr(good)


@pytest.mark.parametrize("swap", ["symlink", "fifo"])
async def test_file_swapped_after_listing_is_not_followed(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    """The listing sees a regular file; by the time it is opened, a symlink (to a file the KME must never
    import) or a FIFO (which a blocking open would wait on forever) has replaced it."""
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(64))
    real_read = ingest_module.read_key_file

    def swapped(path: Path, *args: object) -> object:
        path.unlink()
        if swap == "symlink":
            os.symlink(secret, path)
        else:
            os.mkfifo(path)
        return real_read(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest_module, "read_key_file", swapped)
    store = open_store(f"sqlite://{tmp_path / 'a.sqlite3'}")
    try:
        write_key_file(folder, "0001.key", os.urandom(64))
        ing = Ingestor(store, 1, [LinkFolder(PEER, folder)], 32)
        assert await asyncio.wait_for(ing.scan(), 10.0) == 0
        assert (await store.link_stats(PEER)).imported_bytes == 0
        monkeypatch.setattr(ingest_module, "read_key_file", real_read)
        assert await ing.scan() == 0  # refused once, remembered: not read again
    finally:
        await store.close()


# --- large files: read off the loop, appended in parts, resumed after a crash ----------------------------


async def test_large_file_is_read_in_a_thread_and_appended_in_bounded_parts(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers: list[str] = []
    real_read = ingest_module.read_key_file

    def recording(path: Path, *args: object) -> object:
        readers.append(threading.current_thread().name)
        return real_read(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest_module, "read_key_file", recording)
    store = open_store(f"sqlite://{tmp_path / 'a.sqlite3'}")
    parts: list[int] = []
    real_import = store.import_file

    async def import_file(*args: object, **kwargs: object) -> int | None:
        parts.append(len(args[2]))  # type: ignore[arg-type]
        return await real_import(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "import_file", import_file)
    try:
        stream = os.urandom(1_000_003)
        write_key_file(folder, "0001.key", stream)
        ing = Ingestor(store, 1, [LinkFolder(PEER, folder)], 32, part_bytes=65536, rate=None)
        assert await ing.scan() == len(stream)
        assert readers and threading.main_thread().name not in readers
        assert len(parts) == 16 and max(parts) == 65536 and sum(parts) == len(stream)
        assert await stream_of(store) == stream[: len(stream) // 32 * 32]
    finally:
        await store.close()


async def test_partly_imported_file_resumes_after_the_last_committed_part(
    tmp_path: Path, folder: Path
) -> None:
    url = f"sqlite://{tmp_path / 'a.sqlite3'}"
    stream = os.urandom(300_000)
    digest = hashlib.sha256(stream).hexdigest()
    write_key_file(folder, "0001.key", stream)
    store = open_store(url)
    # What a KME killed mid-import left behind: the first two parts committed.
    assert (
        await store.import_file(
            PEER, "0001.key", stream[:40_000], digest, 32, local=False, offset=0, total=len(stream)
        )
        == 40_000
    )
    assert (
        await store.import_file(
            PEER, "0001.key", stream[40_000:80_000], digest, 32, local=False, offset=40_000, total=len(stream)
        )
        == 40_000
    )
    assert await store.import_progress(PEER, "0001.key") == (80_000, digest)
    await store.close()
    store = open_store(url)
    try:
        ing = Ingestor(store, 1, [LinkFolder(PEER, folder)], 32, part_bytes=30_000)
        assert await ing.scan() == len(stream) - 80_000
        assert await store.import_progress(PEER, "0001.key") == (len(stream), digest)
        stats = await store.link_stats(PEER)
        assert stats.imported_bytes == len(stream)
        assert await stream_of(store) == stream[: len(stream) // 32 * 32]
        # A part that was committed already is a no-op; one that skips bytes is refused.
        assert (
            await store.import_file(
                PEER, "0001.key", stream[:40_000], digest, 32, local=False, offset=0, total=len(stream)
            )
            is None
        )
    finally:
        await store.close()


async def test_partly_imported_file_whose_content_changed_is_refused(tmp_path: Path, folder: Path) -> None:
    store = open_store(f"sqlite://{tmp_path / 'a.sqlite3'}")
    try:
        stream = os.urandom(100_000)
        digest = hashlib.sha256(stream).hexdigest()
        await store.import_file(PEER, "0001.key", stream[:50_000], digest, 32, local=False, total=100_000)
        write_key_file(folder, "0001.key", stream[:50_000] + os.urandom(50_000))
        assert await Ingestor(store, 1, [LinkFolder(PEER, folder)], 32).scan() == 0
        assert (await store.link_stats(PEER)).imported_bytes == 50_000
        with pytest.raises(ImportRejected, match="does not follow"):
            await store.import_file(
                PEER, "0001.key", stream[60_000:], digest, 32, local=False, offset=60_000, total=100_000
            )
    finally:
        await store.close()


def _imported_bytes(client: KmeClient, link: int) -> int:
    for entry in client.admin_links():
        if entry["peer_KME_ID"] == link:
            return int(entry["imported_bytes"])
    raise AssertionError(f"link {link} missing from {client.admin_links()}")


def test_kill_9_mid_import_neither_duplicates_nor_loses_a_byte(tmp_path: Path) -> None:
    """A real KME process killed while it appends a large file: after the restart the link's stream is the
    files' bytes exactly once, in order."""
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=4096, local_key_bytes=0)
    files = [bed.add_key_material(4096 * 3)]
    cert, key, ca = bed.admin_credentials(1)
    try:
        bed.start_kme(1)
        settings = KmeClientSettings(bed.sae_url(1), cert, key, ca, timeout=5.0, pool_size=1)
        before = 4096 + 4096 * 3
        with KmeClient(settings) as client:
            deadline = time.monotonic() + 30
            while _imported_bytes(client, 2) < before:
                assert time.monotonic() < deadline, bed.log_tail(1)
                time.sleep(0.02)
            big = bed.add_key_material(8 << 20)
            while True:  # kill once a part of the big file committed, and well before its end
                done = _imported_bytes(client, 2) - before
                if done > len(big) // 10:
                    break
                assert time.monotonic() < deadline, bed.log_tail(1)
                time.sleep(0.005)
        assert done < len(big) // 2, "the import ran too fast to be killed midway"
        bed.kill(1)
        files.append(big)
        files.append(bed.add_key_material(1000))  # arrives while the KME is down
        bed.start_kme(1)
        total = 4096 + sum(len(f) for f in files)
        with KmeClient(settings) as client:
            deadline = time.monotonic() + 60
            while _imported_bytes(client, 2) < total:
                assert time.monotonic() < deadline, bed.log_tail(1)
                time.sleep(0.05)
            assert _imported_bytes(client, 2) == total
        bed.stop()
    finally:
        bed.stop()
    first = (bed.root / "keys" / "kme1" / "link-2" / "000000001.key").read_bytes()
    expected = first + b"".join(files)
    with sqlite3.connect(bed.root / "kme1.sqlite3") as db:
        blocks = [bytes(d) for (d,) in db.execute("SELECT data FROM blocks WHERE link = 2 ORDER BY seq")]
        (carry,) = db.execute("SELECT carry FROM streams WHERE link = 2").fetchone()
        ledger = dict(db.execute("SELECT name, size FROM ledger WHERE link = 2").fetchall())
    assert b"".join(blocks) + bytes(carry) == expected
    assert sorted(ledger.values()) == sorted([4096, *(len(f) for f in files)])
