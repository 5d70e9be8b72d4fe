"""Cost of routing on the event loop: decoding adverts, and the paths the service asks for per request.

    python -m bench.routing [--repeat 200]

Networks: the eight KMEs of the key-spreading paper, a ring of 32, a 10 x 10 grid, and 300 KMEs with four
random links each. Rows (median of ``--repeat`` runs, one core):

* ``decode``: ``lsa.decode_batch`` of a 64-advert request of that network, against plain ``json.loads`` of
  the same bytes (the baseline: what any JSON endpoint pays);
* ``path (new graph)``: ``Router.path`` right after the database changed (graph built, path computed),
  against ``path (cached)``, the same call again (the baseline: what most requests pay);
* ``disjoint 3 (new graph)``: ``Router.disjoint_paths(dst, 3)`` after a change, against the same baseline.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

from qkdtls.kme.routing import LinkStateDb, NetworkSettings, Router, Timers
from qkdtls.kme.routing.lsa import LinkState, decode_batch, encode_batch, make_advert

WALL0 = 1_700_000_000_000


def _spread8() -> list[tuple[int, int]]:
    return [
        (1, 2),
        (1, 3),
        (1, 4),
        (2, 5),
        (2, 6),
        (3, 5),
        (3, 6),
        (3, 7),
        (4, 6),
        (4, 7),
        (5, 8),
        (6, 8),
        (7, 8),
    ]


def _ring(n: int) -> list[tuple[int, int]]:
    return [(k, k % n + 1) for k in range(1, n + 1)]


def _grid(side: int) -> list[tuple[int, int]]:
    links = []
    for r in range(side):
        for c in range(side):
            k = r * side + c + 1
            if c + 1 < side:
                links.append((k, k + 1))
            if r + 1 < side:
                links.append((k, k + side))
    return links


def _random(n: int, degree: int, seed: int = 7) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    links = set(_ring(n))  # connected
    while len(links) < n * degree // 2:
        a, b = rng.sample(range(1, n + 1), 2)
        links.add((min(a, b), max(a, b)))
    return sorted(links)


def _network(links: list[tuple[int, int]]) -> tuple[Router, LinkStateDb, int, list[bytes]]:
    """KME 1's router with every KME's advert installed (through its first neighbour), the destination
    farthest from it, and the link-state requests that carried the adverts."""
    rng = random.Random(1)
    peers: dict[int, list[int]] = {}
    for a, b in links:
        peers.setdefault(a, []).append(b)
        peers.setdefault(b, []).append(a)
    db = LinkStateDb(1, peers[1], Timers())
    db.originate(0.0, WALL0, {n: (10**6, 10**6) for n in peers[1]}, [1001])
    first = min(peers[1])
    adverts = {
        k: make_advert(
            k, WALL0, [LinkState(p, True, rng.randrange(10**6), rng.randrange(10**6)) for p in sorted(ps)],
            [1000 * k + 1], path=(k,) if k == first else (k, first),
        )
        for k, ps in peers.items() if k != 1
    }  # fmt: skip
    own = adverts.pop(first)
    bodies = []
    others = list(adverts.values())
    for i in range(0, max(len(others), 1), 63):
        batch = [own, *others[i : i + 63]]
        bodies.append(encode_batch(batch))
        db.receive(first, batch, 0.0)
    router = Router(1, peers[1], settings=NetworkSettings(max_hops=32), db=db, clock=lambda: 0.0)
    farthest = max(peers, key=lambda k: (len(router.path(k) or ()), k))
    return router, db, farthest, bodies


def _median_us(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _measure(name: str, links: list[tuple[int, int]], repeat: int) -> None:
    router, db, dst, bodies = _network(links)
    body = max(bodies, key=len)
    decode = _median_us(lambda: decode_batch(body), repeat)
    plain = _median_us(lambda: json.loads(body), repeat)
    row = f"decode {len(body)} B"
    print(f"{name:<12} {row:<24} {decode:>10.1f}us {plain:>10.1f}us {decode / plain:>7.2f}")

    def fresh(call: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            db.version += 1  # as after a new advert: the next call rebuilds the graph
            return call()

        return run

    cached = _median_us(lambda: router.path(dst), repeat)
    for row, call in (
        (f"path to {dst} (new graph)", lambda: router.path(dst)),
        ("disjoint 3 (new graph)", lambda: router.disjoint_paths(dst, 3)),
    ):
        cost = _median_us(fresh(call), repeat)
        print(f"{name:<12} {row:<24} {cost:>10.1f}us {cached:>10.1f}us {cost / cached:>7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=200, help="runs per measurement (median)")
    args = parser.parse_args()
    networks = {
        "spread-8": _spread8(),
        "ring-32": _ring(32),
        "grid-10x10": _grid(10),
        "random-300": _random(300, 4),
    }
    print(f"{'network':<12} {'row':<24} {'median':>12} {'baseline':>12} {'ratio':>7}")
    for name, links in networks.items():
        _measure(name, links, args.repeat)


if __name__ == "__main__":
    main()
