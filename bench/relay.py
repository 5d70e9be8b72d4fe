"""Relayed key cycles per second and latency over 1-4 hops, trusted and spread, against a direct link.

A cycle is ``enc_keys`` (one 256-bit key) at the master's KME plus ``dec_keys`` at the slave's KME, the bytes
compared. The network (real KME processes, SQLite ``synchronous=FULL``, link-state routing) is a ladder:

    1 ─ 11 ─ 12 ─ 13            KME 1: the master SAE 1001
    │    │    │    │            KME 11: a direct neighbour (the baseline: today's direct reservation)
    │   32   33   34            KME 32, 33, 34: slaves 2, 3 and 4 hops away over either side
    │    │    │    │            spread: the two sides are the two node-disjoint paths (XOR 2-of-2)
    1 ─ 21 ─ 22 ─ 23

so KME 32/33/34 are reached in 2/3/4 hops by one side (trusted) or both (spread). Trusted over one hop is the
direct link itself; spread to KME 11 takes the direct link plus the 3-hop way round (1-21-22-... is longer:
shown for completeness). Every row is measured ``--repeat`` times (medians, min-max) in the same run as the
direct row, and also reports the key material each delivered key consumed at each hop (summed over the links
of that hop, both sides for spread; from the KMEs' ``qkdtls_kme_relay_bytes_total``: the key or pad bytes,
and the share of the MAC keys of its messages) and the CPU of all KME processes per cycle.

    python -m bench.relay [--duration 3] [--repeat 3] [--concurrency 1 8]

Each measurement of a row is paired with a measurement of the direct link taken just before it, and "vs
direct" and "+ms" are medians over those pairs (min-max of the ratios shown): the machine's speed drifts
between rows more than within a pair. The direct row gathers every direct measurement of that concurrency.

``--prefetch N`` sets ``[relay] prefetch = N`` on every KME: keys relayed ahead in batches, ``enc_keys``
served from them (docs/design.md, network relay: keys relayed ahead). Each row then also says what share of
its keys was served that way. The default measures relays on demand.

Targets (docs/design.md, network relay): a 3-hop trusted relay keeps >= 50 % of the direct link's cycles per
second at concurrency 8, and its p50 latency is <= 3 ms plus the direct link's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.kme_cycles import _cpu_seconds, conditions
from qkdtls import serving
from qkdtls.http11.client import HttpClient
from qkdtls.testbed import Testbed

LINKS = [(1, 11), (11, 12), (12, 13), (1, 21), (21, 22), (22, 23)]
LINKS += [(11, 32), (21, 32), (12, 33), (22, 33), (13, 34), (23, 34)]
KMES = sorted({k for link in LINKS for k in link})
MASTER = 1001
# (label, slave SAE, extension): the rows, direct first.
SPREAD = {"extension_mandatory": [{"qkdtls_relay_mode": "spread", "qkdtls_relay_paths": 2}]}
ROWS: list[tuple[str, int, int, dict[str, Any]]] = [
    ("direct", 1, 11001, {}),
    ("trusted", 2, 32001, {}),
    ("trusted", 3, 33001, {}),
    ("trusted", 4, 34001, {}),
    ("spread", 2, 32001, SPREAD),
    ("spread", 3, 33001, SPREAD),
    ("spread", 4, 34001, SPREAD),
]


def _hops_from_master() -> dict[int, int]:
    """Hop number of the links each KME sends on: 1 for KME 1's, 2 for its neighbours', ..."""
    depth = {1: 1}
    frontier = [1]
    while frontier:
        nxt = []
        for kme in frontier:
            for a, b in LINKS:
                for x, y in ((a, b), (b, a)):
                    if x == kme and y not in depth:
                        depth[y] = depth[kme] + 1
                        nxt.append(y)
        frontier = nxt
    return depth


HOP_OF = _hops_from_master()
_JSON = {"Content-Type": "application/json"}


def _client(bed: Testbed, sae: int | None, concurrency: int, kme: int | None = None) -> HttpClient:
    """A kept-alive mutual-TLS client of an SAE (or of KME ``kme``'s administrator)."""
    if sae is not None:
        cert, key, ca = bed.sae_credentials(sae)
        kme = bed.kme_of(sae)
    else:
        assert kme is not None
        cert, key, ca = bed.admin_credentials(kme)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(cert, key)
    url = urlsplit(bed.sae_url(kme))
    assert url.hostname is not None and url.port is not None
    return HttpClient(url.hostname, url.port, ssl=ctx, max_connections=concurrency, timeout=15.0)


@dataclass
class Run:
    cycles: int
    seconds: float
    cpu: float
    latencies: list[float]
    consumed: Counter[tuple[int, int, str]]  # (sender, receiver, purpose) -> bytes
    prefetch: Counter[str]  # keys for remote SAEs by outcome: hit (relayed ahead), miss (on demand), ...

    @property
    def rate(self) -> float:
        return self.cycles / self.seconds


@dataclass
class Row:
    mode: str
    hops: int
    concurrency: int
    runs: list[Run]
    # The direct link's run measured just before each of ``runs`` (the pair's baseline; empty for direct).
    baselines: list[Run] = field(default_factory=list)

    def ratios(self) -> list[float]:
        """Each pair's cycles/s against its direct run, sorted."""
        return sorted(r.rate / d.rate for r, d in zip(self.runs, self.baselines, strict=True))

    def extra_ms(self) -> float:
        """Median over pairs of the p50 latency minus the direct run's p50 (ms)."""
        return statistics.median(
            (_quantile(r.latencies, 0.5) - _quantile(d.latencies, 0.5)) * 1000
            for r, d in zip(self.runs, self.baselines, strict=True)
        )

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    def p(self, q: float) -> float:
        """Median over runs of each run's q-quantile latency (ms)."""
        return statistics.median(_quantile(r.latencies, q) for r in self.runs) * 1000

    def cpu_us(self) -> float:
        return statistics.median(r.cpu / r.cycles * 1e6 for r in self.runs)

    def per_key(self) -> dict[tuple[int, str], float]:
        """Bytes per delivered key by hop (1 = the links out of KME 1) and by value (key or pad) / mac."""
        total: Counter[tuple[int, str]] = Counter()
        for r in self.runs:
            for (a, _, purpose), nbytes in r.consumed.items():
                total[(HOP_OF[a], "mac" if purpose == "mac" else "value")] += nbytes
        cycles = sum(r.cycles for r in self.runs)
        return {key: total[key] / cycles for key in sorted(total)}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _scrape(bed: Testbed) -> tuple[Counter[tuple[int, int, str]], Counter[str]]:
    """Relay bytes every KME consumed as a sender, per directed link and purpose; the master's KME's keys
    relayed ahead by outcome (``--prefetch``)."""
    out: Counter[tuple[int, int, str]] = Counter()
    prefetch: Counter[str] = Counter()
    for kme in KMES:
        async with _client(bed, None, 1, kme=kme) as admin:
            text = (await admin.request("GET", "/metrics")).body.decode()
        for line in text.splitlines():
            if line.startswith("qkdtls_kme_relay_bytes_total{"):
                labels, value = line.rsplit(" ", 1)
                peer = int(labels.split('peer_kme="', 1)[1].split('"', 1)[0])
                purpose = labels.split('purpose="', 1)[1].split('"', 1)[0]
                out[(kme, peer, purpose)] += int(float(value))
            elif kme == bed.kme_of(MASTER) and line.startswith("qkdtls_kme_relay_prefetch_keys_total{"):
                labels, value = line.rsplit(" ", 1)
                prefetch[labels.split('outcome="', 1)[1].split('"', 1)[0]] += int(float(value))
    return out, prefetch


async def _measure(bed: Testbed, slave: int, doc: dict[str, Any], concurrency: int, duration: float) -> Run:
    enc_path = f"/api/v1/keys/{slave}/enc_keys"
    dec_path = f"/api/v1/keys/{MASTER}/dec_keys"
    body = json.dumps(doc).encode()
    latencies: list[float] = []
    async with _client(bed, MASTER, concurrency) as ms, _client(bed, slave, concurrency) as ss:

        async def cycle() -> None:
            started = time.perf_counter()
            r = await ms.request("POST", enc_path, body, _JSON)
            answer = json.loads(r.body)
            if r.status != 200:
                raise RuntimeError(f"enc_keys for {slave} answered {r.status}: {answer}")
            key = answer["keys"][0]
            ids = json.dumps({"key_IDs": [{"key_ID": key["key_ID"]}]}).encode()
            r = await ss.request("POST", dec_path, ids, _JSON)
            got = json.loads(r.body)
            if r.status != 200:
                raise RuntimeError(f"dec_keys at {slave} answered {r.status}: {got}")
            if base64.b64decode(got["keys"][0]["key"]) != base64.b64decode(key["key"]):
                raise RuntimeError("master and slave received different key bytes")
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(cycle() for _ in range(concurrency)))  # warm-up: connections, paths
        latencies.clear()
        pids = [p for p in (bed.pid(k) for k in KMES) if p is not None]
        before, ahead = await _scrape(bed)
        cpu0 = sum(_cpu_seconds(p) for p in pids)
        started = time.perf_counter()
        deadline = started + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await cycle()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        cpu = sum(_cpu_seconds(p) for p in pids) - cpu0
        after, ahead_after = await _scrape(bed)
    return Run(len(latencies), seconds, cpu, latencies, after - before, ahead_after - ahead)


async def _wait_routes(bed: Testbed, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with _client(bed, MASTER, 1) as ms:
        for _, _, slave, _ in ROWS:
            while True:
                r = await ms.request("GET", f"/api/v1/keys/{slave}/status")
                if r.status == 200 and json.loads(r.body)["stored_key_count"] > 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no route to SAE {slave}: {r.status} {r.body[:200]!r}")
                await asyncio.sleep(0.2)


def _links_text(row: Row) -> str:
    per = row.per_key()
    hops = sorted({hop for hop, _ in per})
    text = " ".join(f"h{h} {per.get((h, 'value'), 0):.0f}+{per.get((h, 'mac'), 0):.0f}" for h in hops)
    hits = sum(r.prefetch["hit"] for r in row.runs)
    asked = hits + sum(r.prefetch["miss"] for r in row.runs)
    return f"{text}  relayed ahead: {hits / asked:.0%}" if asked else text


async def _run(args: argparse.Namespace, root: Path) -> list[Row]:
    saes = {k: (k * 1000 + 1,) for k in KMES}
    bed = Testbed.create(
        root / "ladder",
        saes=saes,
        links=LINKS,
        initial_key_bytes=args.key_bytes,
        local_key_bytes=0,
        event_loop=args.event_loop,
        service={"recollect_window": 0},  # a cycle's collection erases its key at once
        kme_config={"relay": {"prefetch": args.prefetch}} if args.prefetch else None,
    )
    # The direct link is measured before every measurement of every row and carries relays too.
    bed.add_key_material(args.key_bytes, link=LINKS[0])
    t0 = time.perf_counter()
    await asyncio.to_thread(bed.start, 600.0)
    await _wait_routes(bed)
    print(f"# {len(KMES)} KMEs up, routes learnt in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows: list[Row] = []
    try:
        wanted = set(args.rows or [f"{m}:{h}" for m, h, _, _ in ROWS])
        _, _, direct_slave, _ = ROWS[0]
        for concurrency in args.concurrency:
            direct = Row("direct", 1, concurrency, [])
            rows.append(direct)
            # Every measurement of a row follows one of the direct link, and the ratio is taken per pair:
            # the machine's speed drifts between rows far more than within a pair.
            for mode, hops, slave, doc in ROWS[1:]:
                if f"{mode}:{hops}" not in wanted:
                    continue
                row = Row(mode, hops, concurrency, [])
                for _ in range(args.repeat):
                    row.baselines.append(await _measure(bed, direct_slave, {}, concurrency, args.duration))
                    row.runs.append(await _measure(bed, slave, doc, concurrency, args.duration))
                direct.runs.extend(row.baselines)
                rows.append(row)
                _print(row, direct)
            for _ in range(args.repeat if not direct.runs else 0):
                direct.runs.append(await _measure(bed, direct_slave, {}, concurrency, args.duration))
            _print(direct, direct)
    finally:
        await asyncio.to_thread(bed.stop)
    return rows


HEADER = (
    f"{'mode':>8} {'hops':>4} {'conc':>4} {'cycles/s':>9} {'(min-max)':>11} {'vs direct':>9} "
    f"{'(min-max)':>9} {'p50 ms':>7} {'+ms':>6} {'p99 ms':>7} {'CPU µs/cyc':>10}  "
    "material per key by hop: value+MAC B"
)


def _print(row: Row, direct: Row) -> None:
    """A row, its ratio and +ms as medians over its pairs with the direct link (the direct row: 100 %)."""
    rates = sorted(r.rate for r in row.runs)
    ratios = row.ratios() if row.baselines else [1.0]
    extra = row.extra_ms() if row.baselines else 0.0
    print(
        f"{row.mode:>8} {row.hops:>4} {row.concurrency:>4} {row.rate:>9.0f} "
        f"{f'{rates[0]:.0f}-{rates[-1]:.0f}':>11} {statistics.median(ratios):>9.0%} "
        f"{f'{ratios[0]:.0%}-{ratios[-1]:.0%}':>9} {row.p(0.5):>7.2f} {extra:>+6.2f} {row.p(0.99):>7.2f} "
        f"{row.cpu_us():>10.0f}  {_links_text(row)}",
        flush=True,
    )


def _summary(rows: list[Row]) -> None:
    for conc in sorted({r.concurrency for r in rows}):
        three = next((r for r in rows if (r.mode, r.hops, r.concurrency) == ("trusted", 3, conc)), None)
        if three is None:
            continue
        ratios = three.ratios()
        print(
            f"concurrency {conc}: 3-hop trusted {three.rate:.0f} cycles/s, "
            f"{statistics.median(ratios):.0%} of the direct link ({ratios[0]:.0%}-{ratios[-1]:.0%} over "
            f"{len(ratios)} pairs; target >= 50 %); p50 {three.p(0.5):.2f} ms, "
            f"{three.extra_ms():+.2f} ms against the direct link (target <= +3 ms)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per row (medians, min-max)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--key-bytes", type=int, default=16 << 20, help="key material per link")
    parser.add_argument("--root", type=Path, help="keep the testbed here (default: a temporary directory)")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=0,
        help="[relay] prefetch of every KME: keys relayed ahead per SAE pair (0: on demand, the default)",
    )
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument(
        "--rows",
        nargs="+",
        help="only these rows, e.g. trusted:3 spread:2 (each paired with the direct link)",
    )
    args = parser.parse_args(argv)
    print(HEADER)
    with tempfile.TemporaryDirectory(prefix="qkdtls-relay-bench-") as tmp:
        root = args.root or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(conditions(root))
        rows = serving.run(_run(args, root), args.event_loop)
    print()
    _summary(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
