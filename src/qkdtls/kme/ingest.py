"""Key folders → store: the QKD stack drops key files, both KMEs of a link import identical streams.

Rules (docs/design.md): only regular files named ``*.key`` (not starting with ``.``) are read; a QKD stack
writes under another name and ``rename()``s, so a ``.key`` file is complete when it appears. Files are
imported in name order, appended to the link's stream and cut into blocks; the ledger (in the store, same
transaction) makes re-imports after a restart no-ops. A file whose name sorts before the last imported one
is refused: importing it would shift every later block and desynchronise the two KMEs.

Importing never stalls the KME's requests. A worker thread opens, reads and hashes the file (``open`` with
``O_NOFOLLOW | O_NONBLOCK`` and an ``fstat`` of what was opened, so a symlink or FIFO swapped in after the
listing is refused rather than followed or waited on). The event loop then appends the file in parts of
``PART_BYTES``, one store transaction each, at most ``rate`` bytes per second (``[ingest] rate``) and with a
pause after every part: one part costs the loop about a millisecond, and the pauses leave the loop and the
store's group commit to the requests most of the time. The
ledger row of a file counts the bytes committed so far, so a restart (or a kill -9) resumes after the last
committed part: no byte is imported twice and none is lost. Before the KME listens, folders are imported
in large parts without pauses (nobody is waiting yet).

The folders are polled rather than watched with inotify: polling is portable (any OS, network filesystems,
files moved in from elsewhere) and one ``scandir`` per folder per interval costs microseconds. Names already
handled are remembered so a scan does not re-read them.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qkdtls.kme.store import ImportRejected, KeyStore, StoreError

log = logging.getLogger(__name__)

# A single file larger than this is refused: it is read into memory whole (and hashed) before its parts
# are appended.
MAX_FILE_BYTES = 256 * 1024 * 1024
# While serving: bytes appended per store transaction. A part costs the event loop about 0.4 ms plus 75 µs
# per KiB (rows, histogram, inserts, the commit), so 8 KiB parts stall requests for about a millisecond.
PART_BYTES = 8 * 1024
# While serving, a file is appended at most this fast (bytes per second, ``[ingest] rate``): 1 MiB/s is
# 8 Mbit/s of key, above the secret key rate of QKD links, and leaves the loop to requests most of the time.
DEFAULT_RATE = 1024 * 1024
# At least this pause between two parts, whatever the rate: the store's group commit is never monopolised.
MIN_PART_PAUSE = 0.001
# Before the KME listens: nobody waits, so large parts and no pause.
STARTUP_PART_BYTES = 1024 * 1024
_READ_CHUNK = 1024 * 1024


class NotAKeyFile(Exception):
    """What the name pointed at when it was opened is not a regular file (a symlink, FIFO, device...)."""


@dataclass(frozen=True, slots=True)
class LinkFolder:
    peer_kme_id: int
    path: Path
    delete_after_import: bool = False


@dataclass(frozen=True, slots=True, repr=False)
class KeyFile:
    """A key file read whole: its bytes (never in reprs) and the SHA-256 of them."""

    data: bytes
    sha256: str

    def __repr__(self) -> str:
        return f"KeyFile(size={len(self.data)}, sha256={self.sha256})"


def read_key_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> KeyFile:
    """Open ``path`` without following a symlink or blocking on a FIFO, check that a regular file was opened,
    read and hash it. Runs in a worker thread (reads and hashing release the GIL).

    Raises FileNotFoundError (gone since the listing), NotAKeyFile, ImportRejected (too large) or OSError.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotAKeyFile(f"{path.name} is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAKeyFile(f"{path.name} is not a regular file")
        if info.st_size > max_bytes:
            raise ImportRejected(f"{path.name} is larger than {max_bytes} bytes")
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:  # grew since the fstat: a writer that did not rename
                raise ImportRejected(f"{path.name} is larger than {max_bytes} bytes")
            parts.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(parts)
    return KeyFile(data, hashlib.sha256(data).hexdigest())


def _is_candidate(entry: os.DirEntry[str]) -> bool:
    return (
        entry.name.endswith(".key")
        and not entry.name.startswith(".")
        and entry.is_file(follow_symlinks=False)
    )


class Ingestor:
    def __init__(
        self,
        store: KeyStore,
        kme_id: int,
        folders: Sequence[LinkFolder],
        block_size: int,
        *,
        part_bytes: int = PART_BYTES,
        rate: float | None = DEFAULT_RATE,
    ) -> None:
        """``rate``: bytes per second a file is appended at while serving (None: no limit, no pause)."""
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if part_bytes <= 0 or (rate is not None and rate <= 0):
            raise ValueError("part_bytes and rate must be positive")
        self.store = store
        self.kme_id = kme_id
        self.folders = list(folders)
        self.block_size = block_size
        self.part_bytes = part_bytes
        self.rate = rate
        # (link, name) already imported or refused in this process: skipped without reading.
        self._done: set[tuple[int, str]] = set()

    async def scan(self, *, startup: bool = False) -> int:
        """Import every complete key file now present; returns the number of bytes imported.

        ``startup``: nothing is served yet, so parts are large and there is no pause between them.
        """
        if startup:
            part, rate = max(self.part_bytes, STARTUP_PART_BYTES), None
        else:
            part, rate = self.part_bytes, self.rate
        total = 0
        for folder in self.folders:
            total += await self._scan_folder(folder, part, rate)
        return total

    async def _scan_folder(self, folder: LinkFolder, part: int, rate: float | None) -> int:
        link = folder.peer_kme_id
        try:
            with os.scandir(folder.path) as it:
                names = sorted(e.name for e in it if _is_candidate(e) and (link, e.name) not in self._done)
        except OSError as exc:
            log.warning(
                "key folder unreadable",
                extra={"event": "ingest.error", "link": link, "path": str(folder.path), "error": str(exc)},
            )
            return 0
        imported = 0
        for name in names:
            path = folder.path / name
            try:
                key_file = await asyncio.to_thread(read_key_file, path)
            except FileNotFoundError:
                continue  # moved away between listing and reading
            except (OSError, NotAKeyFile, ImportRejected) as exc:
                log.error(
                    "key file unreadable",
                    extra={"event": "ingest.error", "link": link, "file": name, "error": str(exc)},
                )
                self._done.add((link, name))
                continue
            try:
                count = await self._import(link, name, key_file, part, rate)
            except ImportRejected as exc:
                log.error(
                    "key file refused",
                    extra={"event": "ingest.refused", "link": link, "file": name, "reason": str(exc)},
                )
                self._done.add((link, name))
                continue
            except StoreError as exc:
                # Store busy or down: stop this folder so that name order is kept; the next scan resumes
                # after the last committed part.
                log.warning(
                    "key import deferred", extra={"event": "ingest.error", "link": link, "error": str(exc)}
                )
                return imported
            self._done.add((link, name))
            if count is None:
                log.debug(
                    "key file already imported", extra={"event": "ingest.skip", "link": link, "file": name}
                )
            else:
                imported += count
                log.info(
                    "key file imported",
                    extra={
                        "event": "key.imported",
                        "link": link,
                        "file": name,
                        "bytes": count,
                        "sha256": key_file.sha256,
                    },
                )
            if folder.delete_after_import:
                self._delete(path, link, name)
        return imported

    async def _import(
        self, link: int, name: str, key_file: KeyFile, part: int, rate: float | None
    ) -> int | None:
        """Append what the ledger does not have yet, part by part; bytes appended, None if it had it all."""
        data, total = key_file.data, len(key_file.data)
        progress = await self.store.import_progress(link, name)
        offset = 0
        if progress is not None:
            done, digest = progress
            if digest != key_file.sha256:
                raise ImportRejected(f"{name} was imported before with other content")
            if done >= total:
                return None
            offset = done
            log.info(
                "resuming key file import",
                extra={"event": "ingest.resume", "link": link, "file": name, "offset": done, "size": total},
            )
        appended = 0
        local = link == self.kme_id
        started = time.monotonic()
        while True:
            end = min(offset + part, total)
            count = await self.store.import_file(
                link,
                name,
                data[offset:end],
                key_file.sha256,
                self.block_size,
                local=local,
                offset=offset,
                total=total,
            )
            appended += count or 0
            offset = end
            if offset >= total:
                return appended
            if rate is not None:
                # Paced from the file's start: a part that waited long for the store needs no pause after.
                ahead = started + appended / rate - time.monotonic()
                await asyncio.sleep(max(ahead, MIN_PART_PAUSE))

    def _delete(self, path: Path, link: int, name: str) -> None:
        try:
            path.unlink()
            self._done.discard((link, name))  # gone: no need to remember it
        except FileNotFoundError:
            self._done.discard((link, name))
        except OSError as exc:
            log.warning(
                "cannot delete imported key file",
                extra={"event": "ingest.error", "link": link, "file": name, "error": str(exc)},
            )

    async def run(self, interval: float = 0.5) -> None:
        """Scan every ``interval`` seconds until cancelled; errors are logged, never fatal."""
        while True:
            try:
                await self.scan()
            except Exception:
                log.exception("key folder scan failed", extra={"event": "ingest.error"})
            await asyncio.sleep(interval)
