"""Bulk throughput of the TLS-QKD record layer against Python ``ssl`` (OpenSSL), on loopback.

    python -m bench.bulk [--mib 256] [--runs 5]

One connection per run; the sender (a separate process, as a real peer would be: no shared GIL) ``sendall``s
the payload in 1 MiB application writes; the receiver reads with ``recv_into`` into a preallocated buffer and
times the transfer from its first byte to its last. Rows (same run, same machine, alternating run by run):

* ``python-ssl``: Python ``ssl`` on both ends, TLS_AES_256_GCM_SHA384 (the baseline);
* ``qkdtls-qkd``: TLS-QKD secure profile on both ends (our record layer on both ends, AES-256-GCM), keys
  from the two-KME testbed;
* ``qkdtls-client/ssl-server``: our client receiving from a Python ``ssl`` sender (classic TLS 1.3).

Besides throughput, each row shows the CPU time per MiB of the receiver and of the sender (thread CPU time
of the transfer, handshake excluded): on a loaded machine the CPU columns are the steadier comparison.

Target: qkdtls-qkd ≥ 1.2x the baseline.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdtls.etsi014.client import KmeClient, KmeClientSettings
from qkdtls.net.context import QKDContext
from qkdtls.testbed import Testbed

HOST = "127.0.0.1"
WRITE = 1 << 20
READ = 1 << 18
TIMEOUT = 60.0


@dataclass(frozen=True)
class SenderSpec:
    """What the sender process needs to build its side (paths and URLs only: it runs in a fresh process)."""

    kind: str  # "ssl" | "qkd"
    cert: Path
    key: Path
    kme: KmeClientSettings | None = None


def _sender(spec: SenderSpec, size: int, connections: int, ports: Any, cpu: Any) -> None:
    """Sender process: serve ``connections`` connections, each ``size`` bytes in 1 MiB writes.

    Puts the sender's CPU seconds of each connection's transfer (handshake excluded) on ``cpu``.
    """
    if spec.kind == "ssl":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(spec.cert, spec.key)
        wrap: Callable[[socket.socket], Any] = lambda s: ctx.wrap_socket(s, server_side=True)  # noqa: E731
    else:
        qkd = QKDContext("server", kme=spec.kme, qkd="required", certfile=spec.cert, keyfile=spec.key)
        wrap = lambda s: qkd.wrap_socket(s, server_side=True)  # noqa: E731
    payload = memoryview(bytes(size))
    with socket.create_server((HOST, 0)) as listener:
        listener.settimeout(TIMEOUT)
        ports.put(listener.getsockname()[1])
        for _ in range(connections):
            raw, _ = listener.accept()
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(TIMEOUT)
            tls = wrap(raw)
            cpu_started = time.thread_time()
            for start in range(0, size, WRITE):
                tls.sendall(payload[start : start + WRITE])
            cpu.put(time.thread_time() - cpu_started)
            tls.recv(1)  # the receiver's "done": keeps the connection open until then
            tls.close()


def _receive(tls: Any, size: int) -> tuple[float, float]:
    """(wall seconds, receiver CPU seconds) from the first byte to the last."""
    view = memoryview(bytearray(READ))
    got = 0
    started = cpu_started = 0.0
    while got < size:
        n = tls.recv_into(view)
        if not n:
            raise RuntimeError("connection closed early")
        if not got:
            started, cpu_started = time.perf_counter(), time.thread_time()
        got += n
    elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    tls.sendall(b"k")
    return elapsed, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="payload per run (MiB)")
    parser.add_argument("--runs", type=int, default=5, help="runs per row (median reported)")
    args = parser.parse_args(argv)
    size = args.mib << 20
    spawn = multiprocessing.get_context("spawn")

    with tempfile.TemporaryDirectory() as tmp, Testbed.create(Path(tmp), initial_key_bytes=1 << 16) as tb:
        cert, key, ca = tb.app_server_credentials(2001)

        def kme_settings(sae_id: int) -> KmeClientSettings:
            c, k, kca = tb.sae_credentials(sae_id)
            return KmeClientSettings(url=tb.sae_url(tb.kme_of(sae_id)), certfile=c, keyfile=k, cafile=kca)

        ssl_client = ssl.create_default_context(cafile=str(ca))
        kme_client = KmeClient(kme_settings(1001))
        qkd_client = QKDContext("client", kme=kme_client, qkd="required", cafile=ca)
        classic_client = QKDContext("client", qkd="off", cafile=ca)
        rows: dict[str, tuple[SenderSpec, Callable[[socket.socket], Any]]] = {
            "python-ssl": (
                SenderSpec("ssl", cert, key),
                lambda s: ssl_client.wrap_socket(s, server_hostname="localhost"),
            ),
            "qkdtls-qkd": (
                SenderSpec("qkd", cert, key, kme_settings(2001)),
                lambda s: qkd_client.wrap_socket(s, server_hostname="localhost", target_sae_id=2001),
            ),
            "qkdtls-client/ssl-server": (
                SenderSpec("ssl", cert, key),
                lambda s: classic_client.wrap_socket(s, server_hostname="localhost"),
            ),
        }
        senders = {}
        ports: dict[str, int] = {}
        sender_cpu: dict[str, Any] = {}
        for name, (spec, _) in rows.items():
            queue, sender_cpu[name] = spawn.Queue(), spawn.Queue()
            proc = spawn.Process(
                target=_sender, args=(spec, size, args.runs + 1, queue, sender_cpu[name]), daemon=True
            )
            proc.start()
            senders[name] = proc
            ports[name] = queue.get(timeout=TIMEOUT)

        def run(name: str) -> tuple[float, float, float]:
            raw = socket.create_connection((HOST, ports[name]), timeout=TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = rows[name][1](raw)
            elapsed, cpu = _receive(tls, size)
            tls.close()
            mib = size / 2**20
            return size / elapsed, cpu / mib, sender_cpu[name].get(timeout=TIMEOUT) / mib

        rates: dict[str, list[tuple[float, float, float]]] = {name: [] for name in rows}
        try:
            for name in rows:
                run(name)  # warm-up
            # Rows alternate run by run so a load change on the machine hits every row alike.
            for _ in range(args.runs):
                for name in rows:
                    rates[name].append(run(name))
        finally:
            for proc in senders.values():
                proc.join(TIMEOUT)
                if proc.is_alive():
                    proc.kill()
            kme_client.close()

    speed = {name: statistics.median(r for r, _, _ in values) for name, values in rates.items()}
    cpu = {name: statistics.median(c for _, c, _ in values) for name, values in rates.items()}
    send_cpu = {name: statistics.median(c for _, _, c in values) for name, values in rates.items()}
    base, base_cpu, base_send = speed["python-ssl"], cpu["python-ssl"], send_cpu["python-ssl"]
    print(f"bulk transfer, {args.mib} MiB per run, median of {args.runs} runs, loopback, sender in a process")
    print(
        f"{'row':<28}{'MB/s':>8}{'vs ssl':>8}{'receiver CPU us/MiB':>21}{'vs ssl':>8}"
        f"{'sender CPU us/MiB':>19}{'vs ssl':>8}"
    )
    for name in rows:
        print(
            f"{name:<28}{speed[name] / 1e6:>8.0f}{speed[name] / base:>7.2f}x"
            f"{cpu[name] * 1e6:>21.0f}{cpu[name] / base_cpu:>7.2f}x"
            f"{send_cpu[name] * 1e6:>19.0f}{send_cpu[name] / base_send:>7.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
