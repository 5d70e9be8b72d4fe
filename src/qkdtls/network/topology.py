"""A QKD network described in TOML: sites (a KME and its SAEs), links with their simulated key rates, and
the settings every generated KME configuration shares. Pure: parsing and checks, no files written.

    topology = load_topology(Path("chain-4.toml"))
    topology.sites[0].kme_id, topology.links[0].rate

Every error names the file and the field (``chain.toml: links[2].between: KME 9 is not one of the sites``),
as the KME configuration's errors do. docs/network.md documents the format.
"""

from __future__ import annotations

import argparse
import tomllib
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qkdtls.cli.qkd_link import parse_size
from qkdtls.pki import KEY_TYPES, LOOPBACK

_I64_MAX = 2**63 - 1
DEFAULT_RATE = 16 * 1024
DEFAULT_INITIAL_KEY = 256 * 1024
DEFAULT_LOCAL_KEY = 64 * 1024
DEFAULT_BASE_PORT = 8440
MAX_SITES = 64
MAX_RATE = 64 * 1024 * 1024


# The topologies shipped in qkdtls/network/examples/.
EXAMPLES = {
    "chain-4": "a chain of four sites (A-B-C-D): the end sites are three links apart",
    "ring-5": "a ring of five sites: two node-disjoint paths between any two sites",
    "spread-8": "the eight-KME network of the key-spreading paper (1 -> {2,3,4} -> {5,6,7} -> 8)",
}


class TopologyError(ValueError):
    """A topology mistake; the message names the file and the field."""


def example_path(name: str) -> Path:
    return Path(str(resources.files("qkdtls.network").joinpath("examples", f"{name}.toml")))


def topology_path(text: str | Path) -> Path:
    """A topology file, or the file of the shipped example of that name (when no such file exists)."""
    path = Path(text)
    return example_path(str(text)) if not path.exists() and str(text) in EXAMPLES else path


@dataclass(frozen=True)
class SiteSpec:
    kme_id: int
    name: str
    saes: tuple[int, ...]
    sae_port: int
    inter_kme_port: int
    kme: Mapping[str, Any] = field(default_factory=dict)  # TOML tables merged into this KME's configuration


@dataclass(frozen=True)
class LinkSpec:
    a: int
    b: int
    rate: int  # simulated key material, bytes per second (``qkdtls network up``)
    initial_key: int  # bytes written to both ends by ``qkdtls network init``

    @property
    def pair(self) -> tuple[int, int]:
        return (min(self.a, self.b), max(self.a, self.b))


@dataclass(frozen=True)
class Topology:
    name: str
    description: str
    sites: tuple[SiteSpec, ...]
    links: tuple[LinkSpec, ...]
    host: str = LOOPBACK
    store: str = "sqlite"
    block_size: int = 32
    key_type: str = "ec-p256"
    days: int = 365
    local_key: int = DEFAULT_LOCAL_KEY
    kme: Mapping[str, Any] = field(default_factory=dict)  # TOML tables merged into every configuration

    def site(self, kme_id: int) -> SiteSpec:
        for site in self.sites:
            if site.kme_id == kme_id:
                return site
        raise KeyError(kme_id)

    def neighbours(self, kme_id: int) -> list[int]:
        return sorted({link.b if link.a == kme_id else link.a for link in self.links if kme_id in link.pair})

    def hops(self, start: int) -> dict[int, int]:
        """Fewest links from ``start`` to every site it can reach (breadth-first)."""
        seen = {start: 0}
        queue = deque([start])
        while queue:
            here = queue.popleft()
            for peer in self.neighbours(here):
                if peer not in seen:
                    seen[peer] = seen[here] + 1
                    queue.append(peer)
        return seen

    def islands(self) -> list[list[int]]:
        """The sites grouped by which can reach which (one group when the network is connected)."""
        left = [s.kme_id for s in self.sites]
        groups = []
        while left:
            group = sorted(self.hops(left[0]))
            groups.append(group)
            left = [k for k in left if k not in group]
        return groups

    def sae_site(self) -> dict[int, int]:
        """SAE ID -> KME ID of its site."""
        return {sae: site.kme_id for site in self.sites for sae in site.saes}

    def store_url(self, kme_id: int) -> str:
        """``"sqlite"``, ``"memory"`` or the URL with ``{kme_id}`` filled in."""
        return self.store.replace("{kme_id}", str(kme_id))


# --- reading ------------------------------------------------------------------------------------------------


class _Table:
    """Typed access to one TOML table; errors name ``file: path.to.field``; unknown fields are refused."""

    def __init__(self, doc: Mapping[str, Any], where: str, origin: str) -> None:
        self.doc, self.where, self.origin = doc, where, origin
        self.seen: set[str] = set()

    def error(self, name: str | None, problem: str) -> TopologyError:
        path = f"{self.where}.{name}" if self.where and name else (name or self.where or "(top level)")
        return TopologyError(f"{self.origin}: {path}: {problem}")

    def get(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        self.seen.add(name)
        if name not in self.doc:
            if required:
                raise self.error(name, "missing")
            return default
        return self.doc[name]

    def integer(self, name: str, default: int | None = None, *, lo: int, hi: int = _I64_MAX) -> int:
        value = self.get(name, default, required=default is None)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, "must be an integer")
        if not lo <= value <= hi:
            raise self.error(name, f"must be between {lo} and {hi}")
        return value

    def optional_integer(self, name: str, *, lo: int, hi: int) -> int | None:
        return None if name not in self.doc else self.integer(name, lo=lo, hi=hi)

    def string(self, name: str, default: str | None = None) -> str:
        value = self.get(name, default, required=default is None)
        if not isinstance(value, str) or not value.strip():
            raise self.error(name, "must be a non-empty string")
        return value

    def size(self, name: str, default: int, *, lo: int = 0, hi: int = MAX_RATE) -> int:
        """Bytes: an integer or a string such as ``"64K"`` or ``"1.5MiB"``."""
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error(name, 'must be a number of bytes (an integer, or a string such as "64K")')
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except argparse.ArgumentTypeError:
                raise self.error(name, f'{value!r} is not a size (examples: 4096, "64K", "1M")') from None
        if not lo <= value <= hi:
            raise self.error(name, f"must be between {lo} and {hi} bytes")
        return value

    def tables_of(self, name: str) -> Mapping[str, Any]:
        """A table of TOML tables passed through to KME configurations (checked there)."""
        value = self.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, "must be a table (of KME configuration tables, e.g. [kme.service])")
        for key, item in value.items():
            if not isinstance(item, (dict, list)):
                raise self.error(f"{name}.{key}", "must be a table or an array of tables")
        return value

    def array_of_tables(self, name: str) -> Iterator[_Table]:
        value = self.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, f"must be an array of tables ([[{name}]])")
        prefix = f"{self.where}.{name}" if self.where else name
        for i, item in enumerate(value):
            yield _Table(item, f"{prefix}[{i}]", self.origin)

    def child(self, name: str) -> _Table:
        value = self.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, "must be a table")
        return _Table(value, f"{self.where}.{name}" if self.where else name, self.origin)

    def finish(self) -> None:
        unknown = sorted(set(self.doc) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown field")


def load_topology(path: Path, *, base_port: int | None = None) -> Topology:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TopologyError(f"{path}: not UTF-8 text") from None
    return parse_topology(text, origin=path.name, default_name=path.stem, base_port_override=base_port)


def parse_topology(
    text: str,
    *,
    origin: str = "topology.toml",
    default_name: str = "network",
    base_port_override: int | None = None,
) -> Topology:
    """The topology in ``text``; ``base_port_override`` replaces ``[defaults] base_port``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{origin}: not valid TOML: {exc}") from None
    root = _Table(doc, "", origin)
    name = root.string("name", default_name)
    description = root.get("description", "")
    if not isinstance(description, str):
        raise root.error("description", "must be a string")

    defaults = root.child("defaults")
    rate = defaults.size("rate", DEFAULT_RATE, lo=1)
    initial_key = defaults.size("initial_key", DEFAULT_INITIAL_KEY)
    local_key = defaults.size("local_key", DEFAULT_LOCAL_KEY)
    host = defaults.string("host", LOOPBACK)
    base_port = defaults.integer("base_port", DEFAULT_BASE_PORT, lo=1, hi=65535)
    if base_port_override is not None:
        if not 1 <= base_port_override <= 65535:
            raise TopologyError(f"--base-port {base_port_override}: must be between 1 and 65535")
        base_port = base_port_override
    store = defaults.string("store", "sqlite")
    if store not in ("sqlite", "memory") and "{kme_id}" not in store:
        raise defaults.error("store", 'must be "sqlite", "memory" or a URL with {kme_id} in it')
    block_size = defaults.integer("block_size", 32, lo=16, hi=4096)
    key_type = defaults.string("key_type", "ec-p256")
    if key_type not in KEY_TYPES:
        raise defaults.error("key_type", f"must be one of {', '.join(KEY_TYPES)}")
    days = defaults.integer("days", 365, lo=1, hi=36500)
    defaults.finish()

    sites = _sites(root, base_port)
    links = _links(root, {s.kme_id for s in sites}, rate, initial_key)
    kme = root.tables_of("kme")
    root.finish()
    return Topology(
        name=name,
        description=description,
        sites=tuple(sites),
        links=tuple(links),
        host=host,
        store=store,
        block_size=block_size,
        key_type=key_type,
        days=days,
        local_key=local_key,
        kme=kme,
    )


def _sites(root: _Table, base_port: int) -> list[SiteSpec]:
    sites: list[SiteSpec] = []
    ids: dict[int, str] = {}
    names: dict[str, str] = {}
    sae_owner: dict[int, str] = {}
    ports: dict[int, str] = {}
    tables = list(root.array_of_tables("sites"))
    if not tables:
        raise root.error("sites", "missing: a network needs at least one [[sites]] entry")
    if len(tables) > MAX_SITES:
        raise root.error("sites", f"at most {MAX_SITES} sites")
    for index, t in enumerate(tables):
        kme_id = t.integer("kme_id", lo=1)
        if kme_id in ids:
            raise t.error("kme_id", f"KME {kme_id} is also {ids[kme_id]}")
        ids[kme_id] = t.where
        name = t.string("name", f"site {kme_id}")
        if name in names:
            raise t.error("name", f"{name!r} is also the name of {names[name]}")
        names[name] = t.where
        raw_saes = t.get("saes", [])
        if not isinstance(raw_saes, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in raw_saes
        ):
            raise t.error("saes", "must be an array of SAE IDs (integers)")
        for i, sae in enumerate(raw_saes):
            if not 1 <= sae <= _I64_MAX:
                raise t.error(f"saes[{i}]", f"SAE ID must be between 1 and {_I64_MAX}")
            if sae in sae_owner:
                raise t.error(f"saes[{i}]", f"SAE {sae} is also listed at {sae_owner[sae]}")
            sae_owner[sae] = f"{t.where}.saes"
        port_base = base_port + 2 * index
        sae_port = t.optional_integer("sae_port", lo=1, hi=65535)
        inter_port = t.optional_integer("inter_kme_port", lo=1, hi=65535)
        if (sae_port is None or inter_port is None) and port_base + 1 > 65535:
            raise root.error(
                "defaults.base_port",
                f"leaves no port for {t.where} (the n-th site listens "
                "on base_port + 2n and base_port + 2n + 1)",
            )
        chosen = {"sae_port": sae_port or port_base, "inter_kme_port": inter_port or port_base + 1}
        for label, port in chosen.items():
            if port in ports:
                raise t.error(label, f"port {port} is also {ports[port]}")
            ports[port] = f"{t.where}.{label}"
        kme = t.tables_of("kme")
        t.finish()
        sites.append(
            SiteSpec(kme_id, name, tuple(raw_saes), chosen["sae_port"], chosen["inter_kme_port"], kme)
        )
    return sites


def _links(root: _Table, ids: set[int], rate: int, initial_key: int) -> list[LinkSpec]:
    links: list[LinkSpec] = []
    seen: dict[tuple[int, int], str] = {}
    for t in root.array_of_tables("links"):
        between = t.get("between", required=True)
        if (
            not isinstance(between, list)
            or len(between) != 2
            or not all(isinstance(k, int) and not isinstance(k, bool) for k in between)
        ):
            raise t.error("between", "must be two KME IDs, e.g. between = [1, 2]")
        a, b = between
        if a == b:
            raise t.error("between", f"a link joins two different sites, got KME {a} twice")
        for end in (a, b):
            if end not in ids:
                raise t.error("between", f"KME {end} is not one of the sites")
        pair = (min(a, b), max(a, b))
        if pair in seen:
            raise t.error("between", f"the link {pair[0]}-{pair[1]} is also {seen[pair]}")
        seen[pair] = t.where
        link = LinkSpec(a, b, t.size("rate", rate, lo=1), t.size("initial_key", initial_key))
        t.finish()
        links.append(link)
    return links
