"""The ``[network]`` settings of a KME (parsed by ``kme/config.py``, documented in docs/kme.example.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qkdtls.kme.routing.lsdb import Timers

DEFAULT_MAX_HOPS = 8
MAX_MAX_HOPS = 32  # well below lsa.MAX_PATH


@dataclass(frozen=True, slots=True)
class StaticRoute:
    """``[[network.routes]]``: relay to ``destination`` along ``path`` (this KME first, the destination
    last). Several routes for one destination are tried in configuration order."""

    destination: int
    path: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    # The link-state exchange with the peers (adverts on the inter-KME interface). Off: this KME knows only
    # its own links (assumed up) and its static routes.
    enabled: bool = True
    timers: Timers = field(default_factory=Timers)
    max_hops: int = DEFAULT_MAX_HOPS
    routes: tuple[StaticRoute, ...] = ()
