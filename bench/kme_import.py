"""``enc_keys`` latency while a large key file is imported, against the same load without an import.

Runs the two-KME testbed (SQLite, synchronous=FULL) and a cross-KME pair (SAE 1001 on KME 1 → SAE 2001 on
KME 2) at a fixed concurrency of kept-alive mutual-TLS ``enc_keys`` requests. Each repetition measures

1. a baseline window without any import, then
2. a window that starts when a ``--file-mib`` MiB key file is dropped into the link's two folders (both
   KMEs import it, as from a QKD stack) and ends when both KMEs have imported it,

and prints p50/p99 of both and their ratios. The baseline window lasts as long as the last import did, so
both see the same amount of load. Summary: median and min-max of the ratios over the repetitions.

    python -m bench.kme_import [--file-mib 64] [--repeat 3] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.kme_cycles import BLOCK, PAIRS, _client, _cpu_seconds
from qkdtls import serving
from qkdtls.http11.client import HttpClient
from qkdtls.testbed import Testbed

_JSON = {"Content-Type": "application/json"}


@dataclass
class Window:
    latencies: list[float]
    seconds: float
    import_seconds: float | None = None
    cpu_seconds: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


async def _imported(bed: Testbed, kme_id: int, link: int) -> int:
    cert, key, ca = bed.admin_credentials(kme_id)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(cert, key)
    url = urlsplit(bed.sae_url(kme_id))
    assert url.hostname is not None and url.port is not None
    async with HttpClient(url.hostname, url.port, ssl=ctx, max_connections=1, timeout=10.0) as client:
        r = await client.request("GET", "/api/v1/admin/links")
        doc = json.loads(r.body)
    for entry in doc["links"]:
        if entry["peer_KME_ID"] == link:
            return int(entry["imported_bytes"])
    raise RuntimeError(f"KME {kme_id} has no link {link}")


async def _window(
    bed: Testbed, concurrency: int, duration: float | None, import_bytes: int, timeout: float
) -> Window:
    """enc_keys from ``concurrency`` workers: for ``duration`` s, or until both KMEs imported a new file."""
    master, slave = PAIRS["cross"]
    path = f"/api/v1/keys/{slave}/enc_keys"
    latencies: list[float] = []
    async with _client(bed, master, concurrency) as client:

        async def call() -> None:
            started = time.perf_counter()
            r = await client.request("POST", path, b"{}", _JSON)
            if r.status != 200:
                raise RuntimeError(f"enc_keys answered {r.status}: {r.body[:200]!r}")
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(call() for _ in range(concurrency)))  # warm-up: open the connections
        latencies.clear()
        done = asyncio.Event()

        async def worker() -> None:
            while not done.is_set():
                await call()

        pids = [p for p in (bed.pid(1), bed.pid(2)) if p is not None]
        cpu0 = sum(_cpu_seconds(p) for p in pids)
        started = time.perf_counter()
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        import_seconds = None
        try:
            if import_bytes:
                targets = {k: await _imported(bed, k, 3 - k) + import_bytes for k in (1, 2)}
                await asyncio.to_thread(bed.add_key_material, import_bytes)
                deadline = time.monotonic() + timeout
                pending = set(targets)
                while pending:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the KMEs did not import the file in time")
                    await asyncio.sleep(0.1)
                    pending = {k for k in pending if await _imported(bed, k, 3 - k) < targets[k]}
                import_seconds = time.perf_counter() - started
            else:
                assert duration is not None
                await asyncio.sleep(duration)
        finally:
            done.set()
            await asyncio.gather(*workers, return_exceptions=True)
        seconds = time.perf_counter() - started
        cpu = sum(_cpu_seconds(p) for p in pids) - cpu0
    return Window(latencies, seconds, import_seconds, cpu)


def _line(label: str, w: Window) -> str:
    extra = f"  import {w.import_seconds:.1f} s" if w.import_seconds is not None else ""
    return (
        f"  {label:<10} {len(w.latencies):>7} calls {w.rate:>7.0f}/s  p50 {w.percentile(0.5):6.2f} ms  "
        f"p99 {w.percentile(0.99):6.2f} ms  KME CPU {w.cpu_seconds:5.1f} s{extra}"
    )


async def _bench(root: Path, args: argparse.Namespace) -> int:
    # Stock for every window. enc_keys without dec_keys leaves the keys uncollected at KME 2, fine here:
    # the uncollected-keys quota is lifted for that (0 = no cap).
    bed = Testbed.create(
        root / "bed",
        initial_key_bytes=0,
        local_key_bytes=0,
        event_loop=args.event_loop,
        kme_config={"quotas": {"max_uncollected": 0}},
    )
    bed.add_key_material(args.stock_keys * BLOCK * 2)
    await asyncio.to_thread(bed.start, 900.0)
    file_bytes = args.file_mib << 20
    ratios50: list[float] = []
    ratios99: list[float] = []
    try:
        duration = args.duration
        for i in range(args.repeat):
            base = await _window(bed, args.concurrency, duration, 0, args.timeout)
            during = await _window(bed, args.concurrency, None, file_bytes, args.timeout)
            assert during.import_seconds is not None
            duration = during.import_seconds  # the next baseline lasts as long as this import did
            r50 = during.percentile(0.5) / base.percentile(0.5)
            r99 = during.percentile(0.99) / base.percentile(0.99)
            ratios50.append(r50)
            ratios99.append(r99)
            print(f"repetition {i + 1}:")
            print(_line("baseline", base))
            print(_line("importing", during))
            print(
                f"  ratio      p50 {r50:.2f}x  p99 {r99:.2f}x  "
                f"({args.file_mib} MiB imported by both KMEs at "
                f"{args.file_mib / during.import_seconds:.1f} MiB/s)",
                flush=True,
            )
    finally:
        await asyncio.to_thread(bed.stop)

    def spread(values: list[float]) -> str:
        return f"median {statistics.median(values):.2f}x (min {min(values):.2f}x, max {max(values):.2f}x)"

    print()
    print(
        f"enc_keys during a {args.file_mib} MiB import vs without, concurrency {args.concurrency}, cross-KME:"
    )
    print(f"  p50 ratio {spread(ratios50)}")
    print(f"  p99 ratio {spread(ratios99)}  (target: within 2x)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--file-mib", type=int, default=64, help="size of the imported key file (MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="baseline + import windows to measure")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of the first baseline window (later ones last as long as the previous import)",
    )
    parser.add_argument("--stock-keys", type=int, default=200_000, help="keys in stock at the start")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on one import (seconds)")
    parser.add_argument("--root", type=Path, help="keep the testbed here (default: a temporary directory)")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qkdtls-bench-") as tmp:
        return int(serving.run(_bench(args.root or Path(tmp), args), args.event_loop))


if __name__ == "__main__":
    sys.exit(main())
