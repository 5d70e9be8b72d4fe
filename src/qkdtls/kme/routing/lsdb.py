"""The link-state database of one KME, as a pure state machine.

It holds the newest advert of every origin (this KME's own included), decides what to send to which
neighbour, tracks neighbour liveness from the times passed in, expires adverts, and derives the graph of
usable links and where SAEs are attached. The asyncio adapter (``exchange.py``) feeds it requests and the
clock and sends what it says; nothing here does I/O or reads a clock.

Rules (docs/design.md, "Network: topology and routing"):

- A neighbour (a ``[[peers]]`` KME) is *up* while a batch from it was accepted within ``dead_interval``.
- Every batch carries its sender's own advert (the hello); a batch whose own advert is older than the one
  installed, or has the same ``seq`` and other content, is refused whole (:class:`StaleAdvert`: a replay).
- Adverts of other origins replace the installed one when their ``seq`` is higher; lower or equal ones are
  ignored (flooding delivers copies along several paths, some late).
- A new advert is sent on to every neighbour not on its path; a neighbour that comes up, or whose own
  advert shows a new ``boot`` (it restarted, maybe within the dead interval), gets the whole database (so
  a KME that restarts, or a healed partition, learns everything at once).
- An origin sends a new advert when a link goes up or down, its SAEs change, or a stock moves by an eighth
  or more, and at least every ``max_age / 4``; adverts not replaced for ``max_age`` expire.
- A link is usable when both ends advertise it up (two-way check); this KME's own links use its current
  liveness view rather than its last advert.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from qkdtls.kme.routing.lsa import (
    Advert,
    AdvertError,
    LinkState,
    LoopingAdvert,
    MalformedAdvert,
    OversizedAdvert,
    StaleAdvert,
    make_advert,
)

MAX_NODES = 1024  # origins one database holds


class NotANeighbour(AdvertError):
    """The caller is not a peer KME of this one (the endpoint answers 401)."""


@dataclass(frozen=True, slots=True)
class Timers:
    hello_interval: float = 1.0
    dead_interval: float = 3.0
    max_age: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.hello_interval < self.dead_interval < self.max_age:
            raise ValueError("need 0 < hello_interval < dead_interval < max_age")

    @property
    def refresh_interval(self) -> float:
        """An unchanged advert is sent again with a new ``seq`` this often, well before it expires."""
        return self.max_age / 4


@dataclass(slots=True)
class _Entry:
    advert: Advert
    installed_at: float


@dataclass(frozen=True, slots=True)
class Accepted:
    """What one accepted batch did."""

    installed: tuple[int, ...]  # origins whose advert was new
    known: int  # copies of installed adverts
    ignored: int  # older (or conflicting) adverts of other origins
    came_up: bool  # the caller was not up before this batch, or restarted: send it the whole database
    flood: Mapping[int, tuple[Advert, ...]] = field(default_factory=dict)  # neighbour -> adverts to send


@dataclass(frozen=True, slots=True)
class NodeView:
    kme_id: int
    up: bool  # reachable from this KME over usable links
    saes: tuple[int, ...]
    age_s: float
    seq: int


@dataclass(frozen=True, slots=True)
class LinkView:
    a: int  # a < b
    b: int
    up: bool
    stock_ab: int | None  # free blocks a draws towards b (the lower of both ends' views), None: unknown
    stock_ba: int | None


class LinkStateDb:
    def __init__(
        self,
        me: int,
        neighbours: Collection[int],
        timers: Timers | None = None,
        *,
        max_nodes: int = MAX_NODES,
    ) -> None:
        self.me = me
        self.neighbours = frozenset(neighbours) - {me}
        self.timers = timers or Timers()
        self.max_nodes = max_nodes
        self._entries: dict[int, _Entry] = {}
        self._heard: dict[int, float] = {}
        self._seq_floor = 0
        self._boot: int | None = None  # the first seq of this process
        # Bumped on every change of the adverts held (not on liveness, which moves with the clock).
        self.version = 0
        self._sae_index: dict[int, tuple[int, ...]] | None = None

    # -- liveness --------------------------------------------------------------------------------------------

    def neighbour_up(self, neighbour: int, now: float) -> bool:
        heard = self._heard.get(neighbour)
        return heard is not None and now - heard <= self.timers.dead_interval

    def heard(self, neighbour: int) -> float | None:
        return self._heard.get(neighbour)

    # -- this KME's own advert -------------------------------------------------------------------------------

    @property
    def own(self) -> Advert | None:
        entry = self._entries.get(self.me)
        return entry.advert if entry is not None else None

    def raise_seq(self, known_seq: int) -> None:
        """A neighbour holds an advert of ours with ``known_seq`` (we restarted with a clock that went back):
        the next one must be above it."""
        self._seq_floor = max(self._seq_floor, known_seq + 1)

    def originate(
        self,
        now: float,
        wall_ms: int,
        stocks: Mapping[int, tuple[int, int]],
        saes: Iterable[int],
        name: str = "",
    ) -> Advert | None:
        """This KME's advert with a new ``seq`` when it says something new or a refresh is due, else None.

        New: a link up or down, other SAEs or name, or a stock that moved by an eighth or more (or to or
        from zero). Smaller moves wait for the refresh: keys drawn every second would otherwise flood the
        network every second, and the relay checks the stock itself anyway.

        ``stocks``: neighbour -> (free blocks this KME draws, free blocks the neighbour draws);
        ``wall_ms``: the wall clock in milliseconds, so ``seq`` grows across restarts."""
        links = [
            LinkState(n, self.neighbour_up(n, now), *_clamp(stocks.get(n, (0, 0))))
            for n in sorted(self.neighbours)
        ]
        entry = self._entries.get(self.me)
        previous = entry.advert if entry is not None else None
        seq = max(wall_ms, self._seq_floor, previous.seq + 1 if previous is not None else 0)
        if self._boot is None:
            self._boot = seq
        advert = make_advert(self.me, seq, links, saes, name=name, boot=self._boot)
        if (
            previous is not None
            and entry is not None
            and not _news(previous, advert)
            and now - entry.installed_at < self.timers.refresh_interval
            and previous.seq >= self._seq_floor
        ):
            return None
        self._entries[self.me] = _Entry(advert, now)
        self._changed()
        return advert

    # -- receipt ---------------------------------------------------------------------------------------------

    def receive(self, caller: int, adverts: list[Advert], now: float) -> Accepted:
        """Install a decoded batch from neighbour ``caller``; :class:`AdvertError` and no change at all if
        the batch is refused."""
        if caller not in self.neighbours:
            raise NotANeighbour(f"KME {caller} is not a peer of KME {self.me}")
        own: Advert | None = None
        new_origins = 0
        for i, advert in enumerate(adverts):
            if advert.path[-1] != caller:
                raise MalformedAdvert(f"adverts[{i}].path must end with the sender, KME {caller}")
            if self.me in advert.path:
                raise LoopingAdvert(f"adverts[{i}] has passed through KME {self.me} already")
            if advert.origin == caller:
                own = advert
            if advert.origin not in self._entries:
                new_origins += 1
        if own is None:
            raise MalformedAdvert(f"a link-state request must carry the sender's own advert (KME {caller})")
        installed = self._entries.get(caller)
        if installed is not None and (
            own.seq < installed.advert.seq
            or (own.seq == installed.advert.seq and not own.same_content(installed.advert))
        ):
            raise StaleAdvert(
                f"the advert of KME {caller} with seq {own.seq} is older than the one installed",
                caller,
                installed.advert.seq,
            )
        if len(self._entries) + new_origins > self.max_nodes:
            raise OversizedAdvert(f"the link-state database holds at most {self.max_nodes} KMEs")

        # A new boot: the caller restarted and holds nothing, even if it never looked down to us.
        came_up = not self.neighbour_up(caller, now) or installed is None or installed.advert.boot != own.boot
        self._heard[caller] = now
        fresh: list[Advert] = []
        known = ignored = 0
        for advert in adverts:
            entry = self._entries.get(advert.origin)
            if entry is None or advert.seq > entry.advert.seq:
                self._entries[advert.origin] = _Entry(advert, now)
                fresh.append(advert)
            elif advert.seq == entry.advert.seq and advert.same_content(entry.advert):
                known += 1
            else:
                ignored += 1
        if fresh:
            self._changed()
        flood: dict[int, list[Advert]] = {}
        for advert in fresh:
            onward = advert.sent_by(self.me)
            for n in sorted(self.neighbours - set(advert.path)):
                flood.setdefault(n, []).append(onward)
        return Accepted(
            installed=tuple(a.origin for a in fresh),
            known=known,
            ignored=ignored,
            came_up=came_up,
            flood={n: tuple(a) for n, a in flood.items()},
        )

    def sync(self, neighbour: int) -> tuple[Advert, ...]:
        """Every advert held that ``neighbour`` has not seen on its way, as this KME sends it."""
        return tuple(
            entry.advert.sent_by(self.me)
            for origin, entry in sorted(self._entries.items())
            if neighbour not in entry.advert.path and origin != neighbour
        )

    def expire(self, now: float) -> tuple[int, ...]:
        """Drop adverts of other origins not replaced for ``max_age``; returns their origins."""
        limit = now - self.timers.max_age
        gone = tuple(
            origin
            for origin, entry in self._entries.items()
            if origin != self.me and entry.installed_at < limit
        )
        for origin in gone:
            del self._entries[origin]
        if gone:
            self._changed()
        return gone

    def _changed(self) -> None:
        self.version += 1
        self._sae_index = None

    # -- views -----------------------------------------------------------------------------------------------

    def advert(self, origin: int, now: float) -> Advert | None:
        entry = self._entries.get(origin)
        if entry is None:
            return None
        if origin != self.me and now - entry.installed_at > self.timers.max_age:
            return None
        return entry.advert

    def _says_up(self, a: int, b: int, now: float) -> LinkState | None:
        """A's view of its link to B, when A says the link is up (this KME: its current liveness)."""
        advert = self.advert(a, now)
        link = advert.link(b) if advert is not None else None
        if link is None:
            return None
        up = self.neighbour_up(b, now) if a == self.me else link.up
        return link if up else None

    def graph(self, now: float) -> dict[int, dict[int, int]]:
        """Usable links: ``graph[a][b]`` = free blocks ``a`` draws towards ``b`` (both ends' views' lower)."""
        out: dict[int, dict[int, int]] = {self.me: {}}
        for origin in self._entries:
            advert = self.advert(origin, now)
            if advert is None:
                continue
            for link in advert.links:
                ab = self._says_up(origin, link.peer, now)
                ba = self._says_up(link.peer, origin, now)
                if ab is None or ba is None:
                    continue
                out.setdefault(origin, {})[link.peer] = min(ab.stock_out_blocks, ba.stock_in_blocks)
        return out

    def origins(self, now: float) -> list[int]:
        return sorted(o for o in self._entries if self.advert(o, now) is not None)

    def age(self, origin: int, now: float) -> float | None:
        entry = self._entries.get(origin)
        return None if entry is None else max(0.0, now - entry.installed_at)

    def sae_owners(self, sae_id: int) -> tuple[int, ...]:
        """The origins whose adverts list ``sae_id`` (normally one), in KME ID order."""
        if self._sae_index is None:
            index: dict[int, list[int]] = {}
            for origin in sorted(self._entries):
                for sae in self._entries[origin].advert.saes:
                    index.setdefault(sae, []).append(origin)
            self._sae_index = {sae: tuple(origins) for sae, origins in index.items()}
        return self._sae_index.get(sae_id, ())

    def links(self, now: float) -> list[LinkView]:
        """Every link some advert mentions, with both directions' stock where known."""
        views: dict[tuple[int, int], dict[str, int | None]] = {}
        graph = self.graph(now)
        for origin in self.origins(now):
            advert = self.advert(origin, now)
            assert advert is not None
            for link in advert.links:
                a, b = min(origin, link.peer), max(origin, link.peer)
                stock = views.setdefault((a, b), {"ab": None, "ba": None})
                # The origin's out-stock is its direction, its in-stock the peer's: keep each side's lower.
                out_key, in_key = ("ab", "ba") if origin == a else ("ba", "ab")
                stock[out_key] = _lower(stock[out_key], link.stock_out_blocks)
                stock[in_key] = _lower(stock[in_key], link.stock_in_blocks)
        return [
            LinkView(a, b, b in graph.get(a, {}), stock["ab"], stock["ba"])
            for (a, b), stock in sorted(views.items())
        ]


def _news(old: Advert, new: Advert) -> bool:
    if (old.saes, old.name) != (new.saes, new.name):
        return True
    if [(link.peer, link.up) for link in old.links] != [(link.peer, link.up) for link in new.links]:
        return True
    for was, now in zip(old.links, new.links, strict=True):
        for before, after in (
            (was.stock_out_blocks, now.stock_out_blocks),
            (was.stock_in_blocks, now.stock_in_blocks),
        ):
            if after != before and (before == 0 or after == 0 or abs(after - before) * 8 >= before):
                return True
    return False


def _lower(known: int | None, value: int) -> int:
    return value if known is None else min(known, value)


def _clamp(stock: tuple[int, int]) -> tuple[int, int]:
    return max(0, int(stock[0])), max(0, int(stock[1]))
