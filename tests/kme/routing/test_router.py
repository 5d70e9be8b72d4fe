"""Router: what the key service asks (kme_of, path, disjoint_paths, usable, stock) and the map's snapshot."""

from __future__ import annotations

import json
import logging

import pytest

from qkdtls.kme.routing import LinkStateDb, NetworkSettings, Router, StaticRoute, Timers
from qkdtls.kme.routing.lsa import LinkState, make_advert
from qkdtls.kme.routing.router import UNKNOWN_STOCK

WALL0 = 1_700_000_000_000
PLENTY = 10**6


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _ring5_router(
    me: int = 1, *, routes: tuple[StaticRoute, ...] = (), saes: dict[int, int] | None = None
) -> tuple[Router, LinkStateDb, Clock]:
    """KME ``me`` of the ring 1-2-3-4-5-1, its database filled as if every KME had advertised."""
    clock = Clock()
    ring = {k: sorted({k % 5 + 1, (k - 2) % 5 + 1}) for k in range(1, 6)}
    db = LinkStateDb(me, ring[me], Timers())
    db.originate(0.0, WALL0, {n: (PLENTY, PLENTY) for n in ring[me]}, [1000 * me + 1], f"KME {me}")
    for n in ring[me]:  # each neighbour's hello, then everything else through the first neighbour
        hello = make_advert(n, WALL0, [LinkState(p, True, PLENTY, PLENTY) for p in ring[n]], [1000 * n + 1],
                            path=(n,), name=f"KME {n}")  # fmt: skip
        db.receive(n, [hello], 0.0)
    first = ring[me][0]
    for k in range(1, 6):
        if k != me and k not in ring[me]:
            advert = make_advert(k, WALL0, [LinkState(p, True, PLENTY, PLENTY) for p in ring[k]],
                                 [1000 * k + 1], path=(k, first))  # fmt: skip
            db.receive(first, [db.advert(first, 0.0).sent_by(first), advert], 0.0)  # type: ignore[union-attr]
    settings = NetworkSettings(timers=Timers(), routes=routes)
    return Router(me, ring[me], settings=settings, saes=saes, db=db, clock=clock), db, clock


def _hello(db: LinkStateDb, n: int, clock: Clock, links: list[LinkState], seq: int) -> None:
    db.receive(n, [make_advert(n, seq, links, [1000 * n + 1], path=(n,), boot=WALL0)], clock.now)


def test_paths_follow_the_ring_and_avoid_a_dead_neighbour() -> None:
    router, db, clock = _ring5_router()
    assert router.path(1) == (1,)
    assert router.path(3) == (1, 2, 3) and router.path(4) == (1, 5, 4)
    assert router.disjoint_paths(3, 2) == [(1, 2, 3), (1, 5, 4, 3)]
    assert router.disjoint_paths(3, 5) == [(1, 2, 3), (1, 5, 4, 3)]
    assert router.usable((1, 2, 3)) and not router.usable((2, 3)) and not router.usable((1, 3))
    assert router.stock(1, 2) == PLENTY and router.stock(1, 3) is None
    # 5 keeps talking; 2 falls silent: past the dead interval, 1 no longer uses its link to 2.
    clock.now = 2.0
    _hello(db, 5, clock, [LinkState(1, True, PLENTY, PLENTY), LinkState(4, True, PLENTY, PLENTY)], WALL0 + 1)
    clock.now = 3.5
    assert router.path(3) == (1, 5, 4, 3)
    assert not router.usable((1, 2, 3)) and router.stock(1, 2) is None
    assert router.disjoint_paths(3, 2) == [(1, 5, 4, 3)]


def test_need_blocks_skips_links_short_of_stock() -> None:
    router, db, clock = _ring5_router()
    # 2 now has only 3 blocks of its own direction towards 3 (2 < 3: 2 draws direction 0).
    links = [LinkState(1, True, PLENTY, PLENTY), LinkState(3, True, 3, PLENTY)]
    _hello(db, 2, clock, links, WALL0 + 1)
    assert router.stock(2, 3) == 3 and router.stock(3, 2) == PLENTY
    assert router.path(3) == (1, 5, 4, 3)  # 3 blocks left cost more than two more hops
    assert router.path(3, need_blocks=2 * PLENTY) is None
    assert router.disjoint_paths(3, 2, need_blocks=3) == [(1, 5, 4, 3), (1, 2, 3)]
    assert router.disjoint_paths(3, 2, need_blocks=4) == [(1, 5, 4, 3)]


def test_static_routes_are_exclusive_and_checked_against_liveness() -> None:
    routes = (StaticRoute(3, (1, 5, 4, 3)), StaticRoute(3, (1, 2, 3)))
    router, db, clock = _ring5_router(routes=routes)
    assert router.path(3) == (1, 5, 4, 3)  # the first route, though 1-2-3 is shorter
    assert router.path(4) == (1, 5, 4)  # no route for 4: computed
    assert router.disjoint_paths(3, 2) == [(1, 5, 4, 3), (1, 2, 3)]
    clock.now = 2.0
    _hello(db, 2, clock, [LinkState(1, True, PLENTY, PLENTY), LinkState(3, True, PLENTY, PLENTY)], WALL0 + 1)
    clock.now = 3.5  # 5 silent: the first route is down, the second takes over
    assert router.path(3) == (1, 2, 3)
    clock.now = 6.0  # both silent: no path, even though nothing else would be possible anyway
    assert router.path(3) is None and router.disjoint_paths(3, 2) == []


def test_kme_of_prefers_static_entries_then_reachable_claimants(caplog: pytest.LogCaptureFixture) -> None:
    router, db, clock = _ring5_router(saes={3001: 3, 7777: 4})
    assert router.kme_of(3001) == 3 and router.kme_of(5001) == 5 and router.kme_of(9) is None
    assert router.kme_of(7777) == 4  # static, not advertised by anyone
    # 2 and 5 both claim SAE 42: the lower ID wins while both are reachable.
    clock.now = 1.0
    _hello(db, 5, clock, [LinkState(1, True, PLENTY, PLENTY), LinkState(4, True, PLENTY, PLENTY)], WALL0 + 1)
    links5 = [LinkState(1, True, PLENTY, PLENTY), LinkState(4, True, PLENTY, PLENTY)]
    advert = make_advert(5, WALL0 + 2, links5, [5001, 42], path=(5,), boot=WALL0)
    db.receive(5, [advert], 1.0)
    two = make_advert(2, WALL0 + 2, [LinkState(1, True, PLENTY, PLENTY), LinkState(3, True, PLENTY, PLENTY)],
                      [2001, 42, 3001], path=(2,), boot=WALL0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="qkdtls.kme.routing"):
        db.receive(2, [two], 1.0)
        assert router.kme_of(42) == 2
        assert router.kme_of(3001) == 3  # the static entry wins over 2's claim
        assert router.kme_of(3001) == 3
        clock.now = 3.5  # 2 silent, 5 heard at 1.0 too: both dead for 1 -> 42 goes to the lowest ID
        assert router.kme_of(42) == 2
    conflicts = [r for r in caplog.records if getattr(r, "event", "") == "routing.sae_conflict"]
    assert {(r.SAE_ID, r.claimant) for r in conflicts} == {(42, 5), (3001, 2)}
    assert len(conflicts) == 2  # each conflict once


def test_snapshot_shape() -> None:
    router, _, _ = _ring5_router()
    snap = router.snapshot()
    json.dumps(snap)
    assert snap["kme_id"] == 1
    assert [n["kme_id"] for n in snap["nodes"]] == [1, 2, 3, 4, 5]
    assert all(n["up"] and n["saes"] == [1000 * n["kme_id"] + 1] for n in snap["nodes"])
    assert snap["nodes"][1]["name"] == "KME 2" and isinstance(snap["nodes"][1]["age_s"], float)
    assert [(link["a"], link["b"]) for link in snap["links"]] == [(1, 2), (1, 5), (2, 3), (3, 4), (4, 5)]
    assert snap["links"][0] == {"a": 1, "b": 2, "up": True, "stock_blocks": {"1->2": PLENTY, "2->1": PLENTY}}


def test_without_the_exchange_only_peers_and_static_routes_are_known() -> None:
    settings = NetworkSettings(
        enabled=False, routes=(StaticRoute(4, (1, 2, 3, 4)), StaticRoute(9, (1, 3, 9)))
    )
    router = Router(1, [2, 5], settings=settings, saes={1001: 1, 4001: 4})
    assert router.path(2) == (1, 2) and router.stock(1, 2) == UNKNOWN_STOCK
    assert router.path(4) == (1, 2, 3, 4)  # the operator's word beyond the first hop
    assert router.path(9) is None  # its first hop is not a peer
    assert router.path(3) is None  # no route, and nothing is known beyond the peers
    assert router.kme_of(4001) == 4 and router.kme_of(5001) is None
    assert router.usable((1, 5)) and not router.usable((1, 3))
    snap = router.snapshot()
    json.dumps(snap)
    assert [(n["kme_id"], n["up"]) for n in snap["nodes"]] == [(1, True), (2, None), (5, None)]
    assert snap["links"][0] == {"a": 1, "b": 2, "up": None, "stock_blocks": {"1->2": None, "2->1": None}}
