"""Path computation over the live QKD links: shortest path weighted by scarce stock, node-disjoint paths.

The graph is what the link-state database says is usable right now: ``graph[a][b]`` is the number of free
blocks KME ``a`` may draw on its link to ``b`` (a's direction). Only links both ends advertise up are in
it. A hop costs more the less stock it would have left after the relay (``link_weight``), so paths avoid
links close to exhaustion; a link with fewer blocks than needed is not used at all.

Ties are broken deterministically: lower total weight, then fewer hops, then the lexicographically smaller
sequence of KME IDs. Every KME computes the same path from the same database.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

Graph = Mapping[int, Mapping[int, int]]
Path = tuple[int, ...]

# A hop with plenty of stock costs HOP. One with ``spare`` blocks left after the relay costs
# HOP * (1 + SCARCE_BLOCKS / (spare + 1)): 1024 spare blocks (32 KiB of 32-byte blocks) double the cost
# of a hop, an empty link costs about a thousand hops. Integers, so comparisons are exact.
HOP = 1 << 20
SCARCE_BLOCKS = 1024


def link_weight(stock_blocks: int, need_blocks: int = 0) -> int | None:
    """The cost of one hop with ``stock_blocks`` free, ``need_blocks`` to be drawn; None: not enough."""
    spare = stock_blocks - need_blocks
    if spare < 0:
        return None
    return HOP + HOP * SCARCE_BLOCKS // (spare + 1)


def path_weight(graph: Graph, path: Sequence[int], need_blocks: int = 0) -> int | None:
    """The total weight of ``path``, or None when one of its links is missing or short of stock."""
    total = 0
    for a, b in itertools.pairwise(path):
        stock = graph.get(a, {}).get(b)
        weight = None if stock is None else link_weight(stock, need_blocks)
        if weight is None:
            return None
        total += weight
    return total


def is_simple(path: Sequence[int]) -> bool:
    return len(set(path)) == len(path)


def path_key(graph: Graph, path: Path, need_blocks: int = 0) -> tuple[int, int, Path]:
    """The order paths are preferred in: weight, hops, KME IDs (the path must be usable)."""
    weight = path_weight(graph, path, need_blocks)
    assert weight is not None
    return (weight, len(path) - 1, path)


def shortest_path(
    graph: Graph, src: int, dst: int, *, need_blocks: int = 0, max_hops: int = 8
) -> Path | None:
    """The preferred path from ``src`` to ``dst`` of at most ``max_hops`` links, or None.

    Dynamic programming over the hop count (a Bellman-Ford bounded by ``max_hops``): ``best[v]`` is the
    preferred walk of exactly ``h`` hops to ``v``. Weights are positive, so the preferred walk over all
    ``h`` never repeats a KME (cutting the repeat would make it lighter): the result is a simple path.
    Walks of equal hop count keep their order when extended by the same hop, so keeping one per KME and
    hop count loses nothing, ties included."""
    if src == dst:
        return (src,)
    if src not in graph:
        return None
    frontier: dict[int, tuple[int, Path]] = {src: (0, (src,))}
    found: tuple[int, int, Path] | None = None
    for hops in range(1, max_hops + 1):
        following: dict[int, tuple[int, Path]] = {}
        for u, (weight_u, path_u) in frontier.items():
            for v, stock in graph.get(u, {}).items():
                weight = link_weight(stock, need_blocks)
                if weight is None:
                    continue
                candidate = (weight_u + weight, (*path_u, v))
                known = following.get(v)
                if known is None or candidate < known:
                    following[v] = candidate
        if dst in following:
            weight, path = following[dst]
            if found is None or (weight, hops, path) < found:
                found = (weight, hops, path)
        if not following:
            break
        # A walk already heavier than the best path found cannot lead to a better one.
        frontier = {
            v: entry for v, entry in following.items() if v != dst and (found is None or entry[0] < found[0])
        }
        if not frontier:
            break
    return found[2] if found is not None else None


# --- node-disjoint paths: minimum-cost flow on the node-split graph -----------------------------------------


class _FlowNetwork:
    """Residual network with unit capacities (successive shortest paths, Bellman-Ford: small graphs).

    Nodes are numbered in the order they are first added, so every run visits arcs in the same order."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, int], int] = {}
        self.out: list[list[int]] = []  # node -> arcs leaving it
        self.arcs: list[list[int]] = []  # [tail, head, capacity, cost]; arc i ^ 1 is its reverse

    def node(self, name: tuple[int, int]) -> int:
        known = self.index.get(name)
        if known is None:
            known = self.index[name] = len(self.out)
            self.out.append([])
        return known

    def add(self, tail: tuple[int, int], head: tuple[int, int], capacity: int, cost: int) -> None:
        t, h = self.node(tail), self.node(head)
        self.out[t].append(len(self.arcs))
        self.arcs.append([t, h, capacity, cost])
        self.out[h].append(len(self.arcs))
        self.arcs.append([h, t, 0, -cost])

    def augment(self, source: int, sink: int) -> bool:
        """Push one unit along a cheapest residual path; False when none is left."""
        size = len(self.out)
        dist: list[int | None] = [None] * size
        via = [-1] * size
        dist[source] = 0
        for _ in range(size):
            changed = False
            for node in range(size):
                d = dist[node]
                if d is None:
                    continue
                for arc in self.out[node]:
                    _, head, capacity, cost = self.arcs[arc]
                    known = dist[head]
                    if capacity > 0 and (known is None or d + cost < known):
                        dist[head] = d + cost
                        via[head] = arc
                        changed = True
            if not changed:
                break
        if dist[sink] is None:
            return False
        node = sink
        while node != source:
            arc = via[node]
            self.arcs[arc][2] -= 1
            self.arcs[arc ^ 1][2] += 1
            node = self.arcs[arc][0]
        return True


def disjoint_paths(
    graph: Graph, src: int, dst: int, count: int, *, need_blocks: int = 0, max_hops: int = 8
) -> list[Path]:
    """Up to ``count`` paths from ``src`` to ``dst`` that share no KME but the two ends, preferred first.

    Each KME but the ends is split into an inner and an outer node joined by one unit of capacity, each
    usable link is an arc of capacity one weighted like a hop; a minimum-cost flow of ``count`` units
    (successive shortest paths) gives as many disjoint paths as exist, up to ``count``, of least total
    weight. Paths longer than ``max_hops`` are then left out (a relay would refuse them)."""
    if count <= 0:
        return []
    if src == dst:
        return [(src,)]
    if src not in graph:
        return []
    net = _FlowNetwork()
    nodes = sorted(set(graph) | {v for heads in graph.values() for v in heads})
    for v in nodes:
        net.add((v, 0), (v, 1), count if v in (src, dst) else 1, 0)
    for u in nodes:
        for v, stock in sorted(graph.get(u, {}).items()):
            weight = link_weight(stock, need_blocks)
            if weight is not None and v != src and u != dst:
                net.add((u, 1), (v, 0), 1, weight)
    source, sink = net.index[(src, 1)], net.index[(dst, 0)]
    flows = 0
    while flows < count and net.augment(source, sink):
        flows += 1
    # Read the paths back: follow the saturated link arcs from the source (one per KME on a path).
    names = {i: name for name, i in net.index.items()}
    used: dict[int, list[int]] = {}
    for i in range(0, len(net.arcs), 2):
        tail, head, capacity, _ = net.arcs[i]
        t, h = names[tail], names[head]
        if t[1] == 1 and h[1] == 0 and capacity == 0:
            used.setdefault(t[0], []).append(h[0])
    paths: list[Path] = []
    for first in sorted(used.get(src, [])):
        path = [src, first]
        # A minimum-cost flow of positive-cost arcs holds no cycle; the bound only guards the loop.
        while path[-1] != dst and len(path) <= len(nodes):
            path.append(used[path[-1]][0])
        if path[-1] == dst:
            paths.append(tuple(path))
    paths = [p for p in paths if len(p) - 1 <= max_hops]
    paths.sort(key=lambda p: path_key(graph, p, need_blocks))
    return paths


def usable_path(graph: Graph, path: Sequence[int], need_blocks: int = 0, max_hops: int = 8) -> bool:
    """Whether every link of ``path`` is live with ``need_blocks`` to spare, the path is simple and short."""
    if not path or not is_simple(path) or len(path) - 1 > max_hops:
        return False
    return path_weight(graph, path, need_blocks) is not None


def reachable(graph: Graph, src: int) -> set[int]:
    """KMEs joined to ``src`` by live links (whatever their stock)."""
    seen = {src}
    todo = [src]
    while todo:
        u = todo.pop()
        for v in graph.get(u, {}):
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen


def all_simple_paths(graph: Graph, src: int, dst: int, max_hops: int) -> Iterable[Path]:
    """Every simple path of at most ``max_hops`` links (for checks on small graphs)."""
    stack: list[tuple[int, Path]] = [(src, (src,))]
    while stack:
        u, path = stack.pop()
        if u == dst:
            yield path
            continue
        if len(path) - 1 >= max_hops:
            continue
        for v in graph.get(u, {}):
            if v not in path:
                stack.append((v, (*path, v)))


__all__ = [
    "HOP",
    "SCARCE_BLOCKS",
    "Graph",
    "Path",
    "all_simple_paths",
    "disjoint_paths",
    "is_simple",
    "link_weight",
    "path_key",
    "path_weight",
    "reachable",
    "shortest_path",
    "usable_path",
]
