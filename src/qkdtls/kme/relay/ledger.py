"""Test-only audit of link material a relay uses, across processes and crashes.

With ``QKDTLS_RELAY_LEDGER=DIR`` in its environment a KME appends to ``DIR/kme<ID>.ledger`` one line per
block it consumes for a relay: ``spend <peer> <purpose> <seq>`` when it consumed a block of its own direction
for a message it is about to send (written after the durable deletion, before the message leaves), and
``take <peer> <seq>`` when it consumed a block a neighbour named in a message it accepted, and
``recv <peer> <base64 body>`` for every hop message it received (what an intermediate KME saw). The tests read
every KME's ledger after runs with kill -9 and check that no (link, block) appears twice: no pad or MAC key
bit is used twice. Lines are appended with single ``write`` calls on an ``O_APPEND`` descriptor, so a kill
leaves whole lines behind.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from pathlib import Path

LEDGER_ENV = "QKDTLS_RELAY_LEDGER"


class Ledger:
    def __init__(self, kme_id: int, directory: str | None = None) -> None:
        directory = os.environ.get(LEDGER_ENV) if directory is None else directory
        self._fd: int | None = None
        if directory:
            path = Path(directory) / f"kme{kme_id}.ledger"
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __bool__(self) -> bool:
        return self._fd is not None

    def _write(self, lines: Iterable[str]) -> None:
        if self._fd is not None:
            data = "".join(lines).encode()
            if data:
                os.write(self._fd, data)

    def spent(self, entries: Iterable[tuple[int, str, int]]) -> None:
        """(peer, purpose, seq) of blocks of this KME's direction, consumed for a message to ``peer``."""
        self._write(f"spend {peer} {purpose} {seq}\n" for peer, purpose, seq in entries)

    def taken(self, peer: int, seqs: Iterable[int]) -> None:
        self._write(f"take {peer} {seq}\n" for seq in seqs)

    def received(self, peer: int, body: bytes) -> None:
        if self._fd is not None:
            self._write([f"recv {peer} {base64.b64encode(body).decode('ascii')}\n"])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
