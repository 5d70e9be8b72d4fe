"""Keys relayed ahead of demand (``[relay] prefetch``): the origin KME keeps up to ``prefetch`` keys ready
per (master SAE, slave SAE, key size, relay mode), already stored at the slave's KME, and answers ``enc_keys``
from them.

Why: a relay's cost is per hop message, not per key. Every hop decodes, verifies, re-encrypts, commits and
makes an HTTPS exchange (0.7-1 ms of CPU per message at an intermediate KME here),
and a closed loop of eight requesters puts about four keys in a message, so a 3-hop relay on demand
delivers 34-46 % of a direct link's key cycles (``bench.relay``; docs/design.md, network relay, "Measured").
Relayed ahead, a batch of up to ``prefetch`` keys travels in one message per hop, and ``enc_keys`` no longer
waits for the path: 97-108 % of the direct link with ``prefetch = 64``. This is how trusted-node networks
serve busy SAE pairs that are several links apart: end-to-end keys are relayed into a store at both ends
before applications ask.

What it changes, plainly:

- the keys are relayed exactly as on demand (same modes, paths, pads, MACs, durability at the slave's KME,
  and the same intermediate KMEs see them in ``trusted`` mode); they exist earlier;
- until handed out, a key ready at the origin lives in this process's memory only (never on disk), for at
  most ``prefetch_max_age`` seconds; then it is dropped. A crash loses what is ready: those keys are never
  handed out, and their copies at the slave's KME expire there unused (``reservation_ttl``). Nothing is
  handed out twice: a key leaves the buffer when it is taken;
- link material is spent ahead: at most ``prefetch`` keys per active pair wait, and a pair nobody asked for
  in ``prefetch_idle`` seconds is not refilled. The keys waiting at the slave's KME count against the
  master SAE's ``max_uncollected`` there;
- a request is served from the buffer only when it asks for one slave SAE, a size and a mode for which keys
  are ready, and no more keys than are ready; otherwise it is relayed on demand, as before.

The buffer is pure code (:class:`KeyBuffer`); :class:`Prefetcher` runs the refills as tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qkdtls.kme.relay.policy import RelayChoice

log = logging.getLogger(__name__)

# One refill relays at most this many keys (one item of one hop message per path: a few KiB).
MAX_REFILL = 256
# A refill that failed (no path, no stock, quota at the slave's KME) is not tried again sooner than this.
RETRY_AFTER = 1.0
# Buffers at once, per master SAE and in all (sizes, slaves and modes each have their own): beyond, a buffer
# idle for prefetch_idle seconds makes room, or requests go on demand.
MAX_PER_MASTER = 8
MAX_BUFFERS = 1024

Ready = list[tuple[str, bytes]]  # (key ID, key), in the order they were relayed


@dataclass(frozen=True, slots=True)
class BufferKey:
    """Which requests one buffer serves."""

    master: int
    slave: int
    size: int  # bits
    choice: RelayChoice


class KeyBuffer:
    """Keys ready for one :class:`BufferKey`, oldest first, and when to relay more (pure code)."""

    __slots__ = ("_keys", "idle", "last_used", "max_age", "refilling", "retry_at", "target")

    def __init__(self, target: int, max_age: float, idle: float, now: float) -> None:
        self.target = target
        self.max_age = max_age
        self.idle = idle
        self._keys: deque[tuple[float, str, bytes]] = deque()  # (relayed at, key ID, key)
        self.last_used = now
        self.refilling = False
        self.retry_at = 0.0

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:  # never the keys
        return f"KeyBuffer(ready={len(self._keys)}, target={self.target})"

    def expire(self, now: float) -> int:
        """Drop keys older than ``max_age``; how many were dropped."""
        dropped = 0
        while self._keys and self._keys[0][0] + self.max_age <= now:
            self._keys.popleft()
            dropped += 1
        return dropped

    def take(self, number: int, now: float) -> Ready | None:
        """``number`` ready keys (each leaves the buffer), or None if fewer are ready (nothing taken)."""
        self.last_used = now
        if len(self._keys) < number:
            return None
        return [self._keys.popleft()[1:] for _ in range(number)]

    def wanted(self, now: float) -> int:
        """Keys to relay now: none while a refill runs, after a failure until ``retry_at``, for a pair idle
        longer than ``idle``, or while fewer than a quarter of the target are missing (batches, not
        trickles); else what is missing, at most :data:`MAX_REFILL`."""
        if self.refilling or now < self.retry_at or now - self.last_used > self.idle:
            return 0
        missing = self.target - len(self._keys)
        if missing < max(1, self.target // 4):
            return 0
        return min(missing, MAX_REFILL)

    def add(self, keys: Ready, relayed_at: float) -> None:
        self._keys.extend((relayed_at, key_id, key) for key_id, key in keys)

    def failed(self, now: float) -> None:
        self.retry_at = now + RETRY_AFTER

    def clear(self) -> None:
        self._keys.clear()

    def oldest(self) -> float | None:
        """When the oldest ready key was relayed (None: none ready)."""
        return self._keys[0][0] if self._keys else None


Refill = Callable[[BufferKey, int], Awaitable[Ready]]


class Prefetcher:
    """The buffers of one origin KME and their refills (asyncio tasks calling ``refill``)."""

    def __init__(
        self,
        refill: Refill,
        *,
        max_age: float,
        idle: float,
        counts: Counter[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._refill = refill
        self.max_age = max_age
        self.idle = idle
        self._clock = clock
        self._buffers: dict[BufferKey, KeyBuffer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        # Keys by outcome: hit (handed out from a buffer), miss (relayed on demand), relayed (ahead),
        # expired (dropped unused from memory). RelayStats.prefetch when given (metrics, relay_stats()).
        self.counts: Counter[str] = counts if counts is not None else Counter()

    def ready(self, key: BufferKey) -> int:
        buffer = self._buffers.get(key)
        return len(buffer) if buffer is not None else 0

    def take(self, key: BufferKey, target: int, number: int) -> Ready | None:
        """``number`` keys ready for ``key`` (None: relay them on demand), and a refill when one is due.
        A request for more than ``target`` keys never uses the buffer."""
        if self._closed or target <= 0:
            return None
        now = self._clock()
        buffer = self._buffers.get(key)
        if buffer is None:
            if not self._room_for(key, now):
                self.counts["miss"] += number
                return None
            buffer = self._buffers[key] = KeyBuffer(target, self.max_age, self.idle, now)
        buffer.target = target
        self.counts["expired"] += buffer.expire(now)
        got = buffer.take(number, now) if number <= target else None
        self.counts["hit" if got is not None else "miss"] += number
        self._schedule(key, buffer, now)
        return got

    def _room_for(self, key: BufferKey, now: float) -> bool:
        """Whether a new buffer may start: at most :data:`MAX_PER_MASTER` per master SAE and
        :data:`MAX_BUFFERS` in all. When full, a buffer idle longer than ``idle`` (its keys dropped) makes
        room; else none, and the request goes on demand. A master SAE that cycles through sizes or slaves
        so makes the KME relay ahead at most MAX_PER_MASTER buffers' worth per ``idle`` seconds, not a
        buffer per request."""
        mine = [k for k in self._buffers if k.master == key.master]
        if len(mine) < MAX_PER_MASTER and len(self._buffers) < MAX_BUFFERS:
            return True
        candidates = mine if len(mine) >= MAX_PER_MASTER else list(self._buffers)
        idle = [
            k
            for k in candidates
            if not self._buffers[k].refilling and now - self._buffers[k].last_used > self.idle
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda k: self._buffers[k].last_used)
        self.counts["expired"] += len(self._buffers[oldest])
        self._buffers.pop(oldest).clear()
        return True

    def _schedule(self, key: BufferKey, buffer: KeyBuffer, now: float) -> None:
        number = buffer.wanted(now)
        if not number or self._closed:
            return
        buffer.refilling = True
        task = asyncio.get_running_loop().create_task(self._run(key, buffer, number), name="kme-prefetch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: BufferKey, buffer: KeyBuffer, number: int) -> None:
        started = self._clock()
        try:
            keys = await self._refill(key, number)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # RelayFailed, StoreError, ...: try again later, the requests go on demand
            buffer.failed(self._clock())
            log.info(
                "relaying keys ahead failed",
                extra={
                    "event": "relay.prefetch_failed",
                    "master_SAE_ID": key.master,
                    "slave_SAE_ID": key.slave,
                    "reason": getattr(exc, "message", type(exc).__name__),
                },
            )
        else:
            if self._closed or self._buffers.get(key) is not buffer:
                return  # evicted or shutting down: the keys are dropped (they expire at the slave's KME)
            buffer.add(keys, started)
            self.counts["relayed"] += len(keys)
            self._arm(started)
        finally:
            buffer.refilling = False
        now = self._clock()
        self.counts["expired"] += buffer.expire(now)
        self._schedule(key, buffer, now)

    def _arm(self, oldest: float) -> None:
        """Sweep when the key relayed at ``oldest`` reaches ``max_age``, unless a sweep is already due:
        ready keys leave memory on time even for a pair nobody asks for any more."""
        if self._sweeper is None and not self._closed:
            delay = max(oldest + self.max_age - self._clock(), 0.0) + 0.01
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self._clock()
        for key, buffer in list(self._buffers.items()):
            self.counts["expired"] += buffer.expire(now)
            if not len(buffer) and not buffer.refilling and now - buffer.last_used > self.idle:
                del self._buffers[key]
        times = [t for t in (b.oldest() for b in self._buffers.values()) if t is not None]
        if times:
            self._arm(min(times))

    async def close(self) -> None:
        """Stop refilling and drop every ready key."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for buffer in self._buffers.values():
            buffer.clear()
        self._buffers.clear()
