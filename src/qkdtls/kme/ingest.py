"""Key folders → store: the QKD stack drops key files, both KMEs of a link import identical streams.

Rules (docs/design.md): only regular files named ``*.key`` (not starting with ``.``) are read; a QKD stack
writes under another name and ``rename()``s, so a ``.key`` file is complete when it appears. Files are
imported in name order, appended to the link's stream and cut into blocks; the ledger (in the store, same
transaction) makes re-imports after a restart no-ops. A file whose name sorts before the last imported one
is refused: importing it would shift every later block and desynchronise the two KMEs.

The folders are polled rather than watched with inotify: polling is portable (any OS, network filesystems,
files moved in from elsewhere) and one ``scandir`` per folder per interval costs microseconds. Names already
handled are remembered so a scan does not re-read them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qkdtls.kme.store import ImportRejected, KeyStore, StoreError

log = logging.getLogger(__name__)

# A single file larger than this is refused: it would be imported in one transaction and held in memory.
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LinkFolder:
    peer_kme_id: int
    path: Path
    delete_after_import: bool = False


def _is_candidate(entry: os.DirEntry[str]) -> bool:
    return (
        entry.name.endswith(".key")
        and not entry.name.startswith(".")
        and entry.is_file(follow_symlinks=False)
    )


class Ingestor:
    def __init__(self, store: KeyStore, kme_id: int, folders: Sequence[LinkFolder], block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.store = store
        self.kme_id = kme_id
        self.folders = list(folders)
        self.block_size = block_size
        # (link, name) already imported or refused in this process: skipped without reading.
        self._done: set[tuple[int, str]] = set()

    async def scan(self) -> int:
        """Import every complete key file now present; returns the number of bytes imported."""
        total = 0
        for folder in self.folders:
            total += await self._scan_folder(folder)
        return total

    async def _scan_folder(self, folder: LinkFolder) -> int:
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
                if path.stat().st_size > MAX_FILE_BYTES:
                    raise ImportRejected(f"{name} is larger than {MAX_FILE_BYTES} bytes")
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # moved away between listing and reading
            except (OSError, ImportRejected) as exc:
                log.error(
                    "key file unreadable", extra={"event": "ingest.error", "link": link, "error": str(exc)}
                )
                self._done.add((link, name))
                continue
            digest = hashlib.sha256(data).hexdigest()
            try:
                count = await self.store.import_file(
                    link, name, data, digest, self.block_size, local=link == self.kme_id
                )
            except ImportRejected as exc:
                log.error(
                    "key file refused",
                    extra={"event": "ingest.refused", "link": link, "file": name, "reason": str(exc)},
                )
                self._done.add((link, name))
                continue
            except StoreError as exc:
                # Store busy or down: stop this folder so that name order is kept; the next scan retries.
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
                        "sha256": digest,
                    },
                )
            if folder.delete_after_import:
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
        return imported

    async def run(self, interval: float = 0.5) -> None:
        """Scan every ``interval`` seconds until cancelled; errors are logged, never fatal."""
        while True:
            try:
                await self.scan()
            except Exception:
                log.exception("key folder scan failed", extra={"event": "ingest.error"})
            await asyncio.sleep(interval)
