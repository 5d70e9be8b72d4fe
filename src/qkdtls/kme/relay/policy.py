"""Which relay mode a request gets: the KME's ``[relay]`` configuration, per destination KME, and per request
through ETSI GS QKD 014 ``extension_mandatory`` / ``extension_optional`` entries (pure code).

Extensions (documented in kme/openapi.yaml):

- ``qkdtls_relay_mode``: ``"trusted"`` (hop by hop; every intermediate KME sees the key) or ``"spread"``
  (shares over node-disjoint paths; no intermediate KME, nor fewer than ``threshold`` of them together,
  learns anything about the key);
- ``qkdtls_relay_paths``: spread: the number of node-disjoint paths (shares), 2..16;
- ``qkdtls_relay_threshold``: spread: the shares that rebuild the key, 2..paths. Equal to ``paths``: XOR
  n-of-n; lower: Shamir k-of-n (tolerates paths - threshold lost paths).

A request may ask for more protection than the policy (``spread``), never for less: ``trusted`` is honoured
only where the policy allows it (the destination's mode is ``trusted``, or its ``fallback`` is ``trusted``).
A mandatory entry that cannot be honoured is a 400; an optional one is then ignored. A spread that finds too
few disjoint paths fails (503) unless it came from the policy or an optional entry and the policy's
fallback is ``trusted``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qkdtls.etsi014.models import MSG_EXT_MANDATORY_UNMET, MSG_EXT_MANDATORY_UNSUPPORTED
from qkdtls.kme.errors import BadRequestError

EXT_MODE = "qkdtls_relay_mode"
EXT_PATHS = "qkdtls_relay_paths"
EXT_THRESHOLD = "qkdtls_relay_threshold"
EXTENSIONS = frozenset({EXT_MODE, EXT_PATHS, EXT_THRESHOLD})
MODES = ("trusted", "spread")
MAX_PATHS = 16
# Without a router (direct links only); with one, its ``max_hops`` ([network] max_hops) bounds every path.
DEFAULT_MAX_HOPS = 8
DEFAULT_TIMEOUT = 10.0
# Keys relayed ahead (kme/relay/prefetch.py): per pair at most MAX_PREFETCH ready, kept at most
# prefetch_max_age seconds (well below the slave KMEs' reservation_ttl, 600 s by default), refilled while
# the pair was used in the last prefetch_idle seconds.
MAX_PREFETCH = 4096
DEFAULT_PREFETCH_MAX_AGE = 60.0
DEFAULT_PREFETCH_IDLE = 30.0


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    """How keys reach one destination KME (or any, as the default)."""

    mode: str = "trusted"
    fallback: bool = False  # spread with too few disjoint paths may go trusted instead
    paths: int = 2
    threshold: int = 0  # 0: all paths (XOR n-of-n)
    prefetch: int = 0  # keys kept relayed ahead per (master SAE, slave SAE, size, mode); 0: on demand only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if not 2 <= self.paths <= MAX_PATHS:
            raise ValueError(f"paths must lie within 2..{MAX_PATHS}")
        if self.threshold and not 2 <= self.threshold <= self.paths:
            raise ValueError("threshold must be 0 (all paths) or lie within 2..paths")
        if not 0 <= self.prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must lie within 0..{MAX_PREFETCH}")

    @property
    def trusted_allowed(self) -> bool:
        return self.mode == "trusted" or self.fallback


@dataclass(frozen=True, slots=True)
class RelaySettings:
    default: RelayPolicy = field(default_factory=RelayPolicy)
    destinations: Mapping[int, RelayPolicy] = field(default_factory=dict)
    # Bound on one relay, from the master's enc_keys to the answer from the last hop.
    timeout: float = DEFAULT_TIMEOUT
    prefetch_max_age: float = DEFAULT_PREFETCH_MAX_AGE
    prefetch_idle: float = DEFAULT_PREFETCH_IDLE

    def policy(self, destination: int) -> RelayPolicy:
        return self.destinations.get(destination, self.default)


@dataclass(frozen=True, slots=True)
class RelayChoice:
    """The mode one request gets for one destination KME."""

    mode: str
    paths: int = 1
    threshold: int = 1
    fallback: bool = False  # spread may become trusted when too few disjoint paths exist

    @property
    def scheme(self) -> str:
        return "xor" if self.threshold == self.paths else "shamir"

    def trusted(self) -> RelayChoice:
        return RelayChoice("trusted")


def _entries(extensions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in extensions:
        out.update(entry)
    return out


def unsupported_mandatory(mandatory: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({name for entry in mandatory for name in entry} - EXTENSIONS)


def _count(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequestError(f"extension {name} must be an integer in {lo}..{hi}")
    return value


def choose(
    policy: RelayPolicy,
    mandatory: Sequence[Mapping[str, Any]] = (),
    optional: Sequence[Mapping[str, Any]] = (),
) -> RelayChoice:
    """The relay mode of a request to a destination under ``policy``; BadRequestError for mandatory
    extensions that are unknown or cannot be met, and for malformed values."""
    unknown = unsupported_mandatory(mandatory)
    if unknown:
        raise BadRequestError(MSG_EXT_MANDATORY_UNSUPPORTED, [{"unsupported": unknown}])
    must, may = _entries(mandatory), _entries(optional)
    mode, strict = policy.mode, False
    for entries, is_mandatory in ((may, False), (must, True)):
        if EXT_MODE not in entries:
            continue
        wanted = entries[EXT_MODE]
        if wanted not in MODES:
            raise BadRequestError(f"extension {EXT_MODE} must be one of {', '.join(MODES)}")
        if wanted == "trusted" and not policy.trusted_allowed:
            if is_mandatory:
                raise BadRequestError(
                    MSG_EXT_MANDATORY_UNMET,
                    [{EXT_MODE: "trusted relay is not allowed to this destination (policy: spread)"}],
                )
            continue
        mode, strict = wanted, is_mandatory
    if mode == "trusted":
        return RelayChoice("trusted")
    merged = {**may, **must}
    paths = _count(merged[EXT_PATHS], EXT_PATHS, 2, MAX_PATHS) if EXT_PATHS in merged else policy.paths
    if EXT_THRESHOLD in merged:
        threshold = _count(merged[EXT_THRESHOLD], EXT_THRESHOLD, 2, paths)
    elif EXT_PATHS in merged or not policy.threshold:
        threshold = paths
    else:
        threshold = min(policy.threshold, paths)
    return RelayChoice("spread", paths, threshold, fallback=policy.fallback and not strict)


class _Table(Protocol):
    """What :func:`parse_relay` needs of the configuration reader (``kme/config.py``)."""

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str: ...
    def integer(self, name: str, default: int | None = None, *, lo: int = ..., hi: int = ...) -> int: ...
    def number(self, name: str, default: float, *, lo: float = 0.0, hi: float = 1e9) -> float: ...
    def tables(self, name: str) -> list[Any]: ...
    def error(self, name: str | None, problem: str) -> Exception: ...
    def finish(self) -> None: ...


def _policy(r: _Table, default: RelayPolicy) -> RelayPolicy:
    mode = r.string("mode", default.mode)
    if mode not in MODES:
        raise r.error("mode", f"must be one of {', '.join(repr(m) for m in MODES)}")
    fallback = r.string("fallback", "trusted" if default.fallback else "none")
    if fallback not in ("none", "trusted"):
        raise r.error("fallback", 'must be "none" or "trusted"')
    paths = r.integer("paths", default.paths, lo=2, hi=MAX_PATHS)
    threshold = r.integer("threshold", default.threshold if default.threshold <= paths else 0, lo=0, hi=paths)
    if threshold == 1:
        raise r.error("threshold", "must be 0 (all paths: XOR) or at least 2")
    prefetch = r.integer("prefetch", default.prefetch, lo=0, hi=MAX_PREFETCH)
    return RelayPolicy(
        mode=mode, fallback=fallback == "trusted", paths=paths, threshold=threshold, prefetch=prefetch
    )


def parse_relay(r: _Table | None) -> RelaySettings:
    """The ``[relay]`` table (docs/kme.example.toml); errors name the field."""
    if r is None:
        return RelaySettings()
    default = _policy(r, RelayPolicy())
    timeout = r.number("timeout", DEFAULT_TIMEOUT, hi=300.0)
    max_age = r.number("prefetch_max_age", DEFAULT_PREFETCH_MAX_AGE, hi=3600.0)
    idle = r.number("prefetch_idle", DEFAULT_PREFETCH_IDLE, hi=3600.0)
    destinations: dict[int, RelayPolicy] = {}
    for d in r.tables("destinations"):
        kme_id = d.integer("kme_id")
        if kme_id in destinations:
            raise d.error("kme_id", f"KME {kme_id} has two [[relay.destinations]] entries")
        destinations[kme_id] = _policy(d, default)
        d.finish()
    r.finish()
    return RelaySettings(
        default=default,
        destinations=destinations,
        timeout=timeout,
        prefetch_max_age=max_age,
        prefetch_idle=idle,
    )
