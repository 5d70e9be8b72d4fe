"""Router: what the key service asks about the network (where an SAE lives, which path to relay along).

Built by ``kme/server.py`` from the configuration and fed by the link-state exchange (``exchange.py``); read
by the service (``KmeService(..., router=...)``) and the admin map. Every method is a quick synchronous
computation over the link-state database at the current time: no I/O, safe to call on the event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from qkdtls.kme.routing import paths
from qkdtls.kme.routing.lsdb import LinkStateDb
from qkdtls.kme.routing.settings import NetworkSettings, StaticRoute

log = logging.getLogger("qkdtls.kme.routing")

# Stock of a link this KME cannot see (the exchange is off, or a static route's later hops): large enough
# that no request is refused for it; the relay finds out.
UNKNOWN_STOCK = 1 << 62
_MAX_CONFLICTS_LOGGED = 256


class Router:
    def __init__(
        self,
        kme_id: int,
        neighbours: Collection[int],
        *,
        settings: NetworkSettings | None = None,
        saes: Mapping[int, int] | None = None,
        db: LinkStateDb | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``saes``: the static ``[[saes]]`` of the configuration (SAE ID -> KME ID), which win over adverts;
        ``db``: the link-state database (None: the exchange is off)."""
        self.kme_id = kme_id
        self.neighbours = frozenset(neighbours) - {kme_id}
        self.settings = settings or NetworkSettings()
        self.static_saes = dict(saes or {})
        self.db = db
        self.clock = clock
        self._routes: dict[int, list[tuple[int, ...]]] = {}
        for route in self.settings.routes:
            self._routes.setdefault(route.destination, []).append(route.path)
        self._conflicts: set[tuple[int, int]] = set()

    @property
    def max_hops(self) -> int:
        return self.settings.max_hops

    @property
    def static_routes(self) -> tuple[StaticRoute, ...]:
        return self.settings.routes

    # -- the graph -------------------------------------------------------------------------------------------

    def graph(self) -> paths.Graph:
        """Usable links now: ``graph[a][b]`` = free blocks ``a`` draws towards ``b``."""
        if self.db is not None:
            return self.db.graph(self.clock())
        return self._own_links()

    def _own_links(self) -> dict[int, dict[int, int]]:
        # Without the exchange nothing says a link is down: every configured link counts as up.
        return {
            self.kme_id: dict.fromkeys(self.neighbours, UNKNOWN_STOCK),
            **{n: {self.kme_id: UNKNOWN_STOCK} for n in self.neighbours},
        }

    # -- what the service asks -------------------------------------------------------------------------------

    def kme_of(self, sae_id: int) -> int | None:
        """The KME ``sae_id`` is attached to: the static ``[[saes]]`` entry, else the adverts (an SAE
        claimed by several KMEs: the reachable one with the lowest ID, then the lowest ID)."""
        static = self.static_saes.get(sae_id)
        if self.db is None:
            return static
        owners = self.db.sae_owners(sae_id)
        if static is not None:
            for owner in owners:
                if owner != static:
                    self._conflict(sae_id, owner, static)
            return static
        if not owners:
            return None
        if len(owners) > 1:
            reach = paths.reachable(self.graph(), self.kme_id)
            live = [o for o in owners if o in reach]
            chosen = (live or list(owners))[0]
            for owner in owners:
                if owner != chosen:
                    self._conflict(sae_id, owner, chosen)
            return chosen
        return owners[0]

    def _conflict(self, sae_id: int, claimant: int, chosen: int) -> None:
        # Logged once per (SAE, claimant): the condition lasts as long as two configurations disagree.
        if (sae_id, claimant) in self._conflicts or len(self._conflicts) >= _MAX_CONFLICTS_LOGGED:
            return
        self._conflicts.add((sae_id, claimant))
        log.warning(
            "two KMEs claim one SAE",
            extra={"event": "routing.sae_conflict", "SAE_ID": sae_id, "claimant": claimant, "chosen": chosen},
        )

    def path(self, dst_kme: int, *, need_blocks: int = 0) -> tuple[int, ...] | None:
        """The path to relay along: this KME first, ``dst_kme`` last, over live links with ``need_blocks``
        free on each (in the sender's direction); a static route when the configuration has some for
        ``dst_kme`` (the first usable one, never another path). None: no path now."""
        if dst_kme == self.kme_id:
            return (self.kme_id,)
        graph = self.graph()
        static = self._routes.get(dst_kme)
        if static is not None:
            for route in static:
                if self._route_usable(graph, route, need_blocks):
                    return route
            return None
        return paths.shortest_path(
            graph, self.kme_id, dst_kme, need_blocks=need_blocks, max_hops=self.max_hops
        )

    def disjoint_paths(self, dst_kme: int, n: int, *, need_blocks: int = 0) -> list[tuple[int, ...]]:
        """Up to ``n`` paths to ``dst_kme`` sharing no KME but the ends, preferred first (static routes:
        the usable ones that are disjoint from those before them, in configuration order)."""
        if n <= 0:
            return []
        if dst_kme == self.kme_id:
            return [(self.kme_id,)]
        graph = self.graph()
        static = self._routes.get(dst_kme)
        if static is not None:
            chosen: list[tuple[int, ...]] = []
            inner: set[int] = set()
            for route in static:
                if len(chosen) == n:
                    break
                middle = set(route[1:-1])
                if (
                    not middle & inner
                    and route not in chosen
                    and self._route_usable(graph, route, need_blocks)
                ):
                    chosen.append(route)
                    inner |= middle
            return chosen
        return paths.disjoint_paths(
            graph, self.kme_id, dst_kme, n, need_blocks=need_blocks, max_hops=self.max_hops
        )

    def stock(self, a: int, b: int) -> int | None:
        """Free blocks KME ``a`` may draw towards ``b`` as advertised (the lower of both ends' views), or
        None when the link is not usable now."""
        return self.graph().get(a, {}).get(b)

    def usable(self, path: Sequence[int]) -> bool:
        """Every link of ``path`` is up now (it starts here, repeats no KME, has at most max_hops links)."""
        path = tuple(path)
        if not path or path[0] != self.kme_id:
            return False
        return self._route_usable(self.graph(), path, 0)

    def _route_usable(self, graph: paths.Graph, route: tuple[int, ...], need_blocks: int) -> bool:
        if self.db is None:
            # Only the first hop is known (a configured peer): the rest is the operator's word.
            return (
                len(route) >= 2
                and route[1] in self.neighbours
                and paths.is_simple(route)
                and len(route) - 1 <= self.max_hops
            )
        return paths.usable_path(graph, route, need_blocks, self.max_hops)

    # -- the view for the admin API and the map --------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """``{"kme_id", "nodes": [{"kme_id", "up", "saes", "age_s"}], "links": [{"a", "b", "up",
        "stock_blocks": {"a->b": n, "b->a": n}}]}`` (a < b; a stock nobody advertised is null)."""
        now = self.clock()
        if self.db is None:
            own_saes = sorted(s for s, k in self.static_saes.items() if k == self.kme_id)
            nodes: list[dict[str, Any]] = [
                {"kme_id": self.kme_id, "up": True, "saes": own_saes, "age_s": 0.0}
            ]
            nodes += [
                {
                    "kme_id": n,
                    "up": None,  # unknown without the exchange
                    "saes": sorted(s for s, k in self.static_saes.items() if k == n),
                    "age_s": None,
                }
                for n in sorted(self.neighbours)
            ]
            links = [
                {
                    "a": min(self.kme_id, n),
                    "b": max(self.kme_id, n),
                    "up": None,
                    "stock_blocks": {
                        f"{min(self.kme_id, n)}->{max(self.kme_id, n)}": None,
                        f"{max(self.kme_id, n)}->{min(self.kme_id, n)}": None,
                    },
                }
                for n in sorted(self.neighbours)
            ]
            return {"kme_id": self.kme_id, "nodes": nodes, "links": links}
        db = self.db
        graph = db.graph(now)
        reach = paths.reachable(graph, self.kme_id)
        nodes = []
        for origin in db.origins(now):
            advert = db.advert(origin, now)
            assert advert is not None
            age = db.age(origin, now)
            node: dict[str, Any] = {
                "kme_id": origin,
                "up": origin in reach,
                "saes": list(advert.saes),
                "age_s": round(age, 3) if age is not None else None,
            }
            if advert.name:
                node["name"] = advert.name
            nodes.append(node)
        known = {node["kme_id"] for node in nodes}
        for link in db.links(now):
            for end in (link.a, link.b):
                if end not in known:  # mentioned by a neighbour, never heard from itself
                    known.add(end)
                    nodes.append({"kme_id": end, "up": False, "saes": [], "age_s": None})
        nodes.sort(key=lambda node: node["kme_id"])
        links = [
            {
                "a": link.a,
                "b": link.b,
                "up": link.up,
                "stock_blocks": {f"{link.a}->{link.b}": link.stock_ab, f"{link.b}->{link.a}": link.stock_ba},
            }
            for link in db.links(now)
        ]
        return {"kme_id": self.kme_id, "nodes": nodes, "links": links}
