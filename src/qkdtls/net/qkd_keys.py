"""Where TLS-QKD connections get their keys: the SAE's KME, behind the policy that decides when to ask.

Client side: a key is fetched only when it can be used — never with policy ``off``, never for a server this
context has seen refuse QKD (the authors' client spent a KME key on every fallback connection). Server side:
the key named in a ClientHello is collected with ``dec_keys``. Every KME call is bounded by the KME client's
timeout; failures come back as :mod:`qkdtls.net.errors` exceptions or, where the policy allows falling back,
as ``None`` with a log line saying why.

Key announcement (0xFEA9, docs/tls-qkd.md §4) takes the server's ``dec_keys`` off the handshake: a client
moves keys from its prefetch pool into a per-server queue (:class:`AnnouncedKeys`) and names them after a
handshake; the server collects them at once, in the background, into :class:`CollectedKeys`, where the next
handshakes find them. Both sides hold the keys for a bounded time only, and every key leaves its queue or
cache when it is used, so none is used twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qkdtls.etsi014.client import KmeClient, KmeClientError
from qkdtls.etsi014.models import Key
from qkdtls.net.errors import QKDConfigurationError, QKDKeyUnavailable
from qkdtls.tls.config import QkdOffer
from qkdtls.tls.qkd_secure import MAX_ANNOUNCED_KEYS

log = logging.getLogger(__name__)

# A server that refused QKD is tried again after this long: it may have been upgraded meanwhile.
NON_QKD_MEMORY_SECONDS = 600.0
# Announced keys are offered for this long after the announcement. A key may have waited up to the prefetch
# pool's prefetch_max_age (300 s) before, so the sum stays below the KME's reservation TTL (600 s by
# default); and this stays below COLLECTED_KEY_TTL, the server's hold on what it collected, so a key the
# client still offers is one the server still holds (or has not collected yet: then dec_keys works).
ANNOUNCED_KEY_TTL = 120.0
COLLECTED_KEY_TTL = 180.0
# Keys collected ahead of use that one server context holds at most (key bytes in memory).
COLLECTED_KEY_LIMIT = 256


class NonQkdPeers:
    """Servers (host, port) that completed a classic handshake although a QKD key was offered."""

    def __init__(self, ttl: float = NON_QKD_MEMORY_SECONDS) -> None:
        self._ttl = ttl
        self._until: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def remember(self, host: str, port: int) -> None:
        with self._lock:
            self._until[(host.lower(), port)] = time.monotonic() + self._ttl

    def forget(self, host: str | None = None, port: int | None = None) -> None:
        with self._lock:
            if host is None:
                self._until.clear()
            else:
                self._until.pop((host.lower(), port or 0), None)

    def __contains__(self, peer: tuple[str, int]) -> bool:
        key = (peer[0].lower(), peer[1])
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return False
            if until < time.monotonic():
                del self._until[key]
                return False
            return True


class AnnouncedKeys:
    """Client: per server (host, port), keys announced to it and not used yet, oldest first."""

    def __init__(self, ttl: float = ANNOUNCED_KEY_TTL) -> None:
        self._ttl = ttl
        self._queues: dict[tuple[str, int], deque[tuple[float, int, QkdOffer]]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AnnouncedKeys(servers={len(self._queues)})"

    def _fresh(self, peer: tuple[str, int]) -> deque[tuple[float, int, QkdOffer]]:
        queue = self._queues.setdefault((peer[0].lower(), peer[1]), deque())
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            queue.popleft()
        return queue

    def take(self, host: str, port: int, target_sae_id: int) -> QkdOffer | None:
        """The oldest fresh key announced to this server for ``target_sae_id``; it leaves the queue."""
        with self._lock:
            queue = self._fresh((host, port))
            if queue and queue[0][1] == target_sae_id:
                return queue.popleft()[2]
            if queue:
                queue.clear()  # announced for another SAE ID: the directory changed, the keys are useless
            return None

    def count(self, host: str, port: int) -> int:
        with self._lock:
            return len(self._fresh((host, port)))

    def add(self, host: str, port: int, target_sae_id: int, offers: Sequence[QkdOffer]) -> None:
        expires = time.monotonic() + self._ttl
        with self._lock:
            self._fresh((host, port)).extend((expires, target_sae_id, offer) for offer in offers)

    def drop(self, host: str, port: int) -> int:
        """Forget every key announced to this server (it could not use one); how many were dropped."""
        with self._lock:
            queue = self._queues.pop((host.lower(), port), None)
            return len(queue) if queue else 0


@dataclass
class _Collected:
    master_sae_id: int
    expires: float
    done: threading.Event = field(default_factory=threading.Event)
    key: bytes | None = field(default=None, repr=False)


class CollectedKeys:
    """Server: keys collected ahead of use (key ID → key), each taken once, bounded in number and age."""

    def __init__(self, ttl: float = COLLECTED_KEY_TTL, limit: int = COLLECTED_KEY_LIMIT) -> None:
        self._ttl = ttl
        self._limit = limit
        self._entries: dict[str, _Collected] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CollectedKeys(entries={len(self._entries)})"

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    @property
    def collecting(self) -> int:
        """Keys whose collection is still running."""
        with self._lock:
            return sum(1 for entry in self._entries.values() if not entry.done.is_set())

    def _expire(self) -> None:
        now = time.monotonic()
        for key_id in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[key_id]  # collected and never used: the key is lost (docs/tls-qkd.md §5)

    def reserve(self, master_sae_id: int, key_ids: Sequence[str]) -> list[str]:
        """Mark ``key_ids`` as being collected; returns those newly reserved (within the size limit)."""
        expires = time.monotonic() + self._ttl
        reserved = []
        with self._lock:
            self._expire()
            for key_id in key_ids:
                if key_id in self._entries or len(self._entries) >= self._limit:
                    continue
                self._entries[key_id] = _Collected(master_sae_id, expires)
                reserved.append(key_id)
        return reserved

    def fill(self, keys: dict[str, bytes | None]) -> None:
        """The outcome of a collection: the key, or None where the KME did not give it."""
        with self._lock:
            for key_id, key in keys.items():
                entry = self._entries.get(key_id)
                if entry is None:
                    continue
                if key is None:
                    del self._entries[key_id]
                else:
                    entry.key = key
                entry.done.set()

    def take(self, master_sae_id: int, key_id: str, wait: float = 0.0) -> bytes | None:
        """The key if it was collected for this master (it leaves the cache); None if it is not here.

        A collection still running is awaited up to ``wait`` seconds (0: never block).
        """
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is None or entry.master_sae_id != master_sae_id:
                return None
        if not entry.done.is_set() and (wait <= 0 or not entry.done.wait(wait)):
            return None
        with self._lock:
            current = self._entries.get(key_id)
            if current is not entry or entry.key is None or entry.expires <= time.monotonic():
                return None
            del self._entries[key_id]
            return entry.key


class KeySource:
    """The SAE's view of its KME for TLS: offers for clients, collected keys for servers, rekey keys."""

    def __init__(self, kme: KmeClient | None, *, key_size: int | None = None) -> None:
        self._kme = kme
        self._key_size = key_size
        self._own_sae_id: int | None = None
        self._lock = threading.Lock()
        self.announced = AnnouncedKeys()
        self.collected = CollectedKeys()
        self._collector: ThreadPoolExecutor | None = None
        self._closing = False
        # Held while a pooled key is taken (never across a KME request): see _take_pooled.
        self._pool_lock = threading.Lock()

    @property
    def kme(self) -> KmeClient | None:
        return self._kme

    def own_sae_id(self) -> int:
        """This SAE's ID as its KME knows it (``GET /api/v1/sae/info/me``, cached)."""
        kme = self._require_kme()
        if self._own_sae_id is None:
            try:
                info = kme.sae_info()
            except KmeClientError as exc:
                raise QKDKeyUnavailable(f"cannot learn this SAE's ID from the KME: {exc}") from None
            with self._lock:
                self._own_sae_id = int(info.SAE_ID)
        return self._own_sae_id

    def offer(self, target_sae_id: int, profiles: Sequence[str] | None = None) -> QkdOffer:
        """A fresh key shared with ``target_sae_id`` (from the prefetch pool when enabled).

        Raises :class:`QKDKeyUnavailable` (KME down, refusing, or out of keys) within the KME timeout.
        """
        kme = self._require_kme()
        master = self.own_sae_id()
        started = time.monotonic()
        try:
            key = self._take_pooled(kme, target_sae_id) or kme.get_key(target_sae_id, self._key_size)
        except KmeClientError as exc:
            raise QKDKeyUnavailable(f"KME gave no key for SAE {target_sae_id}: {exc}") from None
        log.debug(
            "QKD key obtained",
            extra={
                "event": "tls.key_obtained",
                "key_ID": key.key_ID,
                "slave_SAE_ID": target_sae_id,
                "ms": round((time.monotonic() - started) * 1000, 3),
            },
        )
        return QkdOffer(
            key_id=key.key_ID,
            key=key.key,
            master_sae_id=master,
            profiles=tuple(profiles) if profiles is not None else None,
        )

    @property
    def prefetching(self) -> bool:
        """The KME client keeps a prefetch pool (the source of keys to announce)."""
        return self._kme is not None and self._kme.settings.prefetch > 0

    def prepare_announcement(
        self, host: str, port: int, target_sae_id: int, depth: int, profiles: Sequence[str] | None = None
    ) -> list[str]:
        """Client: move pooled keys into the server's announced queue; the IDs to announce (maybe none).

        The queue is topped up to ``depth`` once it is down to half of it, as the prefetch pool is: the
        server then collects several keys with one ``dec_keys`` instead of one per connection. Only keys
        already in the pool are moved (no KME request here): announcing must never slow a connection down.
        """
        kme = self._kme
        if kme is None or depth <= 0:
            return []
        master = self._own_sae_id  # known: this client just offered a key
        queued = self.announced.count(host, port)
        if master is None or queued > depth // 2:
            return []
        missing = min(depth - queued, MAX_ANNOUNCED_KEYS)
        offers: list[QkdOffer] = []
        for _ in range(max(0, missing)):
            key = self._take_pooled(kme, target_sae_id)
            if key is None:
                break
            offers.append(
                QkdOffer(
                    key_id=key.key_ID,
                    key=key.key,
                    master_sae_id=master,
                    profiles=tuple(profiles) if profiles is not None else None,
                    announced=True,
                )
            )
        self.announced.add(host, port, target_sae_id, offers)
        return [offer.key_id for offer in offers]

    def _take_pooled(self, kme: KmeClient, target_sae_id: int) -> Key | None:
        """A key from the prefetch pool, or None when it is empty: never a KME request.

        The KME client takes from its pool or, when it is empty, asks the KME; checking the pool and taking
        under one lock that every taker of this context holds keeps the second case out (the asyncio adapter
        announces on the event loop). A KME client shared with code outside this context could still empty
        the pool in between; then this call waits for one enc_keys, within the KME timeout.
        """
        with self._pool_lock:
            if kme.prefetch_available(target_sae_id, self._key_size) < 1:
                return None
            try:
                return kme.get_key(target_sae_id, self._key_size)
            except KmeClientError:
                return None

    def collect_announced(self, master_sae_id: int, key_ids: Sequence[str]) -> None:
        """Server: collect announced keys with one ``dec_keys`` in a worker thread; returns at once."""
        if self._kme is None:
            return
        reserved = self.collected.reserve(master_sae_id, key_ids)
        if len(reserved) < len(key_ids):
            log.info(
                "announced keys not collected ahead: already known or cache full",
                extra={"event": "tls.announce_skipped", "master_SAE_ID": master_sae_id,
                       "count": len(key_ids) - len(reserved)},
            )
        if not reserved:
            return
        with self._lock:
            if self._collector is None:
                self._collector = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qkd-collect")
            collector = self._collector
        try:
            collector.submit(self._collect_batch, master_sae_id, reserved)
        except RuntimeError:  # shut down meanwhile: the handshakes collect the keys themselves
            self.collected.fill(dict.fromkeys(reserved))

    def _collect_batch(self, master_sae_id: int, key_ids: list[str]) -> None:
        assert self._kme is not None
        found: dict[str, bytes | None] = dict.fromkeys(key_ids)
        started = time.monotonic()
        try:
            container = self._kme.dec_keys(master_sae_id, key_ids)
        except Exception as exc:  # any failure: the handshakes that need these keys ask the KME themselves
            # A collection cut short by close() is expected at shutdown, not worth a warning.
            (log.debug if self._closing else log.warning)(
                "announced keys not collected",
                extra={"event": "tls.announce_not_collected", "master_SAE_ID": master_sae_id,
                       "count": len(key_ids), "reason": str(exc)},
            )
        else:
            for key in container.keys:
                if key.key_ID in found:
                    found[key.key_ID] = key.key
            log.debug(
                "announced keys collected",
                extra={"event": "tls.announce_collected", "master_SAE_ID": master_sae_id,
                       "key_IDs": key_ids, "ms": round((time.monotonic() - started) * 1000, 3)},
            )
        finally:
            self.collected.fill(found)

    def take_collected(self, master_sae_id: int, key_id: str) -> bytes | None:
        """Server: the key if it was collected ahead (without blocking), else None."""
        return self.collected.take(master_sae_id, key_id)

    def collect(self, master_sae_id: int, key_id: str) -> bytes | None:
        """Server: the key ``key_id`` the master SAE named, or None if the KME cannot give it.

        A key collected ahead (announced) is used first; a collection of it still running is awaited
        within the KME timeout; otherwise one ``dec_keys`` asks for it now.
        """
        if self._kme is not None:
            key = self.collected.take(master_sae_id, key_id, wait=self._kme.settings.timeout)
            if key is not None:
                return key
        if self._kme is None:
            log.warning(
                "QKD offer ignored: no KME configured", extra={"event": "tls.no_kme", "key_ID": key_id}
            )
            return None
        try:
            container = self._kme.dec_keys(master_sae_id, [key_id])
        except KmeClientError as exc:
            log.warning(
                "QKD key not collected",
                extra={
                    "event": "tls.key_not_collected",
                    "key_ID": key_id,
                    "master_SAE_ID": master_sae_id,
                    "reason": str(exc),
                },
            )
            return None
        for key in container.keys:
            if key.key_ID == key_id:
                return key.key
        log.warning(
            "KME answered without the requested key",
            extra={"event": "tls.key_not_collected", "key_ID": key_id, "master_SAE_ID": master_sae_id},
        )
        return None

    def close(self) -> None:
        """Stop the background collector (keys being collected are then asked for by their handshakes)."""
        with self._lock:
            self._closing = True
            collector, self._collector = self._collector, None
        if collector is not None:
            collector.shutdown(wait=False, cancel_futures=True)

    def _require_kme(self) -> KmeClient:
        if self._kme is None:
            raise QKDConfigurationError("TLS-QKD needs a KME: pass kme= to QKDContext (or use qkd='off')")
        return self._kme
