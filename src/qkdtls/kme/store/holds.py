"""Volatile holds for a store owned by one process: held blocks and a read-ahead of free blocks in memory.

A hold only has to last as long as the process that made it (docs/design.md, key store and crash safety):
a restarted master forgets its holds, and blocks the peer already took are refused there (409) and burnt.
So a store with a single owner process (SQLite, ``locking_mode=EXCLUSIVE``) keeps holds here instead of
committing them: holding costs no transaction and no fsync, and only the deletion of consumed or burnt blocks
is written. The same argument lets the deletion of delivered blocks commit after the delivery: until it
does, they stay here marked consumed, so that nothing in this process hands them out again.

Per (link, direction) the free blocks with ``seq <= frontier`` that are not held sit in ``ahead`` (oldest
first); blocks above the frontier are only in the database. This instance is the only one that deletes
blocks of its own directions, and imports append blocks above every existing one, so that split stays exact:
holding takes the oldest entries of ``ahead``, releasing puts blocks back, and the store reads more rows
above the frontier when ``ahead`` runs short.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from qkdtls.kme.store.base import Block


@dataclass(slots=True)
class _Held:
    block: Block
    direction: int
    held_at: float
    # Delivered; its deletion is queued but not committed yet. Never released or handed out again.
    consumed: bool = False


@dataclass(slots=True)
class _Direction:
    ahead: list[Block] = field(default_factory=list)
    frontier: int = -1


class VolatileHolds:
    """In-memory hold bookkeeping; every method is synchronous and runs on the event loop."""

    def __init__(self) -> None:
        self._directions: dict[tuple[int, int], _Direction] = {}
        self._held: dict[int, dict[int, _Held]] = {}

    def _direction(self, link: int, direction: int) -> _Direction:
        d = self._directions.get((link, direction))
        if d is None:
            d = self._directions[(link, direction)] = _Direction()
        return d

    def available(self, link: int, direction: int) -> int:
        return len(self._direction(link, direction).ahead)

    def frontier(self, link: int, direction: int) -> int:
        return self._direction(link, direction).frontier

    def add_read(self, link: int, direction: int, blocks: Iterable[Block]) -> None:
        """Blocks read from the database above the frontier (in seq order); ones already known are ignored."""
        d = self._direction(link, direction)
        for block in blocks:
            if block.seq > d.frontier:
                d.ahead.append(block)
                d.frontier = block.seq

    def hold(self, link: int, direction: int, count: int) -> list[Block] | None:
        """The ``count`` oldest free blocks, now held; None if fewer are read ahead."""
        d = self._direction(link, direction)
        if len(d.ahead) < count:
            return None
        taken = d.ahead[:count]
        del d.ahead[:count]
        now = time.time()
        held = self._held.setdefault(link, {})
        for block in taken:
            held[block.seq] = _Held(block, direction, now)
        return taken

    def all_held(self, link: int, seqs: Sequence[int]) -> bool:
        """Every block is held and not consumed yet."""
        held = self._held.get(link, {})
        for seq in seqs:
            entry = held.get(seq)
            if entry is None or entry.consumed:
                return False
        return True

    def held_only(self, link: int, seqs: Sequence[int]) -> list[int]:
        held = self._held.get(link, {})
        return [seq for seq in dict.fromkeys(seqs) if seq in held]

    def consume(self, link: int, seqs: Sequence[int]) -> None:
        """The blocks were delivered: they stay held (and counted as not free) until :meth:`forget`."""
        held = self._held.get(link, {})
        for seq in seqs:
            entry = held.get(seq)
            if entry is not None:
                entry.consumed = True

    def forget(self, link: int, seqs: Sequence[int]) -> None:
        """The blocks are gone from the database (consumed or burnt): drop their holds."""
        held = self._held.get(link, {})
        for seq in seqs:
            held.pop(seq, None)

    def release(self, link: int, seqs: Sequence[int]) -> int:
        """Make held blocks free again (oldest first stays the order); returns how many were held."""
        held = self._held.get(link, {})
        back: dict[int, list[Block]] = {}
        for seq in dict.fromkeys(seqs):
            entry = held.get(seq)
            if entry is not None and not entry.consumed:
                del held[seq]
                back.setdefault(entry.direction, []).append(entry.block)
        for direction, blocks in back.items():
            ahead = self._direction(link, direction).ahead
            ahead.extend(blocks)
            ahead.sort(key=lambda b: b.seq)
        return sum(len(blocks) for blocks in back.values())

    def release_older_than(self, held_before: float, limit: int) -> int:
        """Free holds made before ``held_before`` (a request stuck far beyond any peer timeout)."""
        released = 0
        for link, held in self._held.items():
            stale = [
                seq for seq, entry in held.items() if entry.held_at < held_before and not entry.consumed
            ][: limit - released]
            released += self.release(link, stale)
            if released >= limit:
                break
        return released

    def held_count(self, link: int, direction: int) -> int:
        return sum(1 for entry in self._held.get(link, {}).values() if entry.direction == direction)
