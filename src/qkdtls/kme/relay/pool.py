"""Link material a relay sender consumed ahead of use: the burn-before-send rule without a commit per message.

A KME sending a hop message (the origin on the first link, an intermediate on the next one) names in it
blocks of its own direction of that link: the keys or XOR shares (origin), the pads of values sent
encrypted, and the two one-time MAC keys. Every one of them must be deleted durably before the message
leaves the process. Doing that per message put a commit (an fsync) on the path of every relay; instead the
sender deletes blocks in batches ahead of use (one transaction per refill) and hands them out from memory,
each once. A crash loses what the pool held: those blocks are burnt (deleted, never used), at most
``MAX_POOL`` blocks per link, never reused.

The pool refills in the background when it falls below what the last ``WINDOW`` seconds used, and sizes a
refill to that demand (at least ``MIN_POOL``, at most ``MAX_POOL`` blocks beyond what a caller waits for).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from qkdtls.kme.relay.ledger import Ledger
from qkdtls.kme.store import Block, KeyStore, ShortStock

MIN_POOL = 32
MAX_POOL = 1024
WINDOW = 0.1  # seconds of recent demand the pool keeps in advance


class SpentPool:
    """Blocks of ``direction`` of ``link`` already deleted from the store, handed out once each."""

    def __init__(self, store: KeyStore, link: int, direction: int, ledger: Ledger | None = None) -> None:
        self.store = store
        self.link = link
        self.direction = direction
        self.ledger = ledger
        self._blocks: deque[Block] = deque()
        self._recent: deque[tuple[float, int]] = deque()  # (when, blocks taken)
        self._recent_sum = 0
        self._refill: asyncio.Task[None] | None = None
        self.refills = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _demand(self, now: float) -> int:
        while self._recent and self._recent[0][0] < now - WINDOW:
            self._recent_sum -= self._recent.popleft()[1]
        return self._recent_sum

    def _target(self, now: float) -> int:
        return min(MAX_POOL, max(MIN_POOL, self._demand(now)))

    async def take(self, count: int) -> list[Block]:
        """``count`` blocks, durably deleted before this returns (StoreError, ShortStock if it cannot)."""
        now = time.monotonic()
        self._recent.append((now, count))
        self._recent_sum += count
        for _ in range(64):  # each round waits for one refill; bounded even if others keep taking
            if len(self._blocks) >= count:
                break
            if self._refill is None or self._refill.done():
                missing = count - len(self._blocks)
                self._start(missing + self._target(now), missing)
            assert self._refill is not None
            refill = self._refill
            await asyncio.shield(refill)
            refill.result()  # its failure is ours
        if len(self._blocks) < count:
            raise RuntimeError("the pool could not be refilled")
        out = [self._blocks.popleft() for _ in range(count)]
        if len(self._blocks) < self._target(now) and (self._refill is None or self._refill.done()):
            self._start(self._target(now))
            self._refill.add_done_callback(_consume_exception)  # type: ignore[union-attr]
        return out

    def give_back(self, blocks: list[Block]) -> None:
        """Blocks taken and never named in anything that left this process: used first next time."""
        self._blocks.extendleft(reversed(blocks))

    def _start(self, count: int, minimum: int = 1) -> None:
        self._refill = asyncio.get_running_loop().create_task(
            self._fill(count, minimum), name=f"kme-relay-pool-{self.link}"
        )

    async def _fill(self, count: int, minimum: int) -> None:
        try:
            held = await self.store.hold_blocks(self.link, self.direction, count)
        except ShortStock as exc:  # near the end of the stock: what there is, if it is enough
            if exc.available < minimum or exc.available <= 0:
                raise
            held = await self.store.hold_blocks(self.link, self.direction, exc.available)
        seqs = [b.seq for b in held]
        try:
            await self.store.spend_held({self.link: seqs})
        except BaseException:
            await asyncio.shield(self.store.release_blocks(self.link, seqs))
            raise
        self.refills += 1
        if self.ledger:
            self.ledger.spent((self.link, "pool", seq) for seq in seqs)
        self._blocks.extend(held)

    async def close(self) -> None:
        if self._refill is not None and not self._refill.done():
            self._refill.cancel()
            try:
                await self._refill
            except BaseException:
                pass
        self._blocks.clear()  # burnt: deleted from the store, never used


def _consume_exception(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # a background refill's failure surfaces at the next take()
