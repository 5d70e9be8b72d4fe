"""KME configuration: a TOML file (stdlib ``tomllib``) turned into frozen dataclasses.

Every validation error names the file and the field path (``kme.toml: peers[1].folder: directory does not
exist``) so an operator can fix the file without reading code. Relative paths are resolved against the
directory of the configuration file. ``docs/kme.example.toml`` documents every field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from qkdtls.kme.keyid import REFERENCE_MIN_KEY_SIZE
from qkdtls.kme.quotas import DEFAULT_BURST, QuotaSettings, RateLimit, SaeQuota
from qkdtls.kme.relay.policy import parse_relay
from qkdtls.kme.routing.lsdb import Timers
from qkdtls.kme.routing.settings import MAX_MAX_HOPS, NetworkSettings, StaticRoute
from qkdtls.kme.service import MAX_RECOLLECT_WINDOW, SaeEntry, ServiceSettings
from qkdtls.tomlconfig import I64_MAX, I64_MIN, ConfigError, TableReader


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """How a client certificate is recognised: by serial number, SHA-256 fingerprint of its DER, or both,
    and by the CA that issued it (``issuer``: SHA-256 of that CA certificate's DER). A serial number is
    unique only among one CA's certificates, so a serial always comes with its issuer."""

    serial: int | None = None
    fingerprint: bytes | None = None
    issuer: bytes | None = None

    def __repr__(self) -> str:
        parts = []
        if self.serial is not None:
            parts.append(f"serial={self.serial:x}")
        if self.fingerprint is not None:
            parts.append(f"fingerprint={self.fingerprint.hex()}")
        if self.issuer is not None:
            parts.append(f"issuer={self.issuer.hex()[:16]}")
        return f"CertIdentity({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int
    cert: Path
    key: Path
    client_ca: tuple[Path, ...]


# --- connection caps of a listener (see http11.server.ServerLimits) ---------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionCaps:
    """Bounds on what unauthenticated callers can hold open on one listener.

    A connection is unauthenticated from its accept until a request of it is answered with a status other
    than 401/403 after a TLS handshake that gave a verified client certificate."""

    max_connections: int = 4096
    max_unauthenticated: int = 512
    max_unauthenticated_per_address: int = 128
    unauthenticated_timeout: float = 5.0


SAE_CAPS = ConnectionCaps()
# Inter-KME callers are the few peer KMEs, each with a handful of kept-alive connections.
INTER_KME_CAPS = ConnectionCaps(
    max_connections=1024, max_unauthenticated=128, max_unauthenticated_per_address=32
)


def _connection_caps(r: TableReader, defaults: ConnectionCaps) -> ConnectionCaps:
    caps = ConnectionCaps(
        max_connections=r.integer("max_connections", defaults.max_connections, lo=1, hi=1_000_000),
        max_unauthenticated=r.integer(
            "max_unauthenticated", defaults.max_unauthenticated, lo=1, hi=1_000_000
        ),
        max_unauthenticated_per_address=r.integer(
            "max_unauthenticated_per_address", defaults.max_unauthenticated_per_address, lo=1, hi=1_000_000
        ),
        unauthenticated_timeout=r.number(
            "unauthenticated_timeout", defaults.unauthenticated_timeout, hi=300.0
        ),
    )
    if caps.max_unauthenticated > caps.max_connections:
        raise r.error("max_unauthenticated", "must not exceed max_connections")
    if caps.max_unauthenticated_per_address > caps.max_unauthenticated:
        raise r.error("max_unauthenticated_per_address", "must not exceed max_unauthenticated")
    return caps


# --- end of connection caps ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SaeInterface:
    listen: Listener
    max_body_bytes: int = 65536
    handshake_timeout: float = 10.0
    caps: ConnectionCaps = SAE_CAPS


@dataclass(frozen=True, slots=True)
class InterKmeInterface:
    listen: Listener
    handshake_timeout: float = 10.0
    caps: ConnectionCaps = INTER_KME_CAPS


@dataclass(frozen=True, slots=True)
class Peer:
    """A KME at the other end of a QKD link."""

    kme_id: int
    url: str  # base URL of its inter-KME interface, e.g. https://127.0.0.1:9002
    client_cert: Path  # what we present when calling it
    client_key: Path
    ca: Path  # verifies its inter-KME server certificate
    server_name: str | None  # expected name in its certificate; None: the URL's host
    identity: CertIdentity  # its client certificate, when it calls us
    folder: Path
    delete_after_import: bool = False
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class LocalLink:
    folder: Path
    delete_after_import: bool = False


@dataclass(frozen=True, slots=True)
class SaeConfig:
    sae_id: int
    kme_id: int
    identity: CertIdentity | None  # required for SAEs of this KME, forbidden for others
    # Key policy of this SAE (see _sae_key_policy); defaults keep plain ETSI 014 behaviour.
    multicast: bool = True
    recollect_window: float | None = None  # None: [service] recollect_window
    quota: SaeQuota | None = None  # None: the [quotas] defaults

    def entry(self) -> SaeEntry:
        return SaeEntry(
            sae_id=self.sae_id,
            kme_id=self.kme_id,
            multicast=self.multicast,
            recollect_window=self.recollect_window,
        )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    name: str
    identity: CertIdentity


NETWORK_OFF = NetworkSettings(enabled=False)


@dataclass(frozen=True, slots=True)
class KmeConfig:
    path: Path
    kme_id: int
    nickname: str
    sae_interface: SaeInterface
    inter_kme: InterKmeInterface | None
    store_url: str
    service: ServiceSettings
    local_link: LocalLink | None
    peers: tuple[Peer, ...]
    saes: tuple[SaeConfig, ...]
    admins: tuple[AdminConfig, ...]
    metrics: bool = True
    sweep_interval: float = 5.0
    ingest_interval: float = 0.5
    # Bytes per second a key file is appended at while the KME serves (see kme/ingest.py).
    ingest_rate: float = 1024 * 1024
    network: NetworkSettings = NETWORK_OFF

    def sae_entries(self) -> dict[int, SaeEntry]:
        return {s.sae_id: s.entry() for s in self.saes}


def parse_serial(value: Any) -> int:
    """A certificate serial: an integer, or a hex string (colons and a 0x prefix allowed)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(":", "").removeprefix("0x")
        if text and len(text) <= 42 and all(c in "0123456789abcdef" for c in text):
            return int(text, 16)
    raise ValueError("must be an integer or a hex string")


def parse_fingerprint(value: Any) -> bytes:
    if isinstance(value, str):
        text = value.strip().lower().replace(":", "")
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return bytes.fromhex(text)
    raise ValueError("must be 64 hex digits (SHA-256 of the DER certificate)")


# --- certificate identities: serial/fingerprint and the issuing CA -----------------------------------------


def ca_certificates(paths: tuple[Path, ...]) -> list[x509.Certificate]:
    """Every certificate in the CA files of a listener (a file may hold several)."""
    out: list[x509.Certificate] = []
    for path in paths:
        try:
            out += x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            continue  # the TLS context reports an unreadable CA file when it loads it
    return out


@dataclass(frozen=True, slots=True)
class _Trust:
    """The CAs of the listener an identity is checked on, and that listener's field name (for errors)."""

    field: str
    cas: tuple[bytes, ...]  # SHA-256 of each CA certificate's DER


def _trust(field: str, paths: tuple[Path, ...]) -> _Trust:
    cas = tuple(hashlib.sha256(c.public_bytes(Encoding.DER)).digest() for c in ca_certificates(paths))
    return _Trust(field, cas)


def _issuer(r: TableReader, trust: _Trust, serial: int | None) -> bytes | None:
    """The ``issuer`` field: the CA certificate that issued the client certificate, one of the listener's.

    Without it, a single trusted CA is implied; with several, a serial alone is refused (it would match that
    serial from every trusted CA), a fingerprint alone is fine (it pins one certificate)."""
    if r.has("issuer"):
        path = r.path("issuer")
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            raise r.error("issuer", f"not a PEM CA certificate: {path}") from None
        if len(certs) != 1:
            raise r.error("issuer", f"must hold exactly one CA certificate: {path}")
        digest = hashlib.sha256(certs[0].public_bytes(Encoding.DER)).digest()
        if digest not in trust.cas:
            raise r.error("issuer", f"is not one of the CAs of {trust.field}: {path}")
        return digest
    if len(trust.cas) == 1:
        return trust.cas[0]
    if not trust.cas:  # no readable CA certificate: the listener's TLS context refuses to load anyway
        return None
    if serial is not None and not r.has("fingerprint"):
        raise r.error(
            "issuer",
            f"missing: {trust.field} trusts {len(trust.cas)} CA certificates and a serial number is unique "
            "only per CA; name the CA certificate that issued this one (or give its fingerprint)",
        )
    return None


def _identity(r: TableReader, *, required: bool, trust: _Trust | None = None) -> CertIdentity | None:
    serial = fingerprint = None
    if r.has("serial"):
        try:
            serial = parse_serial(r._get("serial", None, True))
        except ValueError as exc:
            raise r.error("serial", str(exc)) from None
    if r.has("fingerprint"):
        try:
            fingerprint = parse_fingerprint(r._get("fingerprint", None, True))
        except ValueError as exc:
            raise r.error("fingerprint", str(exc)) from None
    if serial is None and fingerprint is None:
        if required:
            raise r.error("serial", "missing (give serial or fingerprint of the client certificate)")
        if r.has("issuer"):
            raise r.error("issuer", "only SAEs of this KME have a certificate identity here")
        return None
    issuer = _issuer(r, trust, serial) if trust is not None else None
    return CertIdentity(serial=serial, fingerprint=fingerprint, issuer=issuer)


def _required_identity(r: TableReader, trust: _Trust | None = None) -> CertIdentity:
    identity = _identity(r, required=True, trust=trust)
    assert identity is not None  # _identity raised otherwise
    return identity


# --- end of certificate identities --------------------------------------------------------------------------


def _host_port(r: TableReader, name: str) -> tuple[str, int]:
    text = r.string(name, required=True)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise r.error(name, "must be HOST:PORT")
    return host, int(port)


def _listener(r: TableReader) -> Listener:
    host, port = _host_port(r, "listen")
    return Listener(
        host=host, port=port, cert=r.path("cert"), key=r.path("key"), client_ca=r.paths("client_ca")
    )


_SERVICE_INTS = (
    "key_size",
    "min_key_size",
    "max_key_size",
    "max_key_per_request",
    "max_key_count",
    "max_SAE_ID_count",
    "block_size",
)


def _service(r: TableReader | None, kme_id: int) -> ServiceSettings:
    defaults = ServiceSettings(kme_id=kme_id)
    if r is None:
        return defaults
    values: dict[str, Any] = {}
    for name in _SERVICE_INTS:
        values[name] = r.integer(
            name, getattr(defaults, name), lo=0 if name == "max_SAE_ID_count" else 1, hi=2**31 - 1
        )
    for name in ("reservation_ttl", "peer_timeout", "stale_hold_after"):
        values[name] = r.number(name, getattr(defaults, name), hi=30 * 86400.0)
    values["recollect_window"] = _seconds_or_zero(
        r, "recollect_window", defaults.recollect_window, MAX_RECOLLECT_WINDOW
    )
    mode = r.string("key_id_mode", defaults.key_id_mode)
    if mode not in ("random", "reference"):
        raise r.error("key_id_mode", 'must be "random" or "reference"')
    values["key_id_mode"] = mode
    r.finish()
    for name in ("key_size", "min_key_size", "max_key_size"):
        if values[name] % 8:
            raise r.error(name, "must be a multiple of 8 (bits)")
    if not values["min_key_size"] <= values["key_size"] <= values["max_key_size"]:
        raise r.error("key_size", "must lie within min_key_size..max_key_size")
    if mode == "reference" and values["key_size"] != 256:
        raise r.error("key_id_mode", '"reference" key IDs need key_size = 256')
    if mode == "reference" and values["min_key_size"] < REFERENCE_MIN_KEY_SIZE:
        # The ID is SHA-1 of the key and TLS-QKD sends it in clear: a short key is found by trying them all.
        raise r.error(
            "min_key_size",
            f'must be at least {REFERENCE_MIN_KEY_SIZE} with key_id_mode = "reference" (the key ID is SHA-1 '
            "of the key and travels in clear: shorter keys can be found from their ID)",
        )
    if values["stale_hold_after"] <= values["peer_timeout"]:
        raise r.error("stale_hold_after", "must exceed peer_timeout")
    try:
        return ServiceSettings(kme_id=kme_id, **values)
    except ValueError as exc:
        raise r.error(None, str(exc)) from None


# -- key-delivery policy: [service] recollect_window, [quotas], and the policy fields of [[saes]] ----------


def _seconds_or_zero(r: TableReader, name: str, default: float, hi: float) -> float:
    value = r._get(name, default, False)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= hi:
        raise r.error(name, f"must be a number of seconds within 0..{hi:g}")
    return float(value)


def _rate(r: TableReader, rate_name: str, burst_name: str, default: RateLimit | None) -> RateLimit | None:
    """A token bucket from ``<rate_name>`` (keys/s, 0 = no limit) and ``<burst_name>`` (keys)."""
    rate = _seconds_or_zero(r, rate_name, default.rate if default else 0.0, 1e9)
    burst = r.integer(burst_name, default.burst if default else DEFAULT_BURST, lo=1, hi=2**31 - 1)
    return RateLimit(rate, burst) if rate > 0 else None


_QUOTA_FIELDS = ("master_rate", "master_burst", "pair_rate", "pair_burst", "max_uncollected")


def _quota(r: TableReader, default: SaeQuota) -> SaeQuota:
    return SaeQuota(
        master_rate=_rate(r, "master_rate", "master_burst", default.master_rate),
        pair_rate=_rate(r, "pair_rate", "pair_burst", default.pair_rate),
        max_uncollected=r.integer("max_uncollected", default.max_uncollected, lo=0, hi=2**31 - 1),
    )


def _sae_key_policy(r: TableReader, quota_default: SaeQuota) -> dict[str, Any]:
    """Key-delivery fields of one ``[[saes]]`` entry (SaeConfig fields after ``identity``)."""
    policy: dict[str, Any] = {"multicast": r.boolean("multicast", True)}
    if r.has("recollect_window"):
        policy["recollect_window"] = _seconds_or_zero(r, "recollect_window", 0.0, MAX_RECOLLECT_WINDOW)
    if any(r.has(name) for name in _QUOTA_FIELDS):
        policy["quota"] = _quota(r, quota_default)
    return policy


def _quota_pairs(r: TableReader | None, saes: list[SaeConfig]) -> dict[tuple[int, int], RateLimit]:
    """``[[quotas.pairs]]``: a rate limit for one (master, slave) pair."""
    if r is None:
        return {}
    known = {s.sae_id for s in saes}
    pairs: dict[tuple[int, int], RateLimit] = {}
    for p in r.tables("pairs"):
        master, slave = p.integer("master", required=True), p.integer("slave", required=True)
        for name, sae in (("master", master), ("slave", slave)):
            if sae not in known:
                raise p.error(name, f"SAE {sae} is not in [[saes]]")
        if master == slave or (master, slave) in pairs:
            raise p.error("slave", "must differ from master, one entry per pair")
        rate = _rate(p, "rate", "burst", None)
        if rate is None:
            raise p.error("rate", "must be greater than 0 (keys per second)")
        p.finish()
        pairs[(master, slave)] = rate
    return pairs


# -- end of key-delivery policy ----------------------------------------------------------------------------


# -- [network]: link-state routing with the peers, static routes ------------------------------------------


def _network(r: TableReader | None, kme_id: int, peers: tuple[Peer, ...]) -> NetworkSettings:
    """``[network]``; without the table the exchange runs when the KME has peers."""
    defaults = Timers()
    if r is None:
        return NetworkSettings(enabled=bool(peers))
    enabled = r.boolean("enabled", bool(peers))
    hello = r.number("hello_interval", defaults.hello_interval, lo=0.01, hi=600.0)
    dead = r.number("dead_interval", defaults.dead_interval, hi=3600.0)
    max_age = r.number("max_age", defaults.max_age, hi=86400.0)
    max_hops = r.integer("max_hops", NetworkSettings().max_hops, lo=1, hi=MAX_MAX_HOPS)
    if dead < 2 * hello:
        raise r.error("dead_interval", "must be at least twice hello_interval (one lost advert is no outage)")
    if max_age < 4 * dead:
        raise r.error("max_age", "must be at least four times dead_interval")
    neighbours = {p.kme_id for p in peers}
    routes: list[StaticRoute] = []
    for t in r.tables("routes"):
        destination = t.integer("destination", required=True)
        raw = t._get("path", None, True)
        if not isinstance(raw, list) or not all(
            isinstance(k, int) and not isinstance(k, bool) and I64_MIN <= k <= I64_MAX for k in raw
        ):
            raise t.error("path", "must be an array of KME IDs")
        path = tuple(raw)
        t.finish()
        if destination == kme_id:
            raise t.error("destination", "is this KME's own ID")
        if len(path) < 2 or path[0] != kme_id or path[-1] != destination:
            raise t.error(
                "path", f"must start with this KME ({kme_id}) and end with the destination ({destination})"
            )
        if len(set(path)) != len(path):
            raise t.error("path", "names a KME twice")
        if len(path) - 1 > max_hops:
            raise t.error("path", f"has more than max_hops = {max_hops} links")
        if path[1] not in neighbours:
            raise t.error("path", f"KME {path[1]} is not a configured peer (the first hop must be one)")
        if StaticRoute(destination, path) in routes:
            raise t.error("path", "is listed twice")
        routes.append(StaticRoute(destination, path))
    r.finish()
    try:
        timers = Timers(hello_interval=hello, dead_interval=dead, max_age=max_age)
    except ValueError as exc:
        raise r.error("dead_interval", str(exc)) from None
    return NetworkSettings(enabled=enabled, timers=timers, max_hops=max_hops, routes=tuple(routes))


# -- end of [network] --------------------------------------------------------------------------------------


def _peer(r: TableReader, trust: _Trust | None) -> Peer:
    url = r.string("url", required=True).rstrip("/")
    if not url.startswith("https://"):
        raise r.error("url", "must be an https:// URL of the peer's inter-KME interface")
    peer = Peer(
        kme_id=r.integer("kme_id", required=True),
        url=url,
        client_cert=r.path("client_cert"),
        client_key=r.path("client_key"),
        ca=r.path("ca"),
        server_name=r.optional_string("server_name"),
        identity=_required_identity(r, trust),
        folder=r.path("folder", kind="dir"),
        delete_after_import=r.boolean("delete_after_import", False),
        timeout=r.number("timeout", 5.0, hi=300.0),
    )
    r.finish()
    return peer


def parse_config(
    doc: Mapping[str, Any], *, origin: str = "kme.toml", base: Path | None = None, path: Path | None = None
) -> KmeConfig:
    """Validate a parsed TOML document; ``base`` resolves relative paths."""
    root = TableReader(doc, "", origin, base or Path.cwd())
    kme = root.table("kme", required=True)
    assert kme is not None
    kme_id = kme.integer("id", required=True)
    nickname = kme.string("nickname", f"KME {kme_id}")
    kme.finish()

    sae_r = root.table("sae_interface", required=True)
    assert sae_r is not None
    sae_interface = SaeInterface(
        listen=_listener(sae_r),
        max_body_bytes=sae_r.integer("max_body_bytes", 65536, lo=1024, hi=16 << 20),
        handshake_timeout=sae_r.number("handshake_timeout", 10.0, hi=300.0),
        caps=_connection_caps(sae_r, SAE_CAPS),
    )
    sae_r.finish()

    inter_r = root.table("inter_kme")
    inter = None
    if inter_r is not None:
        inter = InterKmeInterface(
            listen=_listener(inter_r),
            handshake_timeout=inter_r.number("handshake_timeout", 10.0, hi=300.0),
            caps=_connection_caps(inter_r, INTER_KME_CAPS),
        )
        inter_r.finish()

    store_r = root.table("store")
    store_url = "sqlite://kme.sqlite3"
    if store_r is not None:
        store_url = store_r.string("url", store_url)
        store_r.finish()
    sqlite_path = store_url.removeprefix("sqlite://") if store_url.startswith("sqlite://") else None
    if sqlite_path and sqlite_path != ":memory:" and not Path(sqlite_path).is_absolute():
        # sqlite://relative/path is relative to the configuration file, like every other path.
        store_url = "sqlite://" + str(root.base / sqlite_path)
    if not store_url.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise root.error("store.url", "must start with sqlite:// or postgresql://")

    service = _service(root.table("service"), kme_id)
    relay = parse_relay(root.table("relay"))  # modes and bounds of relayed keys (kme/relay/policy.py)
    quotas_r = root.table("quotas")
    quota_default = _quota(quotas_r, SaeQuota()) if quotas_r is not None else SaeQuota()

    local_r = root.table("local_link")
    local = None
    if local_r is not None:
        local = LocalLink(
            folder=local_r.path("folder", kind="dir"),
            delete_after_import=local_r.boolean("delete_after_import", False),
        )
        local_r.finish()

    inter_trust = _trust("inter_kme.client_ca", inter.listen.client_ca) if inter is not None else None
    peers = tuple(_peer(p, inter_trust) for p in root.tables("peers"))
    seen_peers: set[int] = set()
    for i, peer in enumerate(peers):
        if peer.kme_id == kme_id:
            raise root.error(f"peers[{i}].kme_id", "is this KME's own ID (use [local_link] for local pairs)")
        if peer.kme_id in seen_peers:
            raise root.error(f"peers[{i}].kme_id", f"duplicate peer KME {peer.kme_id}")
        seen_peers.add(peer.kme_id)
    if peers and inter is None:
        raise root.error("inter_kme", "missing (needed because [[peers]] are configured)")
    network = _network(root.table("network"), kme_id, peers)
    # With routing, an SAE may sit behind any KME of the network; without it, only behind a peer.
    routed = network.enabled or bool(network.routes)

    sae_trust = _trust("sae_interface.client_ca", sae_interface.listen.client_ca)
    saes: list[SaeConfig] = []
    for i, s in enumerate(root.tables("saes")):
        sae_id = s.integer("id", required=True)
        sae_kme = s.integer("kme_id", required=True)
        local_sae = sae_kme == kme_id
        identity = _identity(s, required=local_sae, trust=sae_trust if local_sae else None)
        if identity is not None and not local_sae:
            raise s.error(
                "serial" if identity.serial is not None else "fingerprint",
                "only SAEs of this KME have a certificate identity here",
            )
        if not local_sae and sae_kme not in seen_peers and not routed:
            raise s.error(
                "kme_id", f"KME {sae_kme} is neither this KME nor a configured peer (and [network] is off)"
            )
        if any(x.sae_id == sae_id for x in saes):
            raise root.error(f"saes[{i}].id", f"duplicate SAE {sae_id}")
        policy = _sae_key_policy(s, quota_default)
        s.finish()
        saes.append(SaeConfig(sae_id=sae_id, kme_id=sae_kme, identity=identity, **policy))
    pairs = _quota_pairs(quotas_r, saes)
    if quotas_r is not None:
        quotas_r.finish()
    service = dataclasses.replace(
        service,
        relay=relay,
        quotas=QuotaSettings(
            default=quota_default,
            saes={s.sae_id: s.quota for s in saes if s.quota is not None},
            pairs=pairs,
        ),
    )

    admins: list[AdminConfig] = []
    for a in root.tables("admins"):
        name = a.string("name", "admin")
        identity = _required_identity(a, sae_trust)
        a.finish()
        admins.append(AdminConfig(name=name, identity=identity))

    metrics_r = root.table("metrics")
    metrics = True
    if metrics_r is not None:
        metrics = metrics_r.boolean("enabled", True)
        metrics_r.finish()

    sweeper_r = root.table("sweeper")
    sweep_interval = 5.0
    if sweeper_r is not None:
        sweep_interval = sweeper_r.number("interval", 5.0, hi=86400.0)
        sweeper_r.finish()

    ingest_r = root.table("ingest")
    ingest_interval = 0.5
    ingest_rate = 1024.0 * 1024
    if ingest_r is not None:
        ingest_interval = ingest_r.number("interval", 0.5, hi=3600.0)
        ingest_rate = ingest_r.number("rate", ingest_rate, lo=1023.0, hi=1e12)
        ingest_r.finish()
    root.finish()

    _check_identities_unique(root, saes, admins, peers)
    return KmeConfig(
        path=path or Path(origin),
        kme_id=kme_id,
        nickname=nickname,
        sae_interface=sae_interface,
        inter_kme=inter,
        store_url=store_url,
        service=service,
        local_link=local,
        peers=peers,
        saes=tuple(saes),
        admins=tuple(admins),
        metrics=metrics,
        sweep_interval=sweep_interval,
        ingest_interval=ingest_interval,
        ingest_rate=ingest_rate,
        network=network,
    )


def _check_identities_unique(
    root: TableReader, saes: list[SaeConfig], admins: list[AdminConfig], peers: tuple[Peer, ...]
) -> None:
    # One certificate must map to one principal, or a request could be attributed to the wrong SAE.
    owners: dict[tuple[str, Any], str] = {}
    entries: list[tuple[str, CertIdentity | None]] = [(f"saes[{i}]", s.identity) for i, s in enumerate(saes)]
    entries += [(f"admins[{i}]", a.identity) for i, a in enumerate(admins)]
    entries += [(f"peers[{i}]", p.identity) for i, p in enumerate(peers)]
    for where, identity in entries:
        if identity is None:
            continue
        for key in (("serial", identity.serial), ("fingerprint", identity.fingerprint)):
            if key[1] is None:
                continue
            # Peers present certificates of another CA on another listener; clashes only matter per listener,
            # and a serial only per issuing CA.
            scope = "peer" if where.startswith("peers") else "sae"
            issuer = identity.issuer if key[0] == "serial" else None
            slot = (scope + key[0], (key[1], issuer))
            if slot in owners:
                raise root.error(f"{where}.{key[0]}", f"same certificate identity as {owners[slot]}")
            owners[slot] = where


def load_config(path: str | Path) -> KmeConfig:
    """Read and validate a TOML configuration file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(doc, origin=path.name, base=path.resolve().parent, path=path)
