"""Where TLS-QKD connections get their keys: the SAE's KME, behind the policy that decides when to ask.

Client side: a key is fetched only when it can be used — never with policy ``off``, never for a server this
context has good reason to think cannot use it (:class:`NonQkdPeers`). Server side: the key named in a
ClientHello is collected with ``dec_keys`` once :class:`~qkdtls.net.admission.OfferGate` let the offer
through. Every KME call is bounded by the KME client's timeout; failures come back as
:mod:`qkdtls.net.errors` exceptions or, where the policy allows falling back, as ``None`` with a log line
saying why.

Both sides accept a key only when its holders, as the KME reports them (``key_extension``), are exactly the
master and the one slave of this connection: a key shared with a third SAE (ETSI 014 multicast,
``additional_slave_SAE_IDs``) would let that SAE pose as the master (RFC 9257 §4.2).

Key announcement (0xFEA9, docs/tls-qkd.md §4) takes the server's ``dec_keys`` off the handshake: a client
moves keys from its prefetch pool into a per-server queue (:class:`AnnouncedKeys`) and names them after a
handshake; the server collects them at once, in the background, into :class:`CollectedKeys`, where the next
handshakes find them. Both sides hold the keys for a bounded time only, and every key leaves its queue or
cache when it is used, so none is used twice.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NoReturn

from qkdtls.etsi014.client import KmeClient, KmeClientError, KmeRefused
from qkdtls.etsi014.models import Key, canonical_uuid
from qkdtls.logs import LogLimiter
from qkdtls.net.admission import (
    DEFAULT_MAX_LOOKUPS,
    DEFAULT_MAX_LOOKUPS_PER_SOURCE,
    DEFAULT_USED_KEY_MEMORY,
    OfferGate,
)
from qkdtls.net.errors import QKDConfigurationError, QKDKeyReplayed, QKDKeyUnavailable
from qkdtls.tls.config import QkdOffer
from qkdtls.tls.qkd_secure import MAX_ANNOUNCED_KEYS, MIN_KEY_BYTES, key_long_enough

log = logging.getLogger(__name__)
# Server-side refusals and KME failures: strangers can trigger them with forged ClientHellos.
_limited = LogLimiter(log)

# A server that answered a key offer with a verified classic handshake is offered no key for this long (it
# may be upgraded meanwhile), unless it proved it does TLS-QKD (below).
NON_QKD_MEMORY_SECONDS = 600.0
# A server that completed a TLS-QKD handshake with this context this recently is never taken for one that
# cannot do TLS-QKD: the handshake proved it (authenticated by the key). A TLS-QKD server also answers
# classically when it cannot use one key (its KME failed, or an overload bound was reached), which a
# stranger may provoke.
QKD_PEER_MEMORY_SECONDS = 3600.0
PEER_MEMORY_LIMIT = 4096
# Announced keys are offered for this long after the announcement. A key may have waited up to the prefetch
# pool's prefetch_max_age (300 s) before, so the sum stays below the KME's reservation TTL (600 s by
# default); and this stays below COLLECTED_KEY_TTL, the server's hold on what it collected, so a key the
# client still offers is one the server still holds (or has not collected yet: then dec_keys works).
ANNOUNCED_KEY_TTL = 120.0
COLLECTED_KEY_TTL = 180.0
# Keys collected ahead of use that one server context holds at most (key bytes in memory).
COLLECTED_KEY_LIMIT = 256


def holders_problem(key: Key, master_sae_id: int, slave_sae_id: int, *, allow_missing: bool) -> str | None:
    """Why ``key`` must not be used between this master and slave (None: it may).

    The holders are what the KME reports in ``key_extension`` (``master_SAE_ID``, ``slave_SAE_IDs``). A KME
    that reports none (a KME of another make) is refused unless ``allow_missing``: the context's
    ``allow_keys_without_holders=True`` says that KME is trusted to hand out two-party keys only.
    """
    ext = key.key_extension
    if ext is None or ("master_SAE_ID" not in ext and "slave_SAE_IDs" not in ext):
        return None if allow_missing else "the KME does not report the key's holders (key_extension)"
    master, slaves = ext.get("master_SAE_ID"), ext.get("slave_SAE_IDs")
    if not _is_int(master) or not isinstance(slaves, list) or not all(_is_int(s) for s in slaves):
        return "the KME reports the key's holders in an unknown form"
    if master != master_sae_id or slaves != [slave_sae_id]:
        return (
            f"the key is held by master {master} and slaves {slaves}, "
            f"not by {master_sae_id} and {slave_sae_id} alone"
        )
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class NonQkdPeers:
    """Client: servers (host, port) offered no key for a while, and servers known to do TLS-QKD.

    Only authenticated evidence counts. A completed TLS-QKD handshake (``qkd_answer``) proves a server does
    TLS-QKD. A classic answer to a key offer (``classic_answer``) counts only when the server's certificate
    was verified (the caller checks that) and the server has not proven TLS-QKD within
    ``QKD_PEER_MEMORY_SECONDS``. Failures (an alert, a reset, a handshake with someone who lacks the
    server's certificate key) never count: anyone on the path can cause them.
    """

    def __init__(self, ttl: float = NON_QKD_MEMORY_SECONDS) -> None:
        self._ttl = ttl
        self._until: dict[tuple[str, int], float] = {}
        self._did_qkd: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(host: str, port: int) -> tuple[str, int]:
        return (host.lower(), port)

    def remember(self, host: str, port: int) -> None:
        """Offer this server no key for the memory's time."""
        key = self._key(host, port)
        with self._lock:
            self._until[key] = time.monotonic() + self._ttl
            if len(self._until) > PEER_MEMORY_LIMIT:
                self._until.pop(next(iter(self._until)))

    def classic_answer(self, host: str, port: int) -> bool:
        """A verified classic handshake answered a key offer; True when the server is now remembered."""
        key = self._key(host, port)
        with self._lock:
            seen = self._did_qkd.get(key)
            if seen is not None and time.monotonic() - seen < QKD_PEER_MEMORY_SECONDS:
                return False
        self.remember(host, port)
        return True

    def qkd_answer(self, host: str, port: int) -> None:
        """A TLS-QKD handshake completed with this server."""
        key = self._key(host, port)
        with self._lock:
            self._until.pop(key, None)
            self._did_qkd.pop(key, None)
            self._did_qkd[key] = time.monotonic()
            if len(self._did_qkd) > PEER_MEMORY_LIMIT:
                self._did_qkd.popitem(last=False)

    def forget(self, host: str | None = None, port: int | None = None) -> None:
        with self._lock:
            if host is None:
                self._until.clear()
            else:
                self._until.pop(self._key(host, port or 0), None)

    def __contains__(self, peer: tuple[str, int]) -> bool:
        key = self._key(peer[0], peer[1])
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

    def put_back(self, master_sae_id: int, key_id: str, key: bytes) -> bool:
        """Keep a key taken for a handshake that did not use it (its binder failed): the client that holds
        the right key may still offer it. False when the cache is full (the key is then lost)."""
        with self._lock:
            self._expire()
            if key_id in self._entries or len(self._entries) >= self._limit:
                return False
            entry = _Collected(master_sae_id, time.monotonic() + self._ttl, key=key)
            entry.done.set()
            self._entries[key_id] = entry
            return True

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

    def __init__(
        self,
        kme: KmeClient | None,
        *,
        key_size: int | None = None,
        allow_keys_without_holders: bool = False,
        allowed_peers: Callable[[], Collection[int] | None] = lambda: None,
        max_kme_lookups: int = DEFAULT_MAX_LOOKUPS,
        max_kme_lookups_per_source: int = DEFAULT_MAX_LOOKUPS_PER_SOURCE,
        used_key_memory: float = DEFAULT_USED_KEY_MEMORY,
    ) -> None:
        self._kme = kme
        self._key_size = key_size
        self.allow_keys_without_holders = allow_keys_without_holders
        self._own_sae_id: int | None = None
        self._lock = threading.Lock()
        self.announced = AnnouncedKeys()
        self.collected = CollectedKeys()
        self.gate = OfferGate(
            own_sae_id=lambda: self._own_sae_id,
            allowed=allowed_peers,
            max_lookups=max_kme_lookups,
            max_lookups_per_source=max_kme_lookups_per_source,
            used_key_memory=used_key_memory,
        )
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

    # -- client side -------------------------------------------------------------------------------------

    def _check_own_key(self, key: Key, master: int, target_sae_id: int) -> None:
        if not key_long_enough(key.key):
            # The engine would refuse to offer it; refusing here keeps the policy paths (classic hello under
            # preferred, QKDKeyUnavailable under required) and never marks the server as one without QKD.
            log.warning(
                "KME key refused: shorter than a TLS-QKD key may be",
                extra={"event": "tls.key_too_short", "key_ID": key.key_ID, "bits": len(key.key) * 8},
            )
            raise QKDKeyUnavailable(
                f"KME key {key.key_ID} has {len(key.key) * 8} bits; TLS-QKD needs {MIN_KEY_BYTES * 8} or more"
            )
        problem = holders_problem(key, master, target_sae_id, allow_missing=self.allow_keys_without_holders)
        if problem is not None:
            log.warning(
                "KME key refused: its holders are not this SAE and the server alone",
                extra={"event": "tls.key_holders_refused", "key_ID": key.key_ID, "reason": problem},
            )
            raise QKDKeyUnavailable(f"KME key {key.key_ID} not usable: {problem}")

    def offer(self, target_sae_id: int, profiles: Sequence[str] | None = None) -> QkdOffer:
        """A fresh key shared with ``target_sae_id`` (from the prefetch pool when enabled).

        Raises :class:`QKDKeyUnavailable` (KME down, refusing, or out of keys, or a key whose holders are not
        this SAE and the target alone) within the KME timeout.
        """
        kme = self._require_kme()
        master = self.own_sae_id()
        started = time.monotonic()
        try:
            key = self._take_pooled(kme, target_sae_id) or kme.get_key(target_sae_id, self._key_size)
        except KmeClientError as exc:
            raise QKDKeyUnavailable(f"KME gave no key for SAE {target_sae_id}: {exc}") from None
        self._check_own_key(key, master, target_sae_id)
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
            try:
                self._check_own_key(key, master, target_sae_id)
            except QKDKeyUnavailable:
                continue
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

    # -- server side: keys announced ahead ---------------------------------------------------------------

    def collect_announced(self, master_sae_id: int, key_ids: Sequence[str]) -> None:
        """Server: collect announced keys with one ``dec_keys`` in a worker thread; returns at once.

        The announcement comes from a peer authenticated by the key of its connection, so it asks the KME
        without the lookup bounds of unauthenticated offers; keys already used here are skipped.
        """
        if self._kme is None:
            return
        fresh = [k for k in key_ids if canonical_uuid(k) == k and not self.gate.is_used(k)]
        reserved = self.collected.reserve(master_sae_id, fresh)
        if len(reserved) < len(key_ids):
            log.info(
                "announced keys not collected ahead: already known, used, or cache full",
                extra={"event": "tls.announce_skipped", "master_SAE_ID": master_sae_id,
                       "count": len(key_ids) - len(reserved)},
            )
        if not reserved:
            return
        with self._lock:
            if self._collector is None and not self._closing:
                self._collector = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qkd-collect")
            collector = self._collector
        try:
            if collector is None:
                raise RuntimeError("closed")
            collector.submit(self._collect_batch, master_sae_id, reserved)
        except RuntimeError:  # shut down meanwhile: the handshakes collect the keys themselves
            self.collected.fill(dict.fromkeys(reserved))

    def _collect_batch(self, master_sae_id: int, key_ids: list[str]) -> None:
        assert self._kme is not None
        found: dict[str, bytes | None] = dict.fromkeys(key_ids)
        started = time.monotonic()
        try:
            own = self.own_sae_id()
            container = self._kme.dec_keys(master_sae_id, key_ids)
        except Exception as exc:  # any failure: the handshakes that need these keys ask the KME themselves
            # Expected while the context (or the KME client under it) is being closed: not worth a warning.
            (log.debug if self._closing else log.warning)(
                "announced keys not collected",
                extra={"event": "tls.announce_not_collected", "master_SAE_ID": master_sae_id,
                       "count": len(key_ids), "reason": str(exc)},
            )
        else:
            for key in container.keys:
                if key.key_ID not in found:
                    continue
                problem = holders_problem(
                    key, master_sae_id, own, allow_missing=self.allow_keys_without_holders
                )
                if problem is None:
                    found[key.key_ID] = key.key
                else:
                    _limited(
                        logging.WARNING,
                        "announced key refused: its holders are not the peer and this SAE alone",
                        {"event": "tls.key_holders_refused", "key_ID": key.key_ID,
                         "master_SAE_ID": master_sae_id, "reason": problem},
                    )
            log.debug(
                "announced keys collected",
                extra={"event": "tls.announce_collected", "master_SAE_ID": master_sae_id,
                       "key_IDs": key_ids, "ms": round((time.monotonic() - started) * 1000, 3)},
            )
        finally:
            self.collected.fill(found)

    # -- server side: the key a ClientHello names ----------------------------------------------------------

    def admit(self, master_sae_id: int, key_id: str, source: str) -> OfferAdmission | None:
        """Server: may the offer of ``key_id`` by ``master_sae_id`` (from address ``source``) go further?

        Never asks the KME: None (refuse the offer, with a rate-limited log line) when there is no KME, the
        master cannot be a peer, or the KME recently refused the key (see :class:`OfferGate`); raises
        :class:`QKDKeyReplayed` when this server already used the key.
        """
        if self._kme is None:
            _limited(logging.WARNING, "QKD offer ignored: no KME configured",
                     {"event": "tls.no_kme", "key_ID": key_id})
            return None
        reason = "malformed key ID" if canonical_uuid(key_id) != key_id else None
        reason = reason or self.gate.refusal(master_sae_id, key_id)
        if reason == "key already used":
            self._replayed(master_sae_id, key_id, source)
        if reason is not None:
            _limited(
                logging.WARNING if reason == "peer SAE not allowed" else logging.INFO,
                "QKD offer refused before any KME request",
                {"event": "tls.offer_refused", "reason": reason, "master_SAE_ID": master_sae_id,
                 "key_ID": key_id, "peer": source},
            )
            return None
        return OfferAdmission(self, master_sae_id, key_id, source)

    def obtain(self, admission: OfferAdmission) -> bytes | None:
        """Server, blocking: the key of an admitted offer (see :meth:`OfferAdmission.obtain`). The adapters
        call this, the one place where a handshake waits for the server's KME."""
        return admission.obtain()

    def _replayed(self, master_sae_id: int, key_id: str, source: str) -> NoReturn:
        _limited(
            logging.WARNING, "QKD offer refused: the key was already used here (a replayed ClientHello)",
            {"event": "tls.key_replayed", "master_SAE_ID": master_sae_id, "key_ID": key_id, "peer": source},
        )
        raise QKDKeyReplayed(f"the ClientHello names QKD key {key_id}, already used by this server")

    def _lookup(self, master_sae_id: int, key_id: str, source: str, *, bounded: bool = True) -> bytes | None:
        """One ``dec_keys`` for ``key_id`` (within the gate's bounds), the holders checked."""
        kme = self._kme
        assert kme is not None
        try:
            own = self.own_sae_id()
        except QKDKeyUnavailable as exc:
            _limited(logging.WARNING, "QKD key not collected",
                     {"event": "tls.key_not_collected", "key_ID": key_id, "reason": str(exc)})
            return None
        # Checked again: the gate could not know the own ID before the first lookup, and a KME answer to
        # another handshake (a master it does not know, this very key refused) may have come in meanwhile.
        reason = "master SAE ID is this server's own" if master_sae_id == own else None
        reason = reason or self.gate.refusal(master_sae_id, key_id)
        if reason is not None:
            _limited(
                logging.INFO, "QKD offer refused before any KME request",
                {"event": "tls.offer_refused", "reason": reason, "master_SAE_ID": master_sae_id,
                 "key_ID": key_id, "peer": source},
            )
            return None
        if bounded:
            busy = self.gate.start_lookup(source)
            if busy is not None:
                _limited(
                    logging.WARNING, "QKD offer refused: KME lookups bounded",
                    {"event": "tls.lookup_refused", "reason": busy, "peer": source, "key_ID": key_id},
                )
                return None
        try:
            container = kme.dec_keys(master_sae_id, [key_id])
        except KmeRefused as exc:
            self.gate.refused_by_kme(
                master_sae_id, key_id, master_unknown=_names_unknown_master(exc, master_sae_id)
            )
            self.gate.failed(source)
            _limited(
                logging.WARNING, "QKD key not collected",
                {"event": "tls.key_not_collected", "key_ID": key_id, "master_SAE_ID": master_sae_id,
                 "peer": source, "reason": str(exc)},
            )
            return None
        except KmeClientError as exc:  # unreachable or failing KME: not the key's fault, not remembered
            _limited(
                logging.WARNING, "QKD key not collected",
                {"event": "tls.key_not_collected", "key_ID": key_id, "master_SAE_ID": master_sae_id,
                 "peer": source, "reason": str(exc)},
            )
            return None
        finally:
            if bounded:
                self.gate.end_lookup(source)
        for key in container.keys:
            if key.key_ID != key_id:
                continue
            problem = holders_problem(key, master_sae_id, own, allow_missing=self.allow_keys_without_holders)
            if problem is None:
                return key.key
            self.gate.refused_by_kme(master_sae_id, key_id, master_unknown=False)
            self.gate.failed(source)
            _limited(
                logging.WARNING, "QKD key refused: its holders are not the peer and this SAE alone",
                {"event": "tls.key_holders_refused", "key_ID": key_id, "master_SAE_ID": master_sae_id,
                 "peer": source, "reason": problem},
            )
            return None
        return None  # dec_keys checks that the answer names exactly the keys asked for

    def collect_rekey(self, master_sae_id: int, key_id: str) -> bytes | None:
        """Server: the key of a QKD rekey, asked for by a peer authenticated by its connection's key.

        Single use and holders are checked as for a handshake; the lookup bounds are not applied (the peer
        is authenticated, and one connection has one rekey in flight at a time).
        """
        if self._kme is None or canonical_uuid(key_id) != key_id:
            return None
        timeout = self._kme.settings.timeout
        if not self.gate.claim(key_id, wait=timeout):
            _limited(logging.WARNING, "QKD rekey key refused: already used",
                     {"event": "tls.offer_refused", "reason": "key already used", "key_ID": key_id})
            return None
        key: bytes | None = None
        try:
            key = self.collected.take(master_sae_id, key_id, wait=timeout)
            if key is None:
                key = self._lookup(master_sae_id, key_id, "rekey", bounded=False)
        finally:
            self.gate.release(key_id, used=key is not None)
        return key

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


_UNKNOWN = re.compile(r"\bunknown\b", re.IGNORECASE)


def _names_unknown_master(exc: KmeRefused, master_sae_id: int) -> bool:
    """The KME refused because it does not know the master SAE (our KME: 400 "master SAE ID N is
    unknown"). Anything else (a key not found, say) is about the key, not the master."""
    message = exc.message or ""
    named = re.search(rf"(?<![\d-]){master_sae_id}(?!\d)", message) is not None
    return named and _UNKNOWN.search(message) is not None


class OfferAdmission:
    """Server: one admitted offer, from claim to outcome. Used by the adapters as::

        admission = keys.admit(master, key_id, peer)            # None: refuse the offer
        key = keys.obtain(admission)  (or admission.take_cached())   # None: refuse the offer
        session.provide_qkd_key(key) ... admission.settle(binder_ok)

    ``settle`` must follow every key obtained: a verified binder (or a reference handshake started) makes
    the key used for good; a failed binder puts it back for the client that holds the right key. A
    connection that ends before the key reached the engine calls ``abandon`` (the key goes back unused).
    """

    def __init__(self, keys: KeySource, master_sae_id: int, key_id: str, source: str) -> None:
        self._keys = keys
        self.master_sae_id = master_sae_id
        self.key_id = key_id
        self.source = source
        self._key: bytes | None = None
        self._claimed = False
        self._abandoned = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OfferAdmission(key_ID={self.key_id!r}, have_key={self._key is not None})"

    def take_cached(self) -> bytes | None:
        """Without blocking: the key if it was collected ahead and no other handshake holds its ID."""
        gate = self._keys.gate
        if not gate.claim(self.key_id):
            return None
        key = self._keys.collected.take(self.master_sae_id, self.key_id)
        if key is None:
            gate.release(self.key_id, used=False)
            return None
        with self._lock:
            self._claimed, self._key = True, key
        return key

    def obtain(self) -> bytes | None:
        """Blocking (a worker thread under asyncio): the key from the cache or one bounded ``dec_keys``.

        Another handshake working on the same key ID is awaited (within the KME timeout): if its binder
        fails, the key comes back to the cache for this one; if it used the key, :class:`QKDKeyReplayed`.
        """
        keys = self._keys
        assert keys.kme is not None
        timeout = keys.kme.settings.timeout
        if not keys.gate.claim(self.key_id, wait=timeout):
            keys._replayed(self.master_sae_id, self.key_id, self.source)
        key: bytes | None = None
        try:
            key = keys.collected.take(self.master_sae_id, self.key_id, wait=timeout)
            if key is None:
                key = keys._lookup(self.master_sae_id, self.key_id, self.source)
        finally:
            if key is None:
                keys.gate.release(self.key_id, used=False)
        if key is None:
            return None
        with self._lock:
            self._claimed, self._key = True, key
            abandoned = self._abandoned
        if abandoned:  # the connection ended while the KME answered
            self._finish(used=False, charge=False)
            return None
        return key

    def settle(self, binder_ok: bool) -> None:
        """The engine's verdict on the key handed to it: used (``binder_ok``) or wrong binder."""
        self._finish(used=binder_ok, charge=not binder_ok)

    def abandon(self) -> None:
        """The connection ended before the key reached the engine: the key goes back unused (now, or when
        a lookup still running ends)."""
        with self._lock:
            self._abandoned = True
        self._finish(used=False, charge=False)

    def _finish(self, *, used: bool, charge: bool) -> None:
        with self._lock:
            if not self._claimed:
                return
            self._claimed = False
            key, self._key = self._key, None
        keys = self._keys
        if not used and key is not None:
            if charge:
                keys.gate.failed(self.source)
            kept = keys.collected.put_back(self.master_sae_id, self.key_id, key)
            if charge:
                _limited(
                    logging.WARNING, "QKD offer with a wrong PSK binder: the key is kept for its owner",
                    {"event": "tls.binder_failed", "key_ID": self.key_id,
                     "master_SAE_ID": self.master_sae_id, "peer": self.source, "kept": kept},
                )
        if not keys.gate.release(self.key_id, used=used):
            _limited(
                logging.WARNING, "used-key memory full: older key IDs forgotten early",
                {"event": "tls.used_keys_full"},
            )
