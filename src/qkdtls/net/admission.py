"""Which QKD offers a TLS-QKD server lets through to its KME, and what it remembers about offers.

A ClientHello is unauthenticated until the PSK binder is checked, and the binder can only be checked with the
key, which the server must first collect from its KME. So anyone who can open a TCP connection can make the
server ask its KME for a key. :class:`OfferGate` keeps that bounded and keeps single use in the server's
own hands (docs/tls-qkd.md §4):

* **before any KME request**, an offer is refused when its master SAE ID cannot be a peer (outside
  1..2^63-1, this server's own ID, not in ``allowed_peer_sae_ids`` when that is set, or a master the KME
  recently said it does not know), when the KME recently refused that very key, or when the key was already
  used here;
* **KME lookups are bounded**: at most ``max_lookups`` at once, ``max_lookups_per_source`` per peer address,
  and a peer address whose lookups keep failing (unknown keys, wrong binders) gets no more for a while
  (a token bucket charged on failures only, so a busy honest client is never slowed down);
* **single use**: a key ID is claimed while one handshake works on it, and remembered as used once its
  binder verified (or the reference handshake started with it) for ``used_key_memory`` seconds, whatever
  the KME says later: a KME may hand the same key out again (our KME within its re-collection window; the
  authors' KME never erases keys), and a replayed ClientHello must never be served a second time. An offer
  whose binder failed is *not* used: its key stays with the server for the right client.

Refusals refuse the offer, never the connection: ``preferred`` then completes classic TLS 1.3, ``required``
answers ``insufficient_security``. What strangers can trigger is logged through :class:`LogLimiter`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

# SAE IDs are signed 64-bit integers on the wire; peers of a TLS-QKD server must have positive ones
# (docs/tls-qkd.md §4): 0, negative IDs and the extremes are refused without asking the KME.
MIN_PEER_SAE_ID = 1
MAX_PEER_SAE_ID = 2**63 - 1
# Concurrent KME lookups for handshakes, in all and per peer address.
DEFAULT_MAX_LOOKUPS = 16
DEFAULT_MAX_LOOKUPS_PER_SOURCE = 4
# Failed lookups a peer address may cause in a burst, and how fast that allowance comes back (per second).
SOURCE_FAILURE_BURST = 8
SOURCE_FAILURE_RATE = 0.5
# KME refusals remembered (key, and master unknown to the KME), each for this long.
NEGATIVE_TTL = 60.0
NEGATIVE_LIMIT = 4096
# Key IDs used by this server: kept at least as long as a KME may hand a key out again. Our KME's
# reservation_ttl is 600 s by default and its re-collection window 60 s; set used_key_memory to at least the
# larger of the two if the KMEs are configured otherwise.
DEFAULT_USED_KEY_MEMORY = 900.0
USED_KEY_LIMIT = 65536
# Peer addresses whose lookup state is kept (the idle ones are dropped first).
SOURCE_LIMIT = 4096


class _TimedSet:
    """Keys remembered for a fixed time, oldest dropped first past ``limit`` (insertion order is expiry
    order because the time is fixed)."""

    def __init__(self, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self._limit = limit
        self._until: OrderedDict[Any, float] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._until:
            key, until = next(iter(self._until.items()))
            if until > now:
                return
            del self._until[key]

    def add(self, key: Any) -> bool:
        """Remember ``key``; False when an unexpired entry had to be dropped to make room."""
        now = time.monotonic()
        self._expire(now)
        self._until.pop(key, None)
        self._until[key] = now + self.ttl
        if len(self._until) > self._limit:
            self._until.popitem(last=False)
            return False
        return True

    def __contains__(self, key: Any) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._until[key]
            return False
        return True

    def __len__(self) -> int:
        self._expire(time.monotonic())
        return len(self._until)


class _Source:
    __slots__ = ("inflight", "stamp", "tokens")

    def __init__(self, now: float) -> None:
        self.inflight = 0
        self.tokens = float(SOURCE_FAILURE_BURST)
        self.stamp = now

    def refill(self, now: float) -> None:
        self.tokens = min(SOURCE_FAILURE_BURST, self.tokens + (now - self.stamp) * SOURCE_FAILURE_RATE)
        self.stamp = now


class OfferGate:
    """The server's bookkeeping of QKD offers: static checks, lookup bounds, KME refusals, used key IDs."""

    def __init__(
        self,
        *,
        own_sae_id: Callable[[], int | None],
        allowed: Callable[[], Collection[int] | None],
        max_lookups: int = DEFAULT_MAX_LOOKUPS,
        max_lookups_per_source: int = DEFAULT_MAX_LOOKUPS_PER_SOURCE,
        used_key_memory: float = DEFAULT_USED_KEY_MEMORY,
    ) -> None:
        self._own_sae_id = own_sae_id
        self._allowed = allowed
        self.max_lookups = max_lookups
        self.max_lookups_per_source = max_lookups_per_source
        self._lock = threading.Lock()
        self._used = _TimedSet(used_key_memory, USED_KEY_LIMIT)
        self._refused_keys = _TimedSet(NEGATIVE_TTL, NEGATIVE_LIMIT)
        self._unknown_masters = _TimedSet(NEGATIVE_TTL, NEGATIVE_LIMIT)
        self._claims: dict[str, threading.Event] = {}
        self._lookups = 0
        self._sources: dict[str, _Source] = {}

    def __repr__(self) -> str:
        return f"OfferGate(used={len(self._used)}, lookups={self._lookups})"

    # -- before anything -----------------------------------------------------------------------------------

    def refusal(self, master_sae_id: int, key_id: str) -> str | None:
        """Why this offer must not reach the KME (None: it may). Costs no KME request."""
        if not MIN_PEER_SAE_ID <= master_sae_id <= MAX_PEER_SAE_ID:
            return "master SAE ID out of range"
        if master_sae_id == self._own_sae_id():
            return "master SAE ID is this server's own"
        allowed = self._allowed()
        if allowed is not None and master_sae_id not in allowed:
            return "peer SAE not allowed"
        with self._lock:
            if master_sae_id in self._unknown_masters:
                return "master SAE ID unknown to the KME"
            if key_id in self._used:
                return "key already used"
            if (master_sae_id, key_id) in self._refused_keys:
                return "key recently refused by the KME"
        return None

    # -- single use ----------------------------------------------------------------------------------------

    def claim(self, key_id: str, wait: float = 0.0) -> bool:
        """Hold ``key_id`` for one handshake. A handshake already holding it is awaited up to ``wait``
        seconds (its binder may fail, which frees the key); False if the key is used or still held."""
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                if key_id in self._used:
                    return False
                holder = self._claims.get(key_id)
                if holder is None:
                    self._claims[key_id] = threading.Event()
                    return True
            left = deadline - time.monotonic()
            if left <= 0 or not holder.wait(left):
                return False

    def release(self, key_id: str, *, used: bool) -> bool:
        """End a claim; ``used``: the key served a handshake (binder verified), never to be served again.
        Returns False when remembering it pushed an older used key ID out early (memory full)."""
        kept = True
        with self._lock:
            if used:
                kept = self._used.add(key_id)
            holder = self._claims.pop(key_id, None)
        if holder is not None:
            holder.set()
        return kept

    def is_used(self, key_id: str) -> bool:
        with self._lock:
            return key_id in self._used

    # -- KME lookups ---------------------------------------------------------------------------------------

    def _source(self, source: str, now: float) -> _Source:
        state = self._sources.get(source)
        if state is None:
            if len(self._sources) >= SOURCE_LIMIT:
                self._prune(now)
            state = self._sources[source] = _Source(now)
        else:
            state.refill(now)
        return state

    def _prune(self, now: float) -> None:
        for name, state in list(self._sources.items()):
            state.refill(now)
            if state.inflight == 0 and state.tokens >= SOURCE_FAILURE_BURST:
                del self._sources[name]
        if len(self._sources) >= SOURCE_LIMIT:  # all busy or penalised: forget the oldest idle ones
            for name in [n for n, s in self._sources.items() if s.inflight == 0][: SOURCE_LIMIT // 4]:
                del self._sources[name]

    def start_lookup(self, source: str) -> str | None:
        """Take a lookup slot for ``source`` (None), or say why not (the offer is then refused)."""
        now = time.monotonic()
        with self._lock:
            state = self._source(source, now)
            if state.tokens < 1:
                return "too many failed lookups from this address"
            if self._lookups >= self.max_lookups:
                return "too many KME lookups at once"
            if state.inflight >= self.max_lookups_per_source:
                return "too many KME lookups at once from this address"
            self._lookups += 1
            state.inflight += 1
        return None

    def end_lookup(self, source: str) -> None:
        with self._lock:
            self._lookups -= 1
            state = self._sources.get(source)
            if state is not None:
                state.inflight -= 1

    def failed(self, source: str) -> None:
        """``source`` caused a failed lookup or a wrong binder: one token less."""
        now = time.monotonic()
        with self._lock:
            state = self._source(source, now)
            state.tokens = max(0.0, state.tokens - 1)

    def refused_by_kme(self, master_sae_id: int, key_id: str, *, master_unknown: bool) -> None:
        with self._lock:
            self._refused_keys.add((master_sae_id, key_id))
            if master_unknown:
                self._unknown_masters.add(master_sae_id)
