"""Provisioning a QKD network: PKI, key folders and a working KME configuration for every site.

A network is ``N`` sites (a KME and its SAEs) and a list of QKD links between pairs of sites. For each site
this writes ``kme<ID>.toml`` (listeners, store, local link, one ``[[peers]]`` entry per link with the peer's
URL, certificates and identity, every SAE of the site and of its linked peers, the administrator) and one
key folder per link end: ``keys/kme<ID>/link-<peer>`` (and ``keys/kme<ID>/local``). The QKD stack, or
``qkdtls qkd-link``, writes identical files into the two folders of a link. Configurations are generated
from the PKI layout, never typed from printed fingerprints. ``qkdtls pki init`` and the testbed use it.

    net = provision(root, [Site(1, {1001: serial}), Site(2, {2001: serial})], [(1, 2)])
    net.configs[1]   # root / "kme1.toml"
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qkdtls.pki import PkiLayout, ZoneSpec, build_testbed_pki

LOOPBACK = "127.0.0.1"


class ProvisionError(ValueError):
    """A network that cannot be provisioned (unknown site in a link, a link to itself, duplicate IDs)."""


@dataclass(frozen=True)
class Site:
    """One KME and its SAEs (SAE ID -> serial of its client certificate). Ports: where it listens."""

    kme_id: int
    saes: Mapping[int, int] = field(default_factory=dict)
    nickname: str = ""
    host: str = LOOPBACK
    sae_port: int = 8443
    inter_kme_port: int = 9443
    # TOML tables merged into this site's configuration after ``KmeSettings.extra`` (see merge_tables).
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KmeSettings:
    """What every generated configuration shares (see docs/kme.example.toml for each field).

    ``store``: "sqlite" (``kme<ID>.sqlite3`` next to the configuration), "memory", or KME ID -> store URL.
    ``service``/``sae_interface``: extra fields of those tables. ``extra``: TOML tables merged into every
    configuration (``{"network": {"hello_interval": 0.5}}``; see :func:`merge_tables`).
    """

    store: str | Mapping[int, str] = "sqlite"
    block_size: int = 32
    service: Mapping[str, Any] = field(default_factory=dict)
    sae_interface: Mapping[str, Any] = field(default_factory=dict)
    delete_after_import: bool = False
    peer_timeout: float = 5.0
    sweep_interval: float = 5.0
    ingest_interval: float = 0.5
    local_links: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Network:
    """What :func:`provision` wrote: the PKI, a configuration per site, the folders of every link."""

    root: Path
    pki: PkiLayout
    sites: dict[int, Site]
    links: tuple[tuple[int, int], ...]  # (lower KME ID, higher KME ID)
    settings: KmeSettings
    configs: dict[int, Path]
    # (a, b) with a <= b -> (a's folder, b's folder); (k, k) -> (k's local folder,)
    folders: dict[tuple[int, int], tuple[Path, ...]]

    def peers_of(self, kme_id: int) -> list[int]:
        return sorted({b if a == kme_id else a for a, b in self.links if kme_id in (a, b)})

    def folder(self, kme_id: int, peer: int) -> Path:
        """The folder of ``kme_id``'s end of its link to ``peer`` (``peer == kme_id``: the local link)."""
        ends = self.folders[(min(kme_id, peer), max(kme_id, peer))]
        return ends[0] if kme_id <= peer else ends[1]

    def sae_url(self, kme_id: int) -> str:
        site = self.sites[kme_id]
        return f"https://{site.host}:{site.sae_port}"

    def inter_kme_url(self, kme_id: int) -> str:
        site = self.sites[kme_id]
        return f"https://{site.host}:{site.inter_kme_port}"

    def set_ports(self, ports: Mapping[int, tuple[int, int]]) -> None:
        """New (SAE, inter-KME) ports for some sites; rewrites every configuration (peers name the ports)."""
        for kme_id, (sae_port, inter_port) in ports.items():
            self.sites[kme_id] = replace(self.sites[kme_id], sae_port=sae_port, inter_kme_port=inter_port)
        self.write_configs()

    def write_configs(self) -> None:
        for kme_id, path in self.configs.items():
            path.write_text(render_config(self, kme_id), encoding="utf-8")

    def store_url(self, kme_id: int) -> str:
        store = self.settings.store
        if isinstance(store, Mapping):
            return str(store[kme_id])
        if store == "memory":
            return "sqlite://:memory:"
        if store == "sqlite":
            return f"sqlite:///{self.root / f'kme{kme_id}.sqlite3'}"
        raise ProvisionError(f"unknown store {store!r}: use 'sqlite', 'memory' or a mapping of URLs")


def normalise_links(sites: Iterable[int], links: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    known = set(sites)
    out: list[tuple[int, int]] = []
    for a, b in links:
        if a == b:
            raise ProvisionError(f"link {a}-{b}: a KME's local link is not a QKD link (see local_links)")
        for end in (a, b):
            if end not in known:
                raise ProvisionError(f"link {a}-{b}: KME {end} is not one of the sites")
        pair = (min(a, b), max(a, b))
        if pair in out:
            raise ProvisionError(f"link {a}-{b} is listed twice")
        out.append(pair)
    return tuple(out)


def provision(
    root: Path,
    sites: Sequence[Site],
    links: Iterable[tuple[int, int]],
    settings: KmeSettings | None = None,
    *,
    key_type: str = "ec-p256",
    days: int = 365,
    hostname: str = "localhost",
    pki: PkiLayout | None = None,
) -> Network:
    """Issue the PKI (unless ``pki`` is given), create the key folders and write every configuration."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = settings or KmeSettings()
    ids = [s.kme_id for s in sites]
    if len(set(ids)) != len(ids):
        raise ProvisionError(f"KME IDs must be distinct, got {ids}")
    pairs = normalise_links(ids, links)
    if pki is None:
        peers = {k: sorted({b if a == k else a for a, b in pairs if k in (a, b)}) for k in ids}
        specs = [ZoneSpec(kme_id=s.kme_id, saes=dict(s.saes), hostname=hostname) for s in sites]
        pki = build_testbed_pki(root / "pki", specs, key_type=key_type, days=days, peers=peers)
    keys = root / "keys"
    folders: dict[tuple[int, int], tuple[Path, ...]] = {}
    for a, b in pairs:
        folders[(a, b)] = (keys / f"kme{a}" / f"link-{b}", keys / f"kme{b}" / f"link-{a}")
    if settings.local_links:
        for k in ids:
            folders[(k, k)] = (keys / f"kme{k}" / "local",)
    for ends in folders.values():
        for folder in ends:
            folder.mkdir(parents=True, exist_ok=True)
    network = Network(
        root=root,
        pki=pki,
        sites={s.kme_id: s for s in sites},
        links=pairs,
        settings=settings,
        configs={k: root / f"kme{k}.toml" for k in ids},
        folders=folders,
    )
    network.write_configs()
    return network


# --- TOML --------------------------------------------------------------------------------------------------

HEADER = "# Generated by qkdtls (qkdtls.provision): regenerate rather than edit by hand."
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_str(value: str | Path) -> str:
    # A JSON string is a valid TOML basic string for the characters paths and URLs contain.
    return json.dumps(str(value))


def toml_value(value: Any) -> str:
    """A TOML scalar or an inline array of scalars."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProvisionError(f"{value!r} has no TOML form here")
        return repr(value)
    if isinstance(value, (str, Path)):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ProvisionError(f"cannot write {type(value).__name__} as a TOML value")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def dump_toml(doc: Mapping[str, Any], header: str = HEADER) -> str:
    """Tables (``name -> {field: value}``) and arrays of tables (``name -> [{...}, ...]``) as TOML text.

    Inside a table, scalars and arrays of scalars come first, then sub-tables and arrays of sub-tables."""
    lines = [header] if header else []

    def table(path: str, body: Mapping[str, Any], array: bool) -> None:
        lines.append(f"[[{path}]]" if array else f"[{path}]")
        nested = []
        for key, value in body.items():
            if isinstance(value, Mapping) or _is_table_array(value):
                nested.append((key, value))
            else:
                lines.append(f"{_toml_key(key)} = {toml_value(value)}")
        lines.append("")
        for key, value in nested:
            emit(f"{path}.{_toml_key(key)}", value)

    def emit(path: str, value: Any) -> None:
        if isinstance(value, Mapping):
            table(path, value, False)
        else:
            for item in value:
                table(path, item, True)

    for name, value in doc.items():
        if not (isinstance(value, Mapping) or _is_table_array(value)):
            raise ProvisionError(f"{name}: a configuration holds tables, not a bare {type(value).__name__}")
        emit(_toml_key(name), value)
    return "\n".join(lines)


def merge_tables(base: dict[str, Any], extra: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``extra`` merged into ``base`` (in place): tables merge field by field (``extra`` wins), arrays of
    tables are appended to (``[[network.routes]]`` entries add to generated ones), other values replace."""
    for key, value in extra.items():
        here = f"{where}.{key}" if where else key
        current = base.get(key)
        if isinstance(value, Mapping):
            if current is None:
                base[key] = merge_tables({}, value, here)
            elif isinstance(current, dict):
                merge_tables(current, value, here)
            else:
                raise ProvisionError(f"{here}: a table cannot replace a value")
        elif _is_table_array(value):
            if current is not None and not _is_table_array(current):
                raise ProvisionError(f"{here}: an array of tables cannot replace a value")
            base[key] = [*(current or []), *(dict(v) for v in value)]
        else:
            if isinstance(current, dict):
                raise ProvisionError(f"{here}: a value cannot replace a table")
            base[key] = value
    return base


def config_tables(net: Network, kme_id: int) -> dict[str, Any]:
    """The configuration of one site's KME as TOML tables (before the extra tables are merged in)."""
    site = net.sites[kme_id]
    settings = net.settings
    zone = net.pki.zones[kme_id]
    peers = net.peers_of(kme_id)
    # Inter-KME clients present certificates of their own zone's CA: trust exactly the linked peers' CAs.
    peer_cas = [str(net.pki.zones[p].ca) for p in peers]
    doc: dict[str, Any] = {
        "kme": {"id": kme_id, "nickname": site.nickname or f"KME {kme_id}"},
        "sae_interface": {
            "listen": f"{site.host}:{site.sae_port}",
            "cert": zone.kme_server.cert,
            "key": zone.kme_server.key,
            "client_ca": zone.ca,
            **settings.sae_interface,
        },
    }
    if peers:
        doc["inter_kme"] = {
            "listen": f"{site.host}:{site.inter_kme_port}",
            "cert": zone.inter_kme_server.cert,
            "key": zone.inter_kme_server.key,
            "client_ca": peer_cas,
        }
    doc["store"] = {"url": net.store_url(kme_id)}
    doc["service"] = {"block_size": settings.block_size, **settings.service}
    if (kme_id, kme_id) in net.folders:
        doc["local_link"] = {
            "folder": net.folder(kme_id, kme_id),
            "delete_after_import": settings.delete_after_import,
        }
    doc["peers"] = [
        {
            "kme_id": peer,
            "url": net.inter_kme_url(peer),
            "client_cert": zone.inter_kme_clients[peer].cert,
            "client_key": zone.inter_kme_clients[peer].key,
            "ca": net.pki.zones[peer].ca,
            "fingerprint": net.pki.zones[peer].inter_kme_clients[kme_id].fingerprint_sha256,
            "issuer": net.pki.zones[peer].ca,
            "folder": net.folder(kme_id, peer),
            "delete_after_import": settings.delete_after_import,
            "timeout": float(settings.peer_timeout),
        }
        for peer in peers
    ]
    saes: list[dict[str, Any]] = []
    for owner in [kme_id, *peers]:
        for sae_id in sorted(net.sites[owner].saes):
            entry: dict[str, Any] = {"id": sae_id, "kme_id": owner}
            if owner == kme_id:
                entry["serial"] = zone.saes[sae_id].serial_hex
                entry["issuer"] = zone.ca
            saes.append(entry)
    doc["saes"] = saes
    doc["admins"] = [{"name": "admin", "fingerprint": zone.admin.fingerprint_sha256}]
    doc["metrics"] = {"enabled": True}
    doc["sweeper"] = {"interval": float(settings.sweep_interval)}
    doc["ingest"] = {"interval": float(settings.ingest_interval)}
    return {name: value for name, value in doc.items() if value != []}


def render_config(net: Network, kme_id: int) -> str:
    """The TOML configuration of one site's KME: the generated tables, then ``KmeSettings.extra`` and the
    site's ``extra`` merged in."""
    doc = config_tables(net, kme_id)
    merge_tables(doc, net.settings.extra)
    merge_tables(doc, net.sites[kme_id].extra)
    return dump_toml(doc)
