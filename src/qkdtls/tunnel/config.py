"""Tunnel configuration: a TOML file (or the flags of the quick mode) turned into frozen dataclasses.

Errors name the file and the field (``tunnel.toml: services.pg.connect: must be HOST:PORT``), as the KME's
do (the same reader, :mod:`qkdtls.kme.config`). Relative paths are resolved against the file's directory.
docs/tunnel.md documents every field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdtls.etsi014.client import KmeClientSettings
from qkdtls.net.admission import (
    DEFAULT_MAX_LOOKUPS,
    DEFAULT_USED_KEY_MEMORY,
    MAX_PEER_SAE_ID,
    MIN_PEER_SAE_ID,
)
from qkdtls.net.directory import DirectoryError, SaeDirectory
from qkdtls.tls.config import QKD_POLICIES, QKD_PROFILES
from qkdtls.tls.qkd_secure import MAX_ANNOUNCED_KEYS
from qkdtls.tomlconfig import ConfigError
from qkdtls.tomlconfig import TableReader as Reader

__all__ = ["ConfigError", "KmeSettings", "ServiceConfig", "TunnelConfig", "load_config", "parse_config"]

MODES = ("client", "server")
# A server-side tunnel sees every connection of a remote site from that site's tunnel: one address. The
# per-address bound on KME lookups (4 for a server facing many clients) would cap a whole site's burst of
# new connections, so it defaults to the overall bound here.
TUNNEL_LOOKUPS_PER_SOURCE = DEFAULT_MAX_LOOKUPS
_CLIENT_ONLY = (
    "target_sae_id", "sae_directory", "sni", "verify", "prefetch", "announce_keys",
    "rekey_after_bytes", "rekey_after_seconds",
)  # fmt: skip
_SERVER_ONLY = (
    "allowed_peer_sae_ids", "accept_key_announcements", "max_handshakes", "max_kme_lookups",
    "max_kme_lookups_per_source", "used_key_memory",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class KmeSettings:
    """This SAE's KME (ETSI GS QKD 014 SAE interface) and the certificate that identifies the SAE to it."""

    url: str
    cert: Path
    key: Path
    ca: Path
    kme_id: int | None = None  # refuse the KME unless it reports this ID
    timeout: float = 5.0

    def client_settings(self, prefetch: int = 0) -> KmeClientSettings:
        return KmeClientSettings(
            url=self.url,
            certfile=self.cert,
            keyfile=self.key,
            cafile=self.ca,
            timeout=self.timeout,
            prefetch=prefetch,
            expected_kme_id=self.kme_id,
        )


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One tunnelled service: where it accepts, where it connects, and the TLS-QKD side's settings."""

    name: str
    mode: str  # "client": plaintext in, TLS-QKD out; "server": TLS-QKD in, plaintext out
    accept: tuple[str, int]
    connect: tuple[str, int]
    qkd: str = "required"
    profiles: tuple[str, ...] = ("secure",)
    kme: KmeSettings | None = None
    alpn: tuple[str, ...] = ()
    cert: Path | None = None  # server: its certificate (classic clients, reference profile); client: optional
    key: Path | None = None
    cafile: Path | None = None  # client: CAs for the server certificate; server: require client certificates
    allow_keys_without_holders: bool = False
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_connections: int = 1024
    # client side
    target_sae_id: int | None = None
    sae_directory: Path | None = None
    sni: str | None = None
    verify: bool = True
    prefetch: int = 0
    announce_keys: int = 4
    rekey_after_bytes: int | None = None
    rekey_after_seconds: float | None = None
    # server side
    allowed_peer_sae_ids: tuple[int, ...] | None = None
    accept_key_announcements: bool = False
    max_handshakes: int = 256  # handshakes in progress at once; past it the oldest is closed
    max_kme_lookups: int = DEFAULT_MAX_LOOKUPS
    max_kme_lookups_per_source: int = TUNNEL_LOOKUPS_PER_SOURCE
    used_key_memory: float = DEFAULT_USED_KEY_MEMORY

    @property
    def server_hostname(self) -> str | None:
        """Client: SNI and the name checked in a certificate (``sni``, else the connect host if a name)."""
        if self.sni is not None:
            return self.sni or None
        host = self.connect[0]
        return None if is_ip(host) else host


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    path: Path | None
    services: tuple[ServiceConfig, ...]
    grace_period: float = 30.0  # SIGTERM: how long running connections may finish
    metrics: tuple[str, int] | None = None  # Prometheus /metrics listener


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _host_port(r: Reader, name: str, *, any_port: bool = False) -> tuple[str, int]:
    text = r.string(name, required=True)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    lowest = 0 if any_port else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) <= 65535:
        raise r.error(name, "must be HOST:PORT")
    return host, int(port)


def _kme(r: Reader) -> KmeSettings:
    url = r.string("url", required=True)
    if not url.startswith("https://"):
        raise r.error("url", "must be an https:// URL (the KME's SAE interface)")
    settings = KmeSettings(
        url=url,
        cert=r.path("cert"),
        key=r.path("key"),
        ca=r.path("ca"),
        kme_id=r.integer("kme_id") if r.has("kme_id") else None,
        timeout=r.number("timeout", 5.0, hi=300.0),
    )
    r.finish()
    return settings


def _optional_path(r: Reader, name: str) -> Path | None:
    return r.path(name) if r.has(name) else None


def _strings(r: Reader, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if not r.has(name):
        r.seen.add(name)
        return default
    value = r.doc[name]
    r.seen.add(name)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise r.error(name, "must be a string or an array of non-empty strings")
    return tuple(value)


def _sae_ids(r: Reader, name: str) -> tuple[int, ...] | None:
    if not r.has(name):
        return None
    value = r.doc[name]
    r.seen.add(name)
    if not isinstance(value, list):
        raise r.error(name, "must be an array of SAE IDs")
    for i, sae in enumerate(value):
        if isinstance(sae, bool) or not isinstance(sae, int) or not MIN_PEER_SAE_ID <= sae <= MAX_PEER_SAE_ID:
            raise r.error(f"{name}[{i}]", f"must be an SAE ID ({MIN_PEER_SAE_ID}..2^63-1)")
    return tuple(value)


def _service(r: Reader, name: str, shared_kme: KmeSettings | None) -> ServiceConfig:
    mode = r.string("mode", required=True)
    if mode not in MODES:
        raise r.error("mode", 'must be "client" (plaintext in, TLS-QKD out) or "server" (TLS-QKD in)')
    for other in _SERVER_ONLY if mode == "client" else _CLIENT_ONLY:
        if r.has(other):
            raise r.error(other, f'only for mode = "{"server" if mode == "client" else "client"}"')
    qkd = r.string("qkd", "required")
    if qkd not in QKD_POLICIES:
        raise r.error("qkd", f"must be one of {', '.join(QKD_POLICIES)}")
    profiles = _strings(r, "profiles", ("secure",))
    for i, profile in enumerate(profiles):
        if profile not in QKD_PROFILES:
            raise r.error(f"profiles[{i}]", f"must be one of {', '.join(QKD_PROFILES)}")
    own_kme = r.table("kme")
    kme = _kme(own_kme) if own_kme is not None else shared_kme
    if kme is None and qkd != "off":
        raise r.error("kme", f'qkd = "{qkd}" needs a KME: a [kme] table, shared or in this service')
    values: dict[str, Any] = {
        "name": name,
        "mode": mode,
        "accept": _host_port(r, "accept", any_port=True),
        "connect": _host_port(r, "connect"),
        "qkd": qkd,
        "profiles": profiles,
        "kme": kme if qkd != "off" else None,
        "alpn": _strings(r, "alpn", ()),
        "cert": _optional_path(r, "cert"),
        "key": _optional_path(r, "key"),
        "cafile": _optional_path(r, "cafile"),
        "allow_keys_without_holders": r.boolean("allow_keys_without_holders", False),
        "handshake_timeout": r.number("handshake_timeout", 10.0, hi=300.0),
        "connect_timeout": r.number("connect_timeout", 10.0, hi=300.0),
        "idle_timeout": r.number("idle_timeout", 300.0, hi=7 * 86400.0),
        "max_connections": r.integer("max_connections", 1024, lo=1, hi=1_000_000),
    }
    if values["key"] is not None and values["cert"] is None:
        raise r.error("key", "given without cert")
    if mode == "client":
        values.update(
            target_sae_id=r.integer("target_sae_id", lo=MIN_PEER_SAE_ID) if r.has("target_sae_id") else None,
            sae_directory=_optional_path(r, "sae_directory"),
            sni=r.optional_string("sni"),
            verify=r.boolean("verify", True),
            prefetch=r.integer("prefetch", 0, lo=0, hi=1024),
            announce_keys=r.integer("announce_keys", 4, lo=0, hi=MAX_ANNOUNCED_KEYS),
            rekey_after_bytes=r.integer("rekey_after_bytes", lo=1) if r.has("rekey_after_bytes") else None,
            rekey_after_seconds=(
                r.number("rekey_after_seconds", 60.0, hi=86400.0) if r.has("rekey_after_seconds") else None
            ),
        )
        if values["sae_directory"] is not None:
            try:
                SaeDirectory.load(values["sae_directory"])
            except DirectoryError as exc:
                raise r.error("sae_directory", str(exc)) from None
        if qkd == "required" and values["target_sae_id"] is None and values["sae_directory"] is None:
            raise r.error("target_sae_id", 'qkd = "required" needs target_sae_id or sae_directory')
    else:
        values.update(
            allowed_peer_sae_ids=_sae_ids(r, "allowed_peer_sae_ids"),
            accept_key_announcements=r.boolean("accept_key_announcements", False),
            max_handshakes=r.integer("max_handshakes", 256, lo=1, hi=1_000_000),
            max_kme_lookups=r.integer("max_kme_lookups", DEFAULT_MAX_LOOKUPS, lo=1, hi=65536),
            max_kme_lookups_per_source=r.integer(
                "max_kme_lookups_per_source", TUNNEL_LOOKUPS_PER_SOURCE, lo=1, hi=65536
            ),
            used_key_memory=r.number("used_key_memory", DEFAULT_USED_KEY_MEMORY, hi=86400.0 * 30),
        )
        # Classic clients (preferred/off) and the reference profile need a certificate; a required,
        # secure-only server authenticates with the QKD key alone.
        needs_cert = qkd != "required" or "reference" in profiles
        if needs_cert and values["cert"] is None:
            raise r.error("cert", f'qkd = "{qkd}" with profiles {list(profiles)} needs a server certificate')
        if qkd == "required" and values["cafile"] is not None and not values["allowed_peer_sae_ids"]:
            raise r.error(
                "allowed_peer_sae_ids",
                'qkd = "required" with cafile (client certificates) accepts only the SAEs listed here: '
                "TLS-QKD clients present no certificate",
            )
    r.finish()
    return ServiceConfig(**values)


def parse_config(
    doc: Mapping[str, Any], *, origin: str = "tunnel.toml", base: Path | None = None
) -> TunnelConfig:
    r = Reader(doc, "", origin, base or Path.cwd())
    tunnel = r.table("tunnel")
    grace, metrics = 30.0, None
    if tunnel is not None:
        grace = tunnel.number("grace_period", 30.0, hi=3600.0)
        metrics = _host_port(tunnel, "metrics", any_port=True) if tunnel.has("metrics") else None
        tunnel.finish()
    shared = r.table("kme")
    shared_kme = _kme(shared) if shared is not None else None
    services_table = r.table("services", required=True)
    assert services_table is not None
    if not services_table.doc:
        raise r.error("services", "no service defined ([services.NAME] tables)")
    services = []
    accepts: dict[tuple[str, int], str] = {}
    for name, body in services_table.doc.items():
        services_table.seen.add(name)
        if not isinstance(body, dict):
            raise services_table.error(name, "must be a table ([services.NAME])")
        service = _service(services_table.child(body, name), name, shared_kme)
        if service.accept[1] != 0 and service.accept in accepts:
            raise services_table.error(
                f"{name}.accept",
                f"{service.accept[0]}:{service.accept[1]} is already service {accepts[service.accept]}'s",
            )
        accepts[service.accept] = name
        services.append(service)
    r.finish()
    return TunnelConfig(path=None, services=tuple(services), grace_period=grace, metrics=metrics)


def load_config(path: str | Path) -> TunnelConfig:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return dataclasses.replace(parse_config(doc, origin=str(path), base=path.resolve().parent), path=path)
