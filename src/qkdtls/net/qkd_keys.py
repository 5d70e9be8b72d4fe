"""Where TLS-QKD connections get their keys: the SAE's KME, behind the policy that decides when to ask.

Client side: a key is fetched only when it can be used — never with policy ``off``, never for a server this
context has seen refuse QKD (the authors' client spent a KME key on every fallback connection). Server side:
the key named in a ClientHello is collected with ``dec_keys``. Every KME call is bounded by the KME client's
timeout; failures come back as :mod:`qkdtls.net.errors` exceptions or, where the policy allows falling back,
as ``None`` with a log line saying why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from qkdtls.etsi014.client import KmeClient, KmeClientError
from qkdtls.net.errors import QKDConfigurationError, QKDKeyUnavailable
from qkdtls.tls.config import QkdOffer

log = logging.getLogger(__name__)

# A server that refused QKD is tried again after this long: it may have been upgraded meanwhile.
NON_QKD_MEMORY_SECONDS = 600.0


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


class KeySource:
    """The SAE's view of its KME for TLS: offers for clients, collected keys for servers, rekey keys."""

    def __init__(self, kme: KmeClient | None, *, key_size: int | None = None) -> None:
        self._kme = kme
        self._key_size = key_size
        self._own_sae_id: int | None = None
        self._lock = threading.Lock()

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
            key = kme.get_key(target_sae_id, self._key_size)
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

    def collect(self, master_sae_id: int, key_id: str) -> bytes | None:
        """Server: the key ``key_id`` the master SAE announced, or None if the KME cannot give it."""
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

    def _require_kme(self) -> KmeClient:
        if self._kme is None:
            raise QKDConfigurationError("TLS-QKD needs a KME: pass kme= to QKDContext (or use qkd='off')")
        return self._kme
