"""QKDContext: the TLS-QKD counterpart of :class:`ssl.SSLContext`.

A context holds what is shared by many connections: certificates, trust, the QKD policy and profiles, the
SAE's KME client (kept-alive connections, optional prefetch pool), the host → SAE directory, the memory of
servers that cannot do QKD, the rekey limits, the keys announced ahead of use (client: the queues per
server; server: the keys collected in the background), and the server's access control and bookkeeping of
QKD offers (allowed peer SAEs, KME lookup bounds, used key IDs). It builds the sans-I/O engines
(``client_config()``, ``server_config()``) and wraps sockets the way ``SSLContext.wrap_socket`` does.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import ssl
import threading
import warnings
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from qkdtls.etsi014.client import KmeClient, KmeClientError, KmeClientSettings
from qkdtls.net.admission import (
    DEFAULT_MAX_LOOKUPS,
    DEFAULT_MAX_LOOKUPS_PER_SOURCE,
    DEFAULT_USED_KEY_MEMORY,
    MAX_PEER_SAE_ID,
    MIN_PEER_SAE_ID,
)
from qkdtls.net.directory import SaeDirectory
from qkdtls.net.errors import QKDConfigurationError, QKDKeyUnavailable
from qkdtls.net.qkd_keys import KeySource, NonQkdPeers
from qkdtls.tls.config import QKD_POLICIES, QKD_PROFILES, ClientConfig, QkdOffer, ServerConfig
from qkdtls.tls.qkd_secure import MAX_ANNOUNCED_KEYS

if TYPE_CHECKING:
    from qkdtls.net.socket import QKDSocket

log = logging.getLogger(__name__)

Purpose = Literal["client", "server"]


class PreparedOffer:
    """A client's KME work for one connection, done before connecting (:meth:`QKDContext.prepare_offer`).

    ``offer`` is the key to name in the ClientHello (None: a classic ClientHello); ``resolved`` is False
    when the target SAE is not known until the peer's address is (the handshake then decides). Taken once.
    """

    def __init__(
        self,
        host: str | None,
        port: int | None,
        server_hostname: str | None,
        target_sae_id: int | None,
        offer: QkdOffer | None,
        *,
        resolved: bool,
    ) -> None:
        self.host = host
        self.port = port
        self.server_hostname = server_hostname
        self.target_sae_id = target_sae_id
        self.resolved = resolved
        self._offer = offer
        self._taken = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        key = self._offer.key_id if self._offer is not None else None
        return f"PreparedOffer({self.host}:{self.port}, target_SAE_ID={self.target_sae_id}, key_ID={key})"

    def take(self) -> QkdOffer | None:
        """The offer, once: a key must never be named in two ClientHellos."""
        with self._lock:
            if self._taken:
                raise ValueError("this prepared offer was already used for a connection")
            self._taken = True
            offer, self._offer = self._offer, None
        return offer


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise QKDConfigurationError(f"cannot read certificates from {path}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise QKDConfigurationError(f"{path} holds no PEM certificate") from None
    return certs


def _load_private_key(path: Path) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise QKDConfigurationError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # The key bytes stay out of the message; the path is enough to find the problem.
        raise QKDConfigurationError(f"{path} is not an unencrypted PEM private key") from None


class QKDContext:
    """Settings shared by TLS-QKD connections (client or server side)."""

    def __init__(
        self,
        purpose: Purpose,
        *,
        kme: KmeClientSettings | KmeClient | None = None,
        qkd: str = "preferred",
        profiles: Sequence[str] = ("secure",),
        certfile: Path | str | None = None,
        keyfile: Path | str | None = None,
        cafile: Path | str | None = None,
        check_hostname: bool = True,
        alpn_protocols: Sequence[str] = (),
        sae_directory: Mapping[str, int] | Path | str | None = None,
        prefetch: int = 0,
        rekey_after_bytes: int | None = None,
        rekey_after_seconds: float | None = None,
        handshake_timeout: float = 10.0,
        announce_keys: int = 4,
        accept_key_announcements: bool = False,
        allowed_peer_sae_ids: Collection[int] | None = None,
        allow_keys_without_holders: bool = False,
        max_kme_lookups: int = DEFAULT_MAX_LOOKUPS,
        max_kme_lookups_per_source: int = DEFAULT_MAX_LOOKUPS_PER_SOURCE,
        used_key_memory: float = DEFAULT_USED_KEY_MEMORY,
    ) -> None:
        if purpose not in ("client", "server"):
            raise ValueError("purpose must be 'client' or 'server'")
        if qkd not in QKD_POLICIES:
            raise ValueError(f"qkd must be one of {', '.join(QKD_POLICIES)}")
        profiles = tuple(profiles)
        if not profiles or any(p not in QKD_PROFILES for p in profiles):
            raise ValueError(f"profiles must be a non-empty subset of {', '.join(QKD_PROFILES)}")
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        if rekey_after_bytes is not None and rekey_after_bytes <= 0:
            raise ValueError("rekey_after_bytes must be positive")
        if rekey_after_seconds is not None and rekey_after_seconds <= 0:
            raise ValueError("rekey_after_seconds must be positive")
        if not 0 <= announce_keys <= MAX_ANNOUNCED_KEYS:
            raise ValueError(f"announce_keys must be between 0 and {MAX_ANNOUNCED_KEYS}")
        if max_kme_lookups < 1 or max_kme_lookups_per_source < 1:
            raise ValueError("max_kme_lookups and max_kme_lookups_per_source must be at least 1")
        if used_key_memory <= 0:
            raise ValueError("used_key_memory must be positive")
        self.purpose: Purpose = purpose
        self.qkd = qkd
        self.profiles: tuple[str, ...] = profiles
        self.check_hostname = check_hostname
        self.verify = True
        self.alpn_protocols: tuple[str, ...] = tuple(alpn_protocols)
        self.directory = SaeDirectory.coerce(sae_directory)
        self.rekey_after_bytes = rekey_after_bytes
        self.rekey_after_seconds = rekey_after_seconds
        self.handshake_timeout = handshake_timeout
        # Client: keys announced to a server and kept for it (only with a prefetch pool; 0 = never announce).
        self.announce_keys = announce_keys
        # Server: accept announcements and collect the keys ahead. Only correct when this process is the only
        # one serving its SAE ID (behind a load balancer another instance would find the keys collected).
        self.accept_key_announcements = accept_key_announcements
        self.allowed_peer_sae_ids = allowed_peer_sae_ids
        self.non_qkd_peers = NonQkdPeers()
        self._certificate_chain: list[x509.Certificate] = []
        self._private_key: Any = None
        self._certfile: Path | None = None
        self._keyfile: Path | None = None
        self._trust: list[x509.Certificate] | None = None
        self._cafile: Path | None = None
        self._classic_context: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._release_kme: Callable[[], Any] | None = None
        client, owned = self._make_kme(kme, prefetch)
        self.keys = KeySource(
            client,
            allow_keys_without_holders=allow_keys_without_holders,
            allowed_peers=_weak_call(self, QKDContext._qkd_peers_allowed),
            max_kme_lookups=max_kme_lookups,
            max_kme_lookups_per_source=max_kme_lookups_per_source,
            used_key_memory=used_key_memory,
        )
        if owned and client is not None:
            # A context that created the KME client also ends it (its prefetch thread included), even if the
            # application forgets close(): when the context is garbage-collected or the interpreter exits.
            # The key source ends first, so collections cut short by the KME client's end are a shutdown.
            self._release_kme = weakref.finalize(self, _release, self.keys, client)
        if certfile is not None:
            self.load_cert_chain(certfile, keyfile)
        if cafile is not None:
            self.load_verify_locations(cafile)

    def _make_kme(
        self, kme: KmeClientSettings | KmeClient | None, prefetch: int
    ) -> tuple[KmeClient | None, bool]:
        """The KME client, and whether this context created it (and so ends it)."""
        if kme is None:
            if self.qkd == "required":
                raise QKDConfigurationError("qkd='required' needs a KME: pass kme=KmeClientSettings(...)")
            return None, False
        if isinstance(kme, KmeClientSettings):
            if prefetch and self.purpose == "client":
                kme = dataclasses.replace(kme, prefetch=prefetch)
            try:
                client = KmeClient(kme)
            except (KmeClientError, ValueError) as exc:
                raise QKDConfigurationError(f"KME client settings unusable: {exc}") from None
            return client, True
        return kme, False

    @property
    def allowed_peer_sae_ids(self) -> frozenset[int] | None:
        """Server: the SAEs whose QKD offers are considered (None: any SAE its KME gives a key for)."""
        return self._allowed_peers

    @allowed_peer_sae_ids.setter
    def allowed_peer_sae_ids(self, value: Collection[int] | None) -> None:
        if value is None:
            self._allowed_peers: frozenset[int] | None = None
            return
        ids = frozenset(value)
        for sae in ids:
            is_id = isinstance(sae, int) and not isinstance(sae, bool)
            if not is_id or not MIN_PEER_SAE_ID <= sae <= MAX_PEER_SAE_ID:
                raise ValueError(f"allowed_peer_sae_ids: {sae!r} is not an SAE ID (1..2^63-1)")
        self._allowed_peers = ids

    @property
    def requires_client_certificates(self) -> bool:
        """Server: classic clients must present a certificate chaining to ``cafile``."""
        return self.purpose == "server" and self._trust is not None

    def _qkd_peers_allowed(self) -> frozenset[int] | None:
        """The allow-list the server applies to QKD offers. A TLS-QKD client presents no certificate, so a
        server that requires client certificates accepts QKD only from the SAEs it lists (none if unset)."""
        allowed = self._allowed_peers
        if allowed is None and self.requires_client_certificates:
            return frozenset()
        return allowed

    def check_server_access(self) -> None:
        """Raise :class:`QKDConfigurationError` for a server that could accept no client at all."""
        if self.qkd == "required" and self.requires_client_certificates and not self._allowed_peers:
            raise QKDConfigurationError(
                "qkd='required' with client certificates (cafile) accepts only the SAEs in "
                "allowed_peer_sae_ids: TLS-QKD clients present no certificate; list the SAE IDs allowed"
            )

    def __repr__(self) -> str:
        return (
            f"QKDContext({self.purpose!r}, qkd={self.qkd!r}, profiles={self.profiles!r}, "
            f"kme={'yes' if self.keys.kme is not None else 'no'})"
        )

    # -- certificates ------------------------------------------------------------------------------------

    def load_cert_chain(self, certfile: Path | str, keyfile: Path | str | None = None) -> None:
        """This side's chain (leaf first) and private key (in ``certfile`` when ``keyfile`` is None)."""
        chain = _load_certificates(Path(certfile))
        key = _load_private_key(Path(keyfile if keyfile is not None else certfile))
        with self._lock:
            self._certificate_chain, self._private_key = chain, key
            self._certfile, self._keyfile = Path(certfile), Path(keyfile if keyfile is not None else certfile)
            self._classic_context = None

    def load_verify_locations(self, cafile: Path | str) -> None:
        """Trust anchors: servers (client side) or client certificates (server side) must chain to them."""
        certs = _load_certificates(Path(cafile))
        with self._lock:
            self._trust = [*(self._trust or []), *certs]
            self._cafile = Path(cafile)
            self._classic_context = None

    def load_default_certs(self) -> None:
        """Trust the system's CA bundle (what a client without ``cafile`` uses, as ``ssl`` does)."""
        paths = ssl.get_default_verify_paths()
        if paths.cafile is None or not Path(paths.cafile).is_file():
            raise QKDConfigurationError("no system CA bundle found: pass cafile=")
        with warnings.catch_warnings():
            # Some public roots predate RFC 5280's positive-serial rule; they load, with a warning per root.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            self.load_verify_locations(paths.cafile)

    # -- engine configuration ----------------------------------------------------------------------------

    def client_config(self) -> ClientConfig:
        if self._trust is None and self.verify:
            self.load_default_certs()
        return ClientConfig(
            trust=list(self._trust) if self._trust is not None else None,
            check_hostname=self.check_hostname,
            verify=self.verify,
            alpn_protocols=self.alpn_protocols,
            certificate_chain=tuple(self._certificate_chain),
            private_key=self._private_key,
            qkd=self.qkd,
            qkd_profiles=self.profiles,
            rekey=True,
            key_announce=self.announce_keys > 0 and self.keys.prefetching,
        )

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            certificate_chain=tuple(self._certificate_chain),
            private_key=self._private_key,
            qkd=self.qkd,
            qkd_profiles=self.profiles,
            alpn_protocols=self.alpn_protocols,
            client_trust=list(self._trust) if self._trust is not None else None,
            rekey=True,
            accept_key_announcements=self.accept_key_announcements and self.keys.kme is not None,
        )

    def classic_context(self) -> ssl.SSLContext | None:
        """The OpenSSL context that serves classic clients after a hand-off (server side; None: no cert)."""
        with self._lock:
            if self._classic_context is None and self._certfile is not None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                # The project offers TLS 1.3 keyed by QKD; its classic fallback stays on the same version.
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                ctx.load_cert_chain(self._certfile, self._keyfile)
                if self.alpn_protocols:
                    ctx.set_alpn_protocols(list(self.alpn_protocols))
                if self._cafile is not None:
                    ctx.load_verify_locations(self._cafile)
                    ctx.verify_mode = ssl.CERT_REQUIRED
                self._classic_context = ctx
            return self._classic_context

    # -- client-side key decisions -----------------------------------------------------------------------

    def resolve_target(
        self, host: str | None, port: int | None, explicit: int | None = None, peer_ip: str | None = None
    ) -> int | None:
        """The server's SAE ID: ``explicit``, else the directory entry for its name, else for its IP."""
        if explicit is not None:
            return explicit
        sae = self.directory.resolve(host, port)
        if sae is None and peer_ip and peer_ip != host:
            sae = self.directory.resolve(peer_ip, port)
        return sae

    def client_offer(
        self, host: str | None, port: int | None, target_sae_id: int | None = None
    ) -> QkdOffer | None:
        """The QKD key to offer to ``host:port``, or None for a classic ClientHello.

        ``preferred`` falls back (with a log line) when the KME fails or the target is unknown; ``required``
        raises :class:`QKDKeyUnavailable` / :class:`QKDConfigurationError` instead. Only ``preferred``
        skips servers remembered as unable to do TLS-QKD: a ``required`` client has no classic handshake to
        fall back to, so it always offers a key (nothing an attacker makes one connection do can lock it
        out of the next).
        """
        if self.qkd == "off":
            return None
        peer = (host or "", port or 0)
        if self.qkd == "preferred" and peer in self.non_qkd_peers:
            log.info(
                "server known not to speak TLS-QKD: classic handshake",
                extra={"event": "tls.skip_qkd", "peer": f"{host}:{port}"},
            )
            return None
        target = self.resolve_target(host, port, target_sae_id)
        if target is None:
            if self.qkd == "required":
                raise QKDConfigurationError(
                    f"no SAE ID for {host}:{port}: pass target_sae_id= or add it to the SAE directory"
                )
            log.info(
                "no SAE ID known for the server: classic handshake",
                extra={"event": "tls.no_target_sae", "peer": f"{host}:{port}"},
            )
            return None
        if self.keys.kme is None:
            return None
        announced = self.keys.announced.take(peer[0], peer[1], target)
        if announced is not None:
            return dataclasses.replace(announced, profiles=self.profiles)
        try:
            return self.keys.offer(target, self.profiles)
        except QKDKeyUnavailable as exc:
            if self.qkd == "required":
                raise
            log.warning(
                "KME failed; falling back to classic TLS 1.3",
                extra={"event": "tls.qkd_fallback", "peer": f"{host}:{port}", "reason": str(exc)},
            )
            return None

    def prepare_offer(
        self,
        host: str,
        port: int,
        *,
        server_hostname: str | None = None,
        target_sae_id: int | None = None,
    ) -> PreparedOffer:
        """Client: everything this connection needs from the KME (this SAE's ID, the key), fetched *before*
        connecting, so the ClientHello leaves as soon as TCP is up and a server with a short handshake
        timeout never sees an idle connection. Pass the result to ``wrap_socket(..., prepared_offer=)`` or
        ``open_connection(..., prepared_offer=)``; ``QKDSocket.connect``, ``open_connection`` and
        ``qkdtls s_client`` call this themselves.

        ``host`` is the address about to be connected to (name or IP); the target SAE is ``target_sae_id``,
        else the directory entry for ``server_hostname`` or ``host``, else - when ``host`` is an IP - for
        it. When none is known yet and ``host`` is a name, the offer is left to the handshake (the peer's IP
        may still be in the directory). Raises like :meth:`client_offer` (``required`` and no key: before
        any connection is made). A prepared offer is for one connection; a key prepared and never used is
        lost.
        """
        name = server_hostname or host
        ip = host if _is_ip_literal(host) else None
        target = self.resolve_target(name, port, target_sae_id, peer_ip=ip)
        if self.qkd != "off" and target is None and ip is None:
            return PreparedOffer(name, port, server_hostname, None, None, resolved=False)
        offer = self.client_offer(name, port, target)
        return PreparedOffer(name, port, server_hostname, target, offer, resolved=True)

    def rekey_offer(self, target_sae_id: int) -> QkdOffer:
        """A fresh key for an in-connection QKD rekey (secure profile only)."""
        return self.keys.offer(target_sae_id, ("secure",))

    def announce_after_handshake(
        self, host: str | None, port: int | None, target_sae_id: int | None
    ) -> list[str]:
        """Client, after a handshake that negotiated 0xFEA9: key IDs to announce (moved to its queue)."""
        if target_sae_id is None or not host or self.announce_keys <= 0:
            return []
        try:
            return self.keys.prepare_announcement(
                host, port or 0, target_sae_id, self.announce_keys, self.profiles
            )
        except QKDKeyUnavailable:
            return []

    def note_outcome(
        self, host: str | None, port: int | None, offered: bool, mode: str | None, announced: bool = False
    ) -> None:
        """Client, after a completed handshake: learn from it whether the server does TLS-QKD.

        A TLS-QKD handshake proves it does (authenticated by the key). A classic answer to a key offer
        makes a ``preferred`` client stop offering keys to the server for a while, but only when the
        server's certificate was verified (``verify`` and ``check_hostname``) and the server has not proven
        TLS-QKD recently (:class:`~qkdtls.net.qkd_keys.NonQkdPeers`). When the key offered was an announced
        one, the server lost what it had collected (a restart, or another instance behind the same
        address): the keys announced to it are dropped instead, and the server is not taken for one that
        cannot do TLS-QKD. Failed handshakes are never evidence (an attacker can make any handshake fail).
        """
        if not host:
            return
        if mode == "qkd":
            self.non_qkd_peers.qkd_answer(host, port or 0)
            return
        if announced and mode != "qkd":
            dropped = self.keys.announced.drop(host, port or 0)
            log.warning(
                "server could not use an announced key; keys announced to it are dropped",
                extra={
                    "event": "tls.announced_key_refused",
                    "peer": f"{host}:{port}",
                    "dropped": dropped + 1,
                },
            )
            return
        if not offered or mode != "classic" or self.qkd != "preferred":
            return
        if not (self.verify and self.check_hostname):
            return  # an unauthenticated server proves nothing about the real one
        if self.non_qkd_peers.classic_answer(host, port or 0):
            log.warning(
                "server did not accept the QKD key (verified classic handshake); it will not be offered "
                "keys for a while",
                extra={"event": "tls.peer_not_qkd", "peer": f"{host}:{port}"},
            )
        else:
            log.info(
                "server did not accept the QKD key (classic handshake)",
                extra={"event": "tls.key_not_accepted", "peer": f"{host}:{port}"},
            )

    def forget_non_qkd(self, host: str | None = None, port: int | None = None) -> None:
        self.non_qkd_peers.forget(host, port)

    # -- sockets -----------------------------------------------------------------------------------------

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        server_hostname: str | None = None,
        target_sae_id: int | None = None,
        do_handshake_on_connect: bool = True,
        prepared_offer: PreparedOffer | None = None,
    ) -> QKDSocket:
        """A :class:`QKDSocket` over ``sock`` (which it takes over); the handshake runs now if connected.

        A client socket that is already connected makes its KME requests during the handshake, after TCP
        is up; pass ``prepared_offer`` (:meth:`prepare_offer`, called before connecting) to avoid that.
        """
        from qkdtls.net.socket import QKDSocket

        if server_side != (self.purpose == "server"):
            raise ValueError(
                f"a {self.purpose} context cannot wrap a {'server' if server_side else 'client'} socket"
            )
        if server_side:
            self.check_server_access()
        elif prepared_offer is not None and server_hostname is None:
            server_hostname = prepared_offer.server_hostname
        return QKDSocket(
            sock,
            context=self,
            server_side=server_side,
            server_hostname=server_hostname,
            target_sae_id=target_sae_id,
            do_handshake_on_connect=do_handshake_on_connect,
            prepared_offer=prepared_offer,
        )

    def close(self) -> None:
        """Close the KME client if this context created it, and stop collecting announced keys."""
        self.keys.close()
        if self._release_kme is not None:
            self._release_kme()

    def __enter__(self) -> QKDContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(keys: KeySource, kme: KmeClient) -> None:
    keys.close()
    kme.close()


def _weak_call(context: QKDContext, method: Callable[[QKDContext], Any]) -> Callable[[], Any]:
    """``method(context)`` without keeping the context alive (the key source outlives it in a finalizer)."""
    ref = weakref.ref(context)

    def call() -> Any:
        target = ref()
        return method(target) if target is not None else None

    return call
