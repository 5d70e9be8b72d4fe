"""KME key cycles per second: master ``enc_keys`` + slave ``dec_keys`` with the bytes compared.

Runs the two-KME testbed (SQLite, synchronous=FULL) for a local pair (both SAEs on KME 1) and a cross-KME
pair (KME 1 → KME 2), at several concurrencies and pool sizes. The load generator is a lean kept-alive
HTTP/1.1 client (``qkdtls.http11.client``) over mutual TLS, one per SAE, so that little of the measured CPU
is the client's. The server CPU time per cycle comes from /proc/<pid>/stat of the two KME processes.

    python -m bench.kme_cycles [--duration 3] [--repeat 3] [--concurrency 1 8 32] [--pools 6400 1000000]

Reference (the Rust KME of the paper on this machine kind): ~300 cycles/s, ~400 cycles per server-CPU
second, ~5 cycles/s with 1,000,000 keys in the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from qkdtls import serving
from qkdtls.http11.client import HttpClient
from qkdtls.testbed import Testbed

REFERENCE = {"cycles_per_s": 300.0, "cycles_per_cpu_s": 400.0, "cycles_per_s_1m_keys": 5.0}
PAIRS = {"local": (1001, 1002), "cross": (1001, 2001)}
BLOCK = 32  # bytes: one 256-bit key is one block
_TICK = os.sysconf("SC_CLK_TCK")
_JSON = {"Content-Type": "application/json"}


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Result:
    pool: int
    pair: str
    concurrency: int
    cycles: int
    seconds: float
    server_cpu: float
    client_cpu: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.cycles / self.seconds

    @property
    def per_cpu(self) -> float:
        return self.cycles / self.server_cpu if self.server_cpu > 0 else float("inf")


@dataclass
class Row:
    """Repeated measurements of one (pool, pair, concurrency): medians, and latencies of all runs."""

    runs: list[Result]

    @property
    def first(self) -> Result:
        return self.runs[0]

    @property
    def cycles(self) -> int:
        return sum(r.cycles for r in self.runs)

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    @property
    def per_cpu(self) -> float:
        return statistics.median(r.per_cpu for r in self.runs)

    def cpu_us(self, attr: str) -> float:
        """Median CPU microseconds per cycle of the servers ("server_cpu") or the load generator."""
        return statistics.median(getattr(r, attr) / r.cycles * 1e6 for r in self.runs)

    def percentile(self, q: float) -> float:
        ordered = sorted(t for r in self.runs for t in r.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _client(bed: Testbed, sae: int, concurrency: int) -> HttpClient:
    """A kept-alive mutual-TLS client of ``sae`` to the SAE interface of its own KME."""
    cert, key, ca = bed.sae_credentials(sae)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(cert, key)
    url = urlsplit(bed.sae_url(bed.kme_of(sae)))
    assert url.hostname is not None and url.port is not None
    return HttpClient(
        url.hostname, url.port, ssl=ctx, max_connections=concurrency, timeout=10.0, idle_timeout=60.0
    )


async def _measure(
    bed: Testbed, pool: int, pair: str, concurrency: int, duration: float, budget: int
) -> Result:
    master, slave = PAIRS[pair]
    enc_path = f"/api/v1/keys/{slave}/enc_keys"
    dec_path = f"/api/v1/keys/{master}/dec_keys"
    latencies: list[float] = []
    async with _client(bed, master, concurrency) as ms, _client(bed, slave, concurrency) as ss:

        async def cycle() -> None:
            started = time.perf_counter()
            r = await ms.request("POST", enc_path, b"{}", _JSON)
            doc = json.loads(r.body)
            if r.status != 200:
                raise RuntimeError(f"enc_keys answered {r.status}: {doc}")
            key = doc["keys"][0]
            body = {"key_IDs": [{"key_ID": key["key_ID"]}]}
            r = await ss.request("POST", dec_path, json.dumps(body).encode(), _JSON)
            got = json.loads(r.body)
            if r.status != 200:
                raise RuntimeError(f"dec_keys answered {r.status}: {got}")
            if base64.b64decode(got["keys"][0]["key"]) != base64.b64decode(key["key"]):
                raise RuntimeError("master and slave received different key bytes")
            latencies.append(time.perf_counter() - started)

        # Warm-up: open the kept-alive connections (and the inter-KME one) before measuring.
        await asyncio.gather(*(cycle() for _ in range(concurrency)))
        latencies.clear()
        pids = [p for p in (bed.pid(1), bed.pid(2)) if p is not None]
        cpu0, client0 = sum(_cpu_seconds(p) for p in pids), _client_cpu()
        started = time.perf_counter()
        deadline = started + duration
        remaining = budget

        async def worker() -> None:
            nonlocal remaining
            while time.perf_counter() < deadline and remaining > 0:
                remaining -= 1
                await cycle()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        cpu = sum(_cpu_seconds(p) for p in pids) - cpu0
        client = _client_cpu() - client0
    return Result(pool, pair, concurrency, len(latencies), seconds, cpu, client, latencies)


async def _stock(bed: Testbed, master: int, slave: int) -> int:
    async with _client(bed, master, 1) as client:
        r = await client.request("GET", f"/api/v1/keys/{slave}/status")
        doc = json.loads(r.body)
        if r.status != 200:
            raise RuntimeError(f"status answered {r.status}: {doc}")
        return int(doc["stored_key_count"])


async def _refill(bed: Testbed, pool: int, timeout: float = 600.0) -> None:
    """Top both pairs' stock up to ``pool`` keys so every measurement sees the same pool size."""
    for link, (master, slave) in (((1, 2), PAIRS["cross"]), ((1, 1), PAIRS["local"])):
        missing = pool - await _stock(bed, master, slave)
        if missing > 0:
            # Peer links split blocks between two directions: twice the bytes give `missing` keys to ours.
            factor = 2 if link == (1, 2) else 1
            bed.add_key_material(missing * BLOCK * factor, link=link)
    deadline = time.monotonic() + timeout
    for master, slave in PAIRS.values():
        while await _stock(bed, master, slave) < pool:
            if time.monotonic() > deadline:
                raise RuntimeError("the KMEs did not import the new key material in time")
            await asyncio.sleep(0.1)


def _fill(bed: Testbed, pool: int) -> None:
    # Files of at most 16 MiB keep each import transaction moderate.
    for link, nbytes in (((1, 2), 2 * pool * BLOCK), ((1, 1), pool * BLOCK)):
        while nbytes > 0:
            chunk = min(nbytes, 16 << 20)
            bed.add_key_material(chunk, link=link)
            nbytes -= chunk


async def _run_pool(root: Path, pool: int, args: argparse.Namespace) -> list[Row]:
    bed = Testbed.create(
        root / f"pool-{pool}", initial_key_bytes=0, local_key_bytes=0, event_loop=args.event_loop
    )
    _fill(bed, pool)
    t0 = time.perf_counter()
    await asyncio.to_thread(bed.start, 900.0)
    print(f"# pool {pool:,} keys: KMEs up and imported in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results = []
    try:
        for pair in args.pairs:
            for concurrency in args.concurrency:
                runs = []
                for _ in range(args.repeat):
                    await _refill(bed, pool)
                    # Never draw more than a third of the pool, so the pool size stays what the row says.
                    budget = max(pool // 3, 1)
                    runs.append(await _measure(bed, pool, pair, concurrency, args.duration, budget=budget))
                results.append(Row(runs))
                _print_row(results[-1])
    finally:
        await asyncio.to_thread(bed.stop)
    return results


HEADER = (
    f"{'pool keys':>10} {'pair':>6} {'conc':>5} {'cycles':>7} {'cycles/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'srv µs/cyc':>10} {'cyc/CPU-s':>9} {'(min-max)':>11} {'cli µs/cyc':>10}"
)


def _print_row(row: Row) -> None:
    r = row.first
    spread = sorted(run.per_cpu for run in row.runs)
    print(
        f"{r.pool:>10,} {r.pair:>6} {r.concurrency:>5} {row.cycles:>7} {row.rate:>9.0f} "
        f"{row.percentile(0.5):>7.2f} {row.percentile(0.99):>7.2f} {row.cpu_us('server_cpu'):>10.0f} "
        f"{row.per_cpu:>9.0f} {f'{spread[0]:.0f}-{spread[-1]:.0f}':>11} {row.cpu_us('client_cpu'):>10.0f}",
        flush=True,
    )


def _summary(rows: list[Row]) -> None:
    cross8 = [r for r in rows if r.first.pair == "cross" and r.first.concurrency == 8]
    if not cross8:
        return
    print()
    for r in cross8:
        print(
            f"cross-KME, concurrency 8, pool {r.first.pool:,}: {r.rate:.0f} cycles/s "
            f"({r.rate / REFERENCE['cycles_per_s']:.1f}x the reference's ~300), "
            f"{r.per_cpu:.0f} cycles per server-CPU-second "
            f"({r.per_cpu / REFERENCE['cycles_per_cpu_s']:.1f}x the reference's ~400)"
        )
    if len(cross8) > 1:
        small, large = cross8[0], cross8[-1]
        print(
            f"pool {large.first.pool:,} vs {small.first.pool:,}: {large.rate / small.rate:.2f}x the rate, "
            f"{large.per_cpu / small.per_cpu:.2f}x the cycles per CPU-second "
            f"(reference: ~5 cycles/s at 1,000,000 keys)"
        )


def conditions(folder: Path, samples: int = 200) -> str:
    """What decides these figures besides the code, for comparing runs on different machines: cores, load
    and the latency of one fsync of a small write where the KMEs' databases live (each SQLite commit is
    one; the KMEs commit on their event loops)."""
    times = []
    probe = folder / "fsync-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(samples):
            os.write(fd, b"\0" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        probe.unlink()
    times.sort()
    p50, p90 = (times[int(len(times) * q)] * 1000 for q in (0.5, 0.9))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    fsync = f"fsync of 4 KiB: p50 {p50:.2f} ms, p90 {p90:.2f} ms"
    return f"# {os.cpu_count()} cores, load average {load}; {fsync}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument(
        "--repeat", type=int, default=3, help="measurements per row; the row shows their medians"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["local", "cross"])
    parser.add_argument("--pools", type=int, nargs="+", default=[6400, 1_000_000], help="keys per pair")
    parser.add_argument("--root", type=Path, help="keep the testbed here (default: a temporary directory)")
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop of the KMEs and of this client (auto: uvloop when installed)",
    )
    args = parser.parse_args(argv)
    print(HEADER)
    results: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="qkdtls-bench-") as tmp:
        root = args.root or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(conditions(root))
        for pool in args.pools:
            results += serving.run(_run_pool(root, pool, args), args.event_loop)
    _summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
