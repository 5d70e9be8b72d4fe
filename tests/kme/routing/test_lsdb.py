"""The link-state database as a state machine: a network of databases exchanging batches in memory (the
adapter's rules: every batch starts with the sender's own advert, floods and syncs follow), driven by a
simulated clock."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdtls.kme.routing.lsa import (
    Advert,
    LinkState,
    LoopingAdvert,
    MalformedAdvert,
    OversizedAdvert,
    StaleAdvert,
    make_advert,
)
from qkdtls.kme.routing.lsdb import LinkStateDb, NotANeighbour, Timers

TIMERS = Timers(hello_interval=1.0, dead_interval=3.0, max_age=60.0)
WALL0 = 1_700_000_000_000


@dataclass
class Net:
    """KMEs joined by links; ``down`` KMEs neither send nor receive, ``cut`` links carry nothing."""

    links: list[tuple[int, int]]
    now: float = 0.0
    dbs: dict[int, LinkStateDb] = field(default_factory=dict)
    down: set[int] = field(default_factory=set)
    cut: set[frozenset[int]] = field(default_factory=set)
    outbox: dict[tuple[int, int], dict[int, Advert]] = field(default_factory=dict)
    delivered: int = 0

    def __post_init__(self) -> None:
        for k in self.kmes:
            self.restart(k)

    @property
    def kmes(self) -> list[int]:
        return sorted({k for link in self.links for k in link})

    def neighbours(self, k: int) -> list[int]:
        return sorted({b if a == k else a for a, b in self.links if k in (a, b)})

    def restart(self, k: int) -> None:
        """A fresh database, as after a crash: nothing remembered."""
        self.dbs[k] = LinkStateDb(k, self.neighbours(k), TIMERS)
        self.down.discard(k)
        for key in [key for key in self.outbox if k in key]:
            del self.outbox[key]
        self.originate(k)

    def originate(self, k: int) -> None:
        stocks = {n: (1000 + k, 1000 + n) for n in self.neighbours(k)}
        self.dbs[k].originate(self.now, WALL0 + int(self.now * 1000), stocks, [1000 * k + 1], f"KME {k}")

    def queue(self, src: int, dst: int, adverts: tuple[Advert, ...] = ()) -> None:
        box = self.outbox.setdefault((src, dst), {})
        for a in adverts:
            if a.origin not in box or box[a.origin].seq < a.seq:
                box[a.origin] = a

    def deliver(self) -> None:
        """Send every queued batch (each with its sender's own advert) until nothing is left."""
        for _ in range(10_000):
            if not self.outbox:
                return
            (src, dst), box = sorted(self.outbox.items())[0]
            del self.outbox[(src, dst)]
            own = self.dbs[src].own
            assert own is not None
            batch = [own.sent_by(src), *(a for o, a in sorted(box.items()) if o != src)]
            if src in self.down or dst in self.down or frozenset((src, dst)) in self.cut:
                continue
            accepted = self.dbs[dst].receive(src, batch, self.now)
            self.delivered += 1
            for n, adverts in accepted.flood.items():
                self.queue(dst, n, adverts)
            if accepted.came_up:
                before = self.dbs[dst].own
                self.originate(dst)
                if self.dbs[dst].own is not before:
                    for n in self.neighbours(dst):
                        self.queue(dst, n)
                self.queue(dst, src, self.dbs[dst].sync(src))
        raise AssertionError("flooding did not stop")

    def tick(self, seconds: float = 1.0) -> None:
        """Time passes; every running KME expires, originates and says hello to each neighbour."""
        self.now += seconds
        for k in self.kmes:
            if k in self.down:
                continue
            self.dbs[k].expire(self.now)
            self.originate(k)
            for n in self.neighbours(k):
                self.queue(k, n)
        self.deliver()

    def graph(self, k: int) -> dict[int, dict[int, int]]:
        return self.dbs[k].graph(self.now)

    def links_up(self, k: int) -> set[tuple[int, int]]:
        return {(a, b) for a, heads in self.graph(k).items() for b in heads if a < b}


def chain(n: int) -> list[tuple[int, int]]:
    return [(k, k + 1) for k in range(1, n)]


def ring(n: int) -> list[tuple[int, int]]:
    return [*chain(n), (1, n)]


def test_a_chain_converges_in_two_hellos() -> None:
    net = Net(chain(4))
    net.tick()  # first hellos: every KME hears its neighbours, answers with its database
    net.tick()
    for k in net.kmes:
        assert net.links_up(k) == {(1, 2), (2, 3), (3, 4)}
        assert net.dbs[k].origins(net.now) == [1, 2, 3, 4]
        assert [net.dbs[k].sae_owners(1000 * o + 1) for o in (1, 2, 3, 4)] == [(1,), (2,), (3,), (4,)]
    # KME k advertises (1000 + k) blocks of its own direction and (1000 + peer) of the peer's.
    assert net.graph(4)[1][2] == 1001 and net.graph(4)[2][1] == 1002
    assert net.dbs[3].advert(1, net.now).name == "KME 1"  # type: ignore[union-attr]


def test_steady_state_sends_no_new_adverts() -> None:
    net = Net(ring(5))
    for _ in range(3):
        net.tick()
    versions = {k: db.version for k, db in net.dbs.items()}
    net.tick()
    net.tick()
    assert {k: db.version for k, db in net.dbs.items()} == versions  # hellos are copies of known adverts


def test_a_dead_kme_is_routed_around_after_the_dead_interval() -> None:
    net = Net(ring(5))
    net.tick()
    net.tick()
    assert net.links_up(1) == {(1, 2), (2, 3), (3, 4), (4, 5), (1, 5)}
    net.down.add(3)
    net.tick()
    net.tick()
    assert (2, 3) in net.links_up(1)  # within the dead interval: still up
    net.tick()
    net.tick()  # 2 and 4 have not heard 3 for more than 3 s: they advertise the links down
    assert net.links_up(1) == {(1, 2), (4, 5), (1, 5)}
    assert net.links_up(2) == {(1, 2), (4, 5), (1, 5)}


def test_a_cut_link_fails_the_two_way_check_on_both_sides() -> None:
    net = Net(ring(5))
    net.tick()
    net.tick()
    net.cut.add(frozenset((2, 3)))
    for _ in range(5):
        net.tick()
    for k in net.kmes:
        assert net.links_up(k) == {(1, 2), (3, 4), (4, 5), (1, 5)}
    net.cut.clear()
    net.tick()
    net.tick()
    assert all((2, 3) in net.links_up(k) for k in net.kmes)


def test_one_way_loss_is_a_dead_link() -> None:
    """3 still hears 2, but 2 does not hear 3: 2 says the link is down, so nobody uses it."""
    net = Net(chain(3))
    net.tick()
    net.tick()
    real = net.deliver

    def lossy() -> None:
        net.outbox.pop((3, 2), None)
        real()

    net.deliver = lossy  # type: ignore[method-assign]
    for _ in range(5):
        net.tick()
    assert net.dbs[3].neighbour_up(2, net.now) and not net.dbs[2].neighbour_up(3, net.now)
    for k in (1, 3):
        graph = net.graph(k)
        assert 3 not in graph.get(2, {}) and 2 not in graph.get(3, {})  # neither direction


def test_a_restarted_kme_rejoins_and_learns_everything_at_once() -> None:
    net = Net(ring(5))
    net.tick()
    net.tick()
    old = net.dbs[3].own
    assert old is not None
    net.now += 0.5
    net.restart(3)  # within the dead interval: its neighbours never saw it down, only its new boot
    new = net.dbs[3].own
    assert new is not None and new.seq > old.seq and new.boot != old.boot
    net.tick()  # one hello each way: 2 and 4 send it their whole database
    assert net.dbs[3].origins(net.now) == [1, 2, 3, 4, 5]
    net.tick()
    assert all(len(net.links_up(k)) == 5 for k in net.kmes)


def test_a_restart_with_a_clock_gone_back_recovers_through_known_seq() -> None:
    net = Net(chain(2))
    net.tick()
    installed = net.dbs[1].advert(2, net.now)
    assert installed is not None
    fresh = LinkStateDb(2, [1], TIMERS)
    fresh.originate(net.now, WALL0 - 10_000, {1: (0, 0)}, [2001])  # the clock went back 10 s
    own = fresh.own
    assert own is not None and own.seq < installed.seq
    with pytest.raises(StaleAdvert) as info:
        net.dbs[1].receive(2, [own.sent_by(2)], net.now)
    assert info.value.known_seq == installed.seq
    fresh.raise_seq(info.value.known_seq)
    again = fresh.originate(net.now, WALL0 - 10_000, {1: (0, 0)}, [2001])
    assert again is not None and again.seq == installed.seq + 1
    assert net.dbs[1].receive(2, [again.sent_by(2)], net.now).installed == (2,)


def _two() -> tuple[LinkStateDb, Advert]:
    db = LinkStateDb(1, [2, 3], TIMERS)
    db.originate(0.0, WALL0, {2: (10, 10), 3: (10, 10)}, [1001])
    hello = make_advert(2, WALL0 + 5, [LinkState(1, True, 10, 10)], [2001], path=(2,))
    db.receive(2, [hello], 0.0)
    return db, hello


def test_refused_batches_change_nothing() -> None:
    db, hello = _two()
    version, heard = db.version, db.heard(2)
    fake = make_advert(9, WALL0, [LinkState(1, True, 5, 5)], [9001], path=(9, 2))
    older = make_advert(2, hello.seq - 1, [], [2666], path=(2,))
    conflicting = make_advert(2, hello.seq, [], [2666], path=(2,))
    cases: list[tuple[int, list[Advert], type[Exception]]] = [
        (2, [older, fake], StaleAdvert),  # a replayed old advert of the sender
        (2, [conflicting, fake], StaleAdvert),  # same seq, other content
        (2, [fake], MalformedAdvert),  # no own advert of the sender
        (2, [hello, make_advert(9, 1, [], [], path=(9, 3))], MalformedAdvert),  # path does not end with 2
        (2, [hello, make_advert(9, 1, [], [], path=(9, 1, 2))], LoopingAdvert),  # passed through us
        (2, [hello, make_advert(1, 1, [], [], path=(1, 2))], LoopingAdvert),  # our own, back again
        (4, [make_advert(4, 1, [], [], path=(4,))], NotANeighbour),
    ]
    for caller, batch, error in cases:
        with pytest.raises(error):
            db.receive(caller, batch, 1.0)
        assert db.version == version and db.heard(2) == heard and db.sae_owners(9001) == ()
    small = LinkStateDb(1, [2], TIMERS, max_nodes=2)
    small.originate(0.0, WALL0, {}, [])
    with pytest.raises(OversizedAdvert):
        small.receive(2, [hello, fake], 0.0)
    assert small.origins(0.0) == [1]


def test_link_stock_is_the_lower_of_both_ends_views() -> None:
    db, hello = _two()
    db.originate(0.5, WALL0 + 1, {2: (50, 7), 3: (0, 0)}, [1001])  # 1 says: 1 draws 50, 2 draws 7
    peer = make_advert(2, hello.seq + 1, [LinkState(1, True, 9, 40)], [2001], path=(2,))  # 2: 9 and 40
    db.receive(2, [peer], 0.5)
    assert db.graph(0.5)[1][2] == 40 and db.graph(0.5)[2][1] == 7
    (view,) = [v for v in db.links(0.5) if (v.a, v.b) == (1, 2)]
    assert (view.up, view.stock_ab, view.stock_ba) == (True, 40, 7)


def test_older_and_copied_adverts_of_others_are_ignored() -> None:
    db, hello = _two()
    third = make_advert(3, WALL0 + 7, [LinkState(1, True, 1, 1)], [3001], path=(3, 2))
    assert db.receive(2, [hello, third], 1.0).installed == (3,)
    older = make_advert(3, WALL0 + 6, [], [3666], path=(3, 2))
    accepted = db.receive(2, [hello, older, third], 1.5)
    assert (accepted.installed, accepted.known, accepted.ignored) == ((), 2, 1)
    assert db.sae_owners(3001) == (3,) and db.sae_owners(3666) == ()


def test_floods_skip_every_kme_on_the_path() -> None:
    db = LinkStateDb(5, [1, 2, 3, 4], TIMERS)
    db.originate(0.0, WALL0, {}, [])
    hello = make_advert(2, WALL0, [], [], path=(2,))
    remote = make_advert(9, WALL0, [], [], path=(9, 3, 2))
    accepted = db.receive(2, [hello, remote], 0.0)
    assert accepted.came_up
    assert {n: [(a.origin, a.path) for a in adverts] for n, adverts in accepted.flood.items()} == {
        1: [(2, (2, 5)), (9, (9, 3, 2, 5))],
        3: [(2, (2, 5))],
        4: [(2, (2, 5)), (9, (9, 3, 2, 5))],
    }
    assert [(a.origin, a.path) for a in db.sync(3)] == [(2, (2, 5)), (5, (5,))]


def test_adverts_expire_after_max_age_unless_refreshed() -> None:
    net = Net(chain(3))
    net.tick()
    net.tick()
    net.down.add(3)
    for _ in range(int(TIMERS.max_age) + 1):
        net.tick()
    assert net.dbs[1].origins(net.now) == [1, 2]  # 3's advert expired; 2's was refreshed
    assert net.dbs[1].sae_owners(3001) == ()


def test_sae_claimed_by_two_kmes_lists_both() -> None:
    db, hello = _two()
    other = make_advert(3, WALL0, [], [2001], path=(3, 2))
    db.receive(2, [hello, other], 1.0)
    assert db.sae_owners(2001) == (2, 3)


def test_timers_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        Timers(hello_interval=3.0, dead_interval=3.0)


@st.composite
def topologies(draw: st.DrawFn) -> list[tuple[int, int]]:
    n = draw(st.integers(2, 7))
    spanning = [(draw(st.integers(1, k - 1)), k) for k in range(2, n + 1)]  # connected
    extra = draw(st.lists(st.sampled_from(list(itertools.combinations(range(1, n + 1), 2))), max_size=8))
    return sorted({tuple(sorted(link)) for link in spanning + extra})  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(topologies(), st.data())
def test_flooding_terminates_and_every_database_agrees(
    links: list[tuple[int, int]], data: st.DataObject
) -> None:
    net = Net(links)
    net.tick()
    net.tick()
    graphs = [net.graph(k) for k in net.kmes]
    assert all(g == graphs[0] for g in graphs)
    assert net.links_up(1) == set(links)
    # A KME restarts; once it is heard again every database agrees again.
    victim = data.draw(st.sampled_from(net.kmes))
    net.restart(victim)
    net.tick()
    net.tick()
    assert all(net.graph(k) == net.graph(1) for k in net.kmes) and net.links_up(1) == set(links)
    delivered = net.delivered
    net.tick()
    # Steady state: one batch per link direction per hello, nothing flooded.
    assert net.delivered - delivered == 2 * len(links)


def test_small_stock_moves_wait_for_the_refresh() -> None:
    db = LinkStateDb(1, [2], TIMERS)
    first = db.originate(0.0, WALL0, {2: (800, 800)}, [])
    assert first is not None
    assert db.originate(1.0, WALL0 + 1000, {2: (800, 800)}, []) is None  # nothing new
    assert db.originate(2.0, WALL0 + 2000, {2: (701, 800)}, []) is None  # less than an eighth
    moved = db.originate(3.0, WALL0 + 3000, {2: (700, 800)}, [])  # an eighth
    assert moved is not None and moved.links[0].stock_out_blocks == 700
    assert db.originate(4.0, WALL0 + 4000, {2: (700, 799)}, []) is None
    refreshed = db.originate(3.0 + TIMERS.refresh_interval, WALL0 + 20_000, {2: (700, 799)}, [])
    assert refreshed is not None and refreshed.links[0].stock_in_blocks == 799
    assert db.originate(20.0, WALL0 + 21_000, {2: (0, 799)}, []) is not None  # empty: at once
    assert db.originate(21.0, WALL0 + 22_000, {2: (1, 799)}, []) is not None  # no longer empty
    assert db.originate(22.0, WALL0 + 23_000, {2: (1, 799)}, [1001]) is not None  # an SAE more
