"""KME configuration: a TOML file (stdlib ``tomllib``) turned into frozen dataclasses.

Every validation error names the file and the field path (``kme.toml: peers[1].folder: directory does not
exist``) so an operator can fix the file without reading code. Relative paths are resolved against the
directory of the configuration file. ``docs/kme.example.toml`` documents every field.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdtls.kme.service import SaeEntry, ServiceSettings

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class ConfigError(ValueError):
    """A configuration mistake; the message names the file and the field path."""


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """How a client certificate is recognised: by serial number, SHA-256 fingerprint of its DER, or both."""

    serial: int | None = None
    fingerprint: bytes | None = None

    def __repr__(self) -> str:
        parts = []
        if self.serial is not None:
            parts.append(f"serial={self.serial:x}")
        if self.fingerprint is not None:
            parts.append(f"fingerprint={self.fingerprint.hex()}")
        return f"CertIdentity({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int
    cert: Path
    key: Path
    client_ca: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class SaeInterface:
    listen: Listener
    max_body_bytes: int = 65536
    handshake_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class InterKmeInterface:
    listen: Listener
    handshake_timeout: float = 10.0


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

    def entry(self) -> SaeEntry:
        return SaeEntry(sae_id=self.sae_id, kme_id=self.kme_id, multicast=self.multicast)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    name: str
    identity: CertIdentity


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

    def sae_entries(self) -> dict[int, SaeEntry]:
        return {s.sae_id: s.entry() for s in self.saes}


class _Reader:
    """Typed access to one TOML table, with errors naming ``file: path.to.field``."""

    def __init__(self, doc: Mapping[str, Any], where: str, origin: str, base: Path) -> None:
        self.doc, self.where, self.origin, self.base = doc, where, origin, base
        self.seen: set[str] = set()

    def error(self, name: str | None, problem: str) -> ConfigError:
        field = f"{self.where}.{name}" if self.where and name else (name or self.where)
        return ConfigError(f"{self.origin}: {field}: {problem}")

    def has(self, name: str) -> bool:
        return name in self.doc

    def _get(self, name: str, default: Any, required: bool) -> Any:
        self.seen.add(name)
        if name not in self.doc:
            if required:
                raise self.error(name, "missing")
            return default
        return self.doc[name]

    def integer(
        self,
        name: str,
        default: int | None = None,
        *,
        lo: int = _I64_MIN,
        hi: int = _I64_MAX,
        required: bool = False,
    ) -> int:
        value = self._get(name, default, required or default is None)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, "must be an integer")
        if not lo <= value <= hi:
            raise self.error(name, f"must be between {lo} and {hi}")
        return value

    def number(self, name: str, default: float, *, lo: float = 0.0, hi: float = 1e9) -> float:
        value = self._get(name, default, False)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.error(name, "must be a number")
        if not lo < value <= hi:
            raise self.error(name, f"must be greater than {lo} and at most {hi}")
        return float(value)

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._get(name, default, required or default is None)
        if not isinstance(value, str) or (required and not value):
            raise self.error(name, "must be a non-empty string" if required else "must be a string")
        return value

    def optional_string(self, name: str) -> str | None:
        value = self._get(name, None, False)
        if value is not None and not isinstance(value, str):
            raise self.error(name, "must be a string")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, default, False)
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false")
        return value

    def path(self, name: str, *, kind: str = "file", must_exist: bool = True) -> Path:
        text = self.string(name, required=True)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.base / path
        if must_exist:
            if kind == "file" and not path.is_file():
                raise self.error(name, f"file does not exist: {path}")
            if kind == "dir" and not path.is_dir():
                raise self.error(name, f"directory does not exist: {path}")
        return path

    def paths(self, name: str) -> tuple[Path, ...]:
        """One path or an array of paths (several CA certificates)."""
        value = self._get(name, None, True)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
            raise self.error(name, "must be a path or a non-empty array of paths")
        out = []
        for i, text in enumerate(items):
            path = Path(text).expanduser()
            path = path if path.is_absolute() else self.base / path
            if not path.is_file():
                label = name if isinstance(value, str) else f"{name}[{i}]"
                raise self.error(label, f"file does not exist: {path}")
            out.append(path)
        return tuple(out)

    def table(self, name: str, *, required: bool = False) -> _Reader | None:
        value = self._get(name, None, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(name, "must be a table")
        return self.child(value, name)

    def tables(self, name: str) -> list[_Reader]:
        value = self._get(name, [], False)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, "must be an array of tables ([[" + name + "]])")
        prefix = f"{self.where}.{name}" if self.where else name
        return [_Reader(v, f"{prefix}[{i}]", self.origin, self.base) for i, v in enumerate(value)]

    def child(self, doc: Mapping[str, Any], name: str) -> _Reader:
        return _Reader(doc, f"{self.where}.{name}" if self.where else name, self.origin, self.base)

    def finish(self) -> None:
        unknown = sorted(set(self.doc) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown field")


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


def _identity(r: _Reader, *, required: bool) -> CertIdentity | None:
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
        return None
    return CertIdentity(serial=serial, fingerprint=fingerprint)


def _required_identity(r: _Reader) -> CertIdentity:
    identity = _identity(r, required=True)
    assert identity is not None  # _identity raised otherwise
    return identity


def _host_port(r: _Reader, name: str) -> tuple[str, int]:
    text = r.string(name, required=True)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise r.error(name, "must be HOST:PORT")
    return host, int(port)


def _listener(r: _Reader) -> Listener:
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


def _service(r: _Reader | None, kme_id: int) -> ServiceSettings:
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
    if values["stale_hold_after"] <= values["peer_timeout"]:
        raise r.error("stale_hold_after", "must exceed peer_timeout")
    try:
        return ServiceSettings(kme_id=kme_id, **values)
    except ValueError as exc:
        raise r.error(None, str(exc)) from None


def _sae_key_policy(r: _Reader) -> dict[str, Any]:
    """Key-delivery fields of one ``[[saes]]`` entry (SaeConfig fields after ``identity``)."""
    return {"multicast": r.boolean("multicast", True)}


def _peer(r: _Reader) -> Peer:
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
        identity=_required_identity(r),
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
    root = _Reader(doc, "", origin, base or Path.cwd())
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
    )
    sae_r.finish()

    inter_r = root.table("inter_kme")
    inter = None
    if inter_r is not None:
        inter = InterKmeInterface(
            listen=_listener(inter_r), handshake_timeout=inter_r.number("handshake_timeout", 10.0, hi=300.0)
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

    local_r = root.table("local_link")
    local = None
    if local_r is not None:
        local = LocalLink(
            folder=local_r.path("folder", kind="dir"),
            delete_after_import=local_r.boolean("delete_after_import", False),
        )
        local_r.finish()

    peers = tuple(_peer(p) for p in root.tables("peers"))
    seen_peers: set[int] = set()
    for i, peer in enumerate(peers):
        if peer.kme_id == kme_id:
            raise root.error(f"peers[{i}].kme_id", "is this KME's own ID (use [local_link] for local pairs)")
        if peer.kme_id in seen_peers:
            raise root.error(f"peers[{i}].kme_id", f"duplicate peer KME {peer.kme_id}")
        seen_peers.add(peer.kme_id)
    if peers and inter is None:
        raise root.error("inter_kme", "missing (needed because [[peers]] are configured)")

    saes: list[SaeConfig] = []
    for i, s in enumerate(root.tables("saes")):
        sae_id = s.integer("id", required=True)
        sae_kme = s.integer("kme_id", required=True)
        local_sae = sae_kme == kme_id
        identity = _identity(s, required=local_sae)
        if identity is not None and not local_sae:
            raise s.error(
                "serial" if identity.serial is not None else "fingerprint",
                "only SAEs of this KME have a certificate identity here",
            )
        if not local_sae and sae_kme not in seen_peers:
            raise s.error("kme_id", f"KME {sae_kme} is neither this KME nor a configured peer")
        if any(x.sae_id == sae_id for x in saes):
            raise root.error(f"saes[{i}].id", f"duplicate SAE {sae_id}")
        policy = _sae_key_policy(s)
        s.finish()
        saes.append(SaeConfig(sae_id=sae_id, kme_id=sae_kme, identity=identity, **policy))

    admins: list[AdminConfig] = []
    for a in root.tables("admins"):
        name = a.string("name", "admin")
        identity = _required_identity(a)
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
    if ingest_r is not None:
        ingest_interval = ingest_r.number("interval", 0.5, hi=3600.0)
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
    )


def _check_identities_unique(
    root: _Reader, saes: list[SaeConfig], admins: list[AdminConfig], peers: tuple[Peer, ...]
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
            # Peers present certificates of another CA on another listener; clashes only matter per listener.
            scope = "peer" if where.startswith("peers") else "sae"
            slot = (scope + key[0], key[1])
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
