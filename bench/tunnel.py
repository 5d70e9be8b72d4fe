"""``qkdtls tunnel`` against stunnel (Debian's stunnel4, TLS 1.3), set up the same way, in the same run.

    python -m bench.tunnel [--runs 3] [--mib 256] [--connections 600] [--idle 1000]

Both are a pair of processes on loopback: a client-side tunnel (plaintext in, TLS out) and a server-side one
(TLS in, plaintext to a target), in front of the same target process. stunnel uses a certificate and TLS 1.3
(TLS_AES_256_GCM_SHA384, its default; its session cache left at its defaults); the qkdtls pair uses TLS-QKD,
secure profile, ``qkd = "required"``, keys from the two-KME testbed (the same suite), with a prefetch pool
and key announcement (the KME requests are then made around the handshakes, and are included: the KMEs run
on the same two cores). A row without prefetch shows the cost of asking both KMEs inside each set-up.

Measured, runs interleaved so machine load hits the rows alike:

* throughput of one stream (the target sends ``--mib`` MiB through both tunnels; first to last byte at the
  client) and the CPU time per MiB of the two tunnel processes together (``/proc/PID/stat``, all threads);
* connection set-up: ``--connections`` connections at concurrency 1 and 32, each connect → send one byte →
  first byte of the target's answer → close; set-ups per second and p50/p99 of connect-to-first-byte;
* CPU per set-up at concurrency 32: of the two tunnel processes, and of the two KMEs meanwhile;
* memory: RSS of both tunnel processes with ``--idle`` idle tunnelled connections open, minus before.

Targets: throughput and CPU per MiB within 0.8x of stunnel's; connect latency within 1.5x; 1,000 idle
connections under 200 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdtls.testbed import Testbed, free_port

HOST = "127.0.0.1"
CLIENT_SAE, SERVER_SAE = 1001, 2001
READ = 1 << 18
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the target: one process for every row ---------------------------------------------------------------

TARGET = r"""
import asyncio, struct, sys
CHUNK = memoryview(bytes(1 << 20))

class Target(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf, self.left, self.mode, self.paused = t, b"", 0, None, False
    def data_received(self, data):
        if self.mode == "echo":
            self.t.write(data); return
        self.buf += data
        if self.buf[:1] == b"P":
            self.mode = "ping"; self.t.write(b"!")
        elif self.buf[:1] == b"E":
            self.mode = "echo"; rest = self.buf[1:]
            if rest: self.t.write(rest)
        elif self.buf[:1] == b"S" and len(self.buf) >= 9:
            self.mode = "source"; self.left = struct.unpack("!Q", self.buf[1:9])[0]; self.pump()
    def pump(self):
        while self.left and not self.paused:
            n = min(self.left, len(CHUNK)); self.t.write(CHUNK[:n]); self.left -= n
        if not self.left and self.mode == "source":
            self.mode = "done"; self.t.write_eof()
    def pause_writing(self): self.paused = True
    def resume_writing(self):
        self.paused = False; self.pump()
    def eof_received(self):
        self.t.close()

async def main():
    import uvloop  # noqa
    server = await asyncio.get_running_loop().create_server(Target, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

import uvloop
uvloop.run(main())
"""


@dataclass
class Pair:
    """A client-side and a server-side tunnel; ``port`` is where plaintext clients connect."""

    name: str
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads
        return total

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}: {log.read_text()[-2000:]}")


def start_stunnel(root: Path, tb: Testbed, target: int) -> Pair:
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        sys.exit("stunnel4 is not installed (apt-get install stunnel4, or make system-deps)")
    cert, key, ca = tb.app_server_credentials(SERVER_SAE)
    server_port, client_port = free_port(), free_port()
    common = "foreground = yes\npid =\nsyslog = no\ndebug = 3\n"
    common += "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
    server_conf = root / "stunnel-server.conf"
    server_conf.write_text(
        common + f"output = {root}/stunnel-server.log\n[svc]\naccept = {HOST}:{server_port}\n"
        f"connect = {HOST}:{target}\ncert = {cert}\nkey = {key}\nsslVersion = TLSv1.3\n"
    )
    client_conf = root / "stunnel-client.conf"
    client_conf.write_text(
        common + f"output = {root}/stunnel-client.log\n[svc]\nclient = yes\naccept = {HOST}:{client_port}\n"
        f"connect = {HOST}:{server_port}\nsslVersion = TLSv1.3\nCAfile = {ca}\nverifyChain = yes\n"
        "checkHost = localhost\nsni = localhost\n"
    )
    pair = Pair("stunnel", client_port)
    for conf, port in ((server_conf, server_port), (client_conf, client_port)):
        proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pair.procs.append(proc)
        _wait_port(port, proc, conf.with_suffix(".log"))
    return pair


def _toml(doc: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a tunnel configuration: scalars, arrays of scalars, nested tables."""
    out = "".join(f"{k} = {json.dumps(v)}\n" for k, v in doc.items() if not isinstance(v, dict))
    for k, v in doc.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            out += f"\n[{name}]\n" + _toml(v, name)
    return out


def start_qkdtls(root: Path, tb: Testbed, target: int, name: str, prefetch: int) -> Pair:
    def kme(sae: int) -> dict[str, Any]:
        c, k, a = tb.sae_credentials(sae)
        return {"url": tb.sae_url(tb.kme_of(sae)), "cert": str(c), "key": str(k), "ca": str(a)}

    cert, key, ca = tb.app_server_credentials(SERVER_SAE)
    server_port, client_port = free_port(), free_port()
    server = {
        "mode": "server", "accept": f"{HOST}:{server_port}", "connect": f"{HOST}:{target}", "cert": str(cert),
        "key": str(key), "allowed_peer_sae_ids": [CLIENT_SAE], "accept_key_announcements": prefetch > 0,
        "max_connections": 4096, "max_kme_lookups": 64, "max_kme_lookups_per_source": 64,
        "kme": kme(SERVER_SAE),
    }  # fmt: skip
    client = {
        "mode": "client", "accept": f"{HOST}:{client_port}", "connect": f"{HOST}:{server_port}",
        "target_sae_id": SERVER_SAE, "sni": "localhost", "cafile": str(ca), "prefetch": prefetch,
        "announce_keys": 16 if prefetch else 0, "max_connections": 4096, "kme": kme(CLIENT_SAE),
    }  # fmt: skip
    pair = Pair(name, client_port)
    for side, doc, port in (("server", server, server_port), ("client", client, client_port)):
        conf = root / f"{name}-{side}.toml"
        conf.write_text(_toml({"services": {"svc": doc}}))
        log = root / f"{name}-{side}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qkdtls", "tunnel", "--quiet", "--config", str(conf)],
                stdout=out, stderr=out,
            )  # fmt: skip
        pair.procs.append(proc)
        _wait_port(port, proc, log)
    return pair


# -- measurements ----------------------------------------------------------------------------------------


def throughput(pair: Pair, size: int) -> tuple[float, float]:
    """MB/s of one stream through the pair, and the tunnels' CPU seconds per MiB."""
    buf = bytearray(READ)
    with socket.create_connection((HOST, pair.port), timeout=60) as sock:
        cpu0 = pair.cpu_seconds()
        sock.sendall(b"S" + struct.pack("!Q", size))
        got = sock.recv_into(buf)
        started = time.perf_counter()
        while got < size:
            n = sock.recv_into(buf)
            if not n:
                raise RuntimeError(f"{pair.name}: stream ended after {got} bytes")
            got += n
        elapsed = time.perf_counter() - started
        cpu = pair.cpu_seconds() - cpu0
    return size / elapsed / 1e6, cpu / (size / (1 << 20))


async def _connections(port: int, total: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    todo = iter(range(total))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for _ in todo:
            started = time.perf_counter()
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(b"P")
                first = await asyncio.wait_for(reader.read(1), 30)
            except (OSError, TimeoutError):
                failures += 1
                continue
            if first == b"!":
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    if failures:
        print(f"  ({failures} of {total} connections failed)", file=sys.stderr)
    return len(latencies) / elapsed, latencies


def setup_rate(pair: Pair, total: int, concurrency: int) -> tuple[float, float, float]:
    import uvloop

    rate, latencies = uvloop.run(_connections(pair.port, total, concurrency))
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return rate, p50 * 1000, p99 * 1000


async def _hold(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(32)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"Ex")
            assert await asyncio.wait_for(reader.readexactly(1), 30) == b"x"
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


def idle_memory(pair: Pair, count: int) -> tuple[float, float]:
    """RSS of both tunnels (MiB) before and with ``count`` idle tunnelled connections."""
    import uvloop

    before = pair.rss_mib()

    async def run() -> float:
        writers = await _hold(pair.port, count)
        await asyncio.sleep(1.0)
        rss = pair.rss_mib()
        for w in writers:
            w.close()
        await asyncio.sleep(0.5)
        return rss

    return before, uvloop.run(run())


# -- the run ---------------------------------------------------------------------------------------------


def _others() -> str:
    """What else ran on the machine: load average and the busiest other processes."""
    out = subprocess.run(
        ["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True, check=False
    )
    busy = [line.strip() for line in out.stdout.splitlines()[1:6]]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"load average {load}; busiest processes (%CPU since start): {'; '.join(busy)}"


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


@contextlib.contextmanager
def _target() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", TARGET], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    try:
        yield port
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256, help="MiB per throughput run")
    parser.add_argument("--connections", type=int, default=600, help="connections per set-up run")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure")
    parser.add_argument("--skip-no-prefetch", action="store_true", help="leave out the row without prefetch")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))  # children inherit it
    print(f"before: {_others()}")
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as tmp, _target() as target:
        root = Path(tmp)
        with Testbed.create(root / "tb", initial_key_bytes=8 << 20, service={"recollect_window": 0.0}) as tb:
            pairs = [start_stunnel(root, tb, target), start_qkdtls(root, tb, target, "qkdtls", prefetch=64)]
            if not args.skip_no_prefetch:
                pairs.append(start_qkdtls(root, tb, target, "qkdtls-no-prefetch", prefetch=0))
            try:
                kme_procs = [k.proc for k in tb.kmes.values() if k.proc is not None]
                run_all(pairs, args, Pair("KMEs", 0, kme_procs))
            finally:
                for pair in pairs:
                    pair.stop()
    print(f"after: {_others()}")


def run_all(pairs: list[Pair], args: argparse.Namespace, kmes: Pair) -> None:
    size = args.mib << 20
    results: dict[str, dict[str, list[float]]] = {p.name: {} for p in pairs}

    def add(pair: Pair, key: str, value: float) -> None:
        results[pair.name].setdefault(key, []).append(value)

    for pair in pairs:  # warm-up: connections, key pools, announcements
        setup_rate(pair, 64, 8)
        throughput(pair, 16 << 20)
    for run in range(args.runs):
        for pair in pairs if run % 2 == 0 else list(reversed(pairs)):
            mbs, cpu = throughput(pair, size)
            add(pair, "MB/s", mbs)
            add(pair, "CPU ms/MiB", cpu * 1000)
            for concurrency in (1, 32):
                cpu0, kme0 = pair.cpu_seconds(), kmes.cpu_seconds()
                rate, p50, p99 = setup_rate(pair, args.connections, concurrency)
                add(pair, f"c{concurrency} set-ups/s", rate)
                add(pair, f"c{concurrency} p50 ms", p50)
                add(pair, f"c{concurrency} p99 ms", p99)
                if concurrency == 32:  # CPU per set-up: the two tunnels, and the two KMEs meanwhile
                    add(
                        pair,
                        "c32 tunnels CPU ms/set-up",
                        (pair.cpu_seconds() - cpu0) * 1000 / args.connections,
                    )
                    add(pair, "c32 KMEs CPU ms/set-up", (kmes.cpu_seconds() - kme0) * 1000 / args.connections)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    for pair in pairs:
        before, during = idle_memory(pair, args.idle)
        add(pair, "RSS idle before MiB", before)
        add(pair, f"RSS with {args.idle} idle MiB", during)
    _report(results, pairs)


def _report(results: dict[str, dict[str, list[float]]], pairs: list[Pair]) -> None:
    base = results[pairs[0].name]
    keys = list(base)
    print("\n| metric | " + " | ".join(p.name for p in pairs) + " | ratios to stunnel (median) |")
    print("|---|" + "---|" * len(pairs) + "---|")
    for key in keys:
        cells = [_summary(results[p.name][key]) for p in pairs]
        ratios = []
        for pair in pairs[1:]:
            ours = statistics.median(results[pair.name][key])
            theirs = statistics.median(base[key])
            ratios.append(f"{pair.name} {ours / theirs:.2f}x" if theirs else "-")
        print(f"| {key} | " + " | ".join(cells) + " | " + ", ".join(ratios) + " |")


if __name__ == "__main__":
    main()
