"""Path computation: properties checked against brute force on small random graphs, and worked examples."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from qkdtls.kme.routing.paths import (
    HOP,
    Graph,
    Path,
    all_simple_paths,
    disjoint_paths,
    is_simple,
    link_weight,
    path_key,
    path_weight,
    reachable,
    shortest_path,
    usable_path,
)


@st.composite
def graphs(draw: st.DrawFn, max_nodes: int = 6) -> tuple[dict[int, dict[int, int]], int, int, int]:
    """A symmetric link graph (each direction with its own stock), two distinct ends and a need."""
    count = draw(st.integers(2, max_nodes))
    # Arbitrary (also negative) KME IDs: order must not depend on them being small or positive.
    ids = draw(st.lists(st.integers(-50, 50), min_size=count, max_size=count, unique=True))
    graph: dict[int, dict[int, int]] = {k: {} for k in ids}
    # Two kinds of stock (scarce, plenty) make cheap long paths that block costly disjoint ones likely;
    # the wider palette exercises the weight function.
    palette = draw(st.sampled_from([(10, 10**6, 10**6), (0, 1, 5, 100, 1023, 1024, 5000, 10**6)]))
    stock = st.sampled_from(palette)
    for a, b in itertools.combinations(ids, 2):
        if draw(st.booleans()):
            graph[a][b] = draw(stock)
            graph[b][a] = draw(stock)
    src, dst = draw(st.sampled_from(list(itertools.permutations(ids, 2))))
    need = draw(st.sampled_from([0, 0, 1, 5, 100]))
    return graph, src, dst, need


def _brute_best(graph: Graph, src: int, dst: int, need: int, max_hops: int) -> Path | None:
    candidates = [
        p for p in all_simple_paths(graph, src, dst, max_hops) if path_weight(graph, p, need) is not None
    ]
    return min(candidates, key=lambda p: path_key(graph, p, need), default=None)


def _disjoint(paths: list[Path]) -> bool:
    inner = [set(p[1:-1]) for p in paths]
    return all(not (x & y) for x, y in itertools.combinations(inner, 2)) and len(set(paths)) == len(paths)


def _disjoint_sets(graph: Graph, src: int, dst: int, need: int) -> dict[int, int]:
    """Size -> least total weight, over every set of pairwise disjoint usable paths (backtracking)."""
    usable = [p for p in all_simple_paths(graph, src, dst, 64) if path_weight(graph, p, need) is not None]
    weights = [path_weight(graph, p, need) or 0 for p in usable]
    best: dict[int, int] = {}

    def extend(start: int, taken: set[int], size: int, weight: int, direct: bool) -> None:
        if size:
            best[size] = min(best.get(size, weight), weight)
        for i in range(start, len(usable)):
            inner = set(usable[i][1:-1])
            if inner & taken or (not inner and direct):
                continue
            extend(i + 1, taken | inner, size + 1, weight + weights[i], direct or not inner)

    extend(0, set(), 0, 0, False)
    return best


@settings(max_examples=300, deadline=None)
@given(graphs(), st.integers(1, 5))
def test_shortest_path_is_the_brute_force_optimum(case: tuple, max_hops: int) -> None:
    graph, src, dst, need = case
    found = shortest_path(graph, src, dst, need_blocks=need, max_hops=max_hops)
    expected = _brute_best(graph, src, dst, need, max_hops)
    assert found == expected  # found whenever one exists, and the same one (deterministic ties)
    if found is not None:
        assert found[0] == src and found[-1] == dst and is_simple(found)
        assert len(found) - 1 <= max_hops
        assert usable_path(graph, found, need, max_hops)


@settings(max_examples=2000, deadline=None)
@given(graphs(max_nodes=6), st.integers(1, 4))
def test_disjoint_paths_are_disjoint_maximal_and_least_weight(case: tuple, count: int) -> None:
    graph, src, dst, need = case
    found = disjoint_paths(graph, src, dst, count, need_blocks=need, max_hops=64)
    for p in found:
        assert p[0] == src and p[-1] == dst and is_simple(p)
        assert path_weight(graph, p, need) is not None
    assert _disjoint(found)
    keys = [path_key(graph, p, need) for p in found]
    assert keys == sorted(keys)  # preferred first
    sets = _disjoint_sets(graph, src, dst, need)
    assert len(found) == min(count, max(sets, default=0))
    if found:  # least total weight among all sets of that many disjoint paths
        assert sum(path_weight(graph, p, need) or 0 for p in found) == sets[len(found)]


@settings(max_examples=100, deadline=None)
@given(graphs())
def test_results_do_not_depend_on_insertion_order(case: tuple) -> None:
    graph, src, dst, need = case
    reordered = {a: dict(reversed(list(graph[a].items()))) for a in reversed(list(graph))}
    assert shortest_path(graph, src, dst, need_blocks=need) == shortest_path(
        reordered, src, dst, need_blocks=need
    )
    assert disjoint_paths(graph, src, dst, 3, need_blocks=need) == disjoint_paths(
        reordered, src, dst, 3, need_blocks=need
    )


def _ring(n: int, stock: int = 10**6) -> dict[int, dict[int, int]]:
    graph: dict[int, dict[int, int]] = {k: {} for k in range(1, n + 1)}
    for k in range(1, n + 1):
        nxt = k % n + 1
        graph[k][nxt] = graph[nxt][k] = stock
    return graph


def test_scarce_stock_is_avoided_and_exhausted_links_are_not_used() -> None:
    graph = _ring(5)
    assert shortest_path(graph, 2, 4) == (2, 3, 4)
    graph[2][3] = 10  # little left in 2's direction: the longer way round is cheaper
    assert shortest_path(graph, 2, 4) == (2, 1, 5, 4)
    assert shortest_path(graph, 3, 1) == (3, 2, 1)  # the other direction still has plenty
    graph[2][3] = 10**6
    assert shortest_path(graph, 2, 4, need_blocks=2 * 10**6) is None  # not enough anywhere
    graph[2][1] = 5
    assert shortest_path(graph, 2, 4, need_blocks=6) == (2, 3, 4)


def test_weights_grow_as_stock_falls() -> None:
    weights = [link_weight(s) for s in (10**9, 10**6, 1024, 100, 0)]
    assert weights == sorted(weights) and HOP <= weights[0] <= HOP + 2
    assert link_weight(5, 6) is None and link_weight(6, 6) is not None


def test_ties_prefer_fewer_hops_then_lower_ids() -> None:
    big = 10**9
    square = {1: {2: big, 3: big}, 2: {1: big, 4: big}, 3: {1: big, 4: big}, 4: {2: big, 3: big}}
    assert shortest_path(square, 1, 4) == (1, 2, 4)
    assert shortest_path(square, 4, 1) == (4, 2, 1)
    assert disjoint_paths(square, 1, 4, 5) == [(1, 2, 4), (1, 3, 4)]


def test_max_hops_bounds_paths() -> None:
    chain = {k: {} for k in range(1, 6)}
    for k in range(1, 5):
        chain[k][k + 1] = chain[k + 1][k] = 100
    assert shortest_path(chain, 1, 5, max_hops=4) == (1, 2, 3, 4, 5)
    assert shortest_path(chain, 1, 5, max_hops=3) is None
    assert disjoint_paths(chain, 1, 5, 2, max_hops=3) == []
    assert disjoint_paths(chain, 1, 5, 2) == [(1, 2, 3, 4, 5)]


def test_the_key_spreading_example_network_has_three_disjoint_paths() -> None:
    # KME1 -> {2,3,4}; 2 -> {5,6}; 3 -> {5,6,7}; 4 -> {6,7}; {5,6,7} -> 8
    links = [(1, 2), (1, 3), (1, 4), (2, 5), (2, 6), (3, 5), (3, 6), (3, 7), (4, 6), (4, 7)]
    links += [(5, 8), (6, 8), (7, 8)]
    graph: dict[int, dict[int, int]] = {k: {} for k in range(1, 9)}
    for a, b in links:
        graph[a][b] = graph[b][a] = 10**6
    found = disjoint_paths(graph, 1, 8, 3)
    assert len(found) == 3 and _disjoint(found)
    assert disjoint_paths(graph, 1, 8, 4) == found  # 8 has three neighbours: no fourth path
    del graph[7][8], graph[8][7]  # the cut link of the example
    assert len(disjoint_paths(graph, 1, 8, 3)) == 2


def test_trivial_cases() -> None:
    graph = {1: {2: 5}, 2: {1: 5}}
    assert shortest_path(graph, 1, 1) == (1,)
    assert disjoint_paths(graph, 1, 1, 2) == [(1,)]
    assert disjoint_paths(graph, 1, 2, 0) == []
    assert shortest_path(graph, 9, 1) is None and disjoint_paths(graph, 9, 1, 1) == []
    assert shortest_path(graph, 1, 9) is None
    assert reachable(graph, 1) == {1, 2}
    assert not usable_path(graph, (1, 2, 1)) and not usable_path(graph, ())


def test_disjoint_paths_are_not_greedy() -> None:
    # The cheapest single path 1-2-3-4 uses both middle KMEs; two disjoint paths exist only without it.
    graph: dict[int, dict[int, int]] = {k: {} for k in range(1, 5)}
    for a, b, stock in ((1, 2, 10**6), (2, 3, 10**6), (3, 4, 10**6), (1, 3, 10), (2, 4, 10)):
        graph[a][b] = graph[b][a] = stock
    assert shortest_path(graph, 1, 4) == (1, 2, 3, 4)
    assert disjoint_paths(graph, 1, 4, 2) == [(1, 2, 4), (1, 3, 4)]
