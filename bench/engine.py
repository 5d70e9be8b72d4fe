"""CPU time of one handshake in the sans-I/O engines, in memory (no sockets, no KME, no scheduling).

    python -m bench.engine [--runs 2000] [--rows secure,reference,...] [--profile ROW]

Each run builds fresh connection objects and moves the flights between them until both sides report
``HandshakeComplete`` and nothing is left to send; the time of every call into the client and into the
server is summed separately, so the table shows what each engine costs per handshake. Rows:

* ``secure``: TLSClient ↔ TLSServer, secure profile (external PSK + X25519), with a fixed QKD key handed
  to the server at ``NeedQkdKey``, rekeying and key announcement negotiated (as ``QKDContext`` configures
  them);
* ``reference``: the reference profile (ECDHE + the server's ECDSA P-256 CertificateVerify);
* ``classic-vs-openssl``: our client, policy off, against an OpenSSL server (``ssl.SSLObject`` over memory
  BIOs), with certificate validation;
* ``openssl-vs-openssl``: the same with an OpenSSL client, the baseline.

``--profile ROW`` runs that row under cProfile and prints the top functions by internal time.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import pstats
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer, ServerConfig
from qkdtls.tls.events import HandshakeComplete, NeedQkdKey
from qkdtls.tls.server import TLSServer

KEY_ID = "7b848ade-8cff-3d54-a9b8-53a215e6ee77"
MASTER = 1001
ROWS = ("secure", "reference", "classic-vs-openssl", "openssl-vs-openssl")
# A handshake takes three flights; the bound only keeps a defect from looping.
MAX_ROUNDS = 10


@dataclass
class Pki:
    ca: x509.Certificate
    leaf: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path
    ca_path: Path


def make_pki(directory: Path) -> Pki:
    """A CA and a localhost leaf, both ECDSA P-256 (what bench.handshake's testbed issues)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "leaf.pem", directory / "leaf.key", directory / "ca.pem"
    paths[0].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(ca, leaf, key, *paths)


@dataclass
class Clock:
    """Time spent in each side's calls during one handshake."""

    client: int = 0
    server: int = 0


class _OpenSSLEnd:
    """An ``ssl.SSLObject`` over memory BIOs, driven like our engines."""

    def __init__(self, context: ssl.SSLContext, server_side: bool) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=None if server_side else "localhost")
        self.done = False

    def step(self, data: bytes) -> bytes:
        if data:
            self._in.write(data)
        if not self.done:
            try:
                self._ssl.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                pass
        return self._out.read()


@dataclass
class Row:
    name: str
    run: Callable[[Clock], None]
    total: list[float] = field(default_factory=list)
    client: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)


def _drain(conn: TLSClient | TLSServer, key: bytes | None) -> bool:
    """Handles the events a handshake raises; True once the connection reported HandshakeComplete."""
    done = False
    while (event := conn.next_event()) is not None:
        if isinstance(event, NeedQkdKey):
            assert isinstance(conn, TLSServer)
            conn.provide_qkd_key(key)
        elif isinstance(event, HandshakeComplete):
            done = True
    return done


def engines_row(name: str, client_config: ClientConfig, server_config: ServerConfig,
                profile: str) -> Row:
    key = os.urandom(32)
    offer = QkdOffer(KEY_ID, key, MASTER, (profile,))

    def run(clock: Clock) -> None:
        t0 = time.perf_counter_ns()
        client = TLSClient(client_config, "localhost", offer)
        client.initiate()
        to_server = client.data_to_send()
        t1 = time.perf_counter_ns()
        server = TLSServer(server_config)
        clock.client += t1 - t0
        client_done = server_done = False
        for _ in range(MAX_ROUNDS):
            t0 = time.perf_counter_ns()
            if to_server:
                server.receive_data(to_server)
            server_done |= _drain(server, key)
            to_client = server.data_to_send()
            t1 = time.perf_counter_ns()
            if to_client:
                client.receive_data(to_client)
            client_done |= _drain(client, None)
            to_server = client.data_to_send()
            t2 = time.perf_counter_ns()
            clock.server += t1 - t0
            clock.client += t2 - t1
            if client_done and server_done and not to_server and not to_client:
                return
        raise RuntimeError(f"{name}: handshake did not complete")

    return Row(name, run)


def openssl_server_row(name: str, client_factory: Callable[[], TLSClient | _OpenSSLEnd],
                       server_context: ssl.SSLContext) -> Row:
    def run(clock: Clock) -> None:
        t0 = time.perf_counter_ns()
        client = client_factory()
        if isinstance(client, TLSClient):
            client.initiate()
            to_server = client.data_to_send()
        else:
            to_server = client.step(b"")
        clock.client += time.perf_counter_ns() - t0
        server = _OpenSSLEnd(server_context, server_side=True)
        client_done = False
        for _ in range(MAX_ROUNDS):
            t0 = time.perf_counter_ns()
            to_client = server.step(to_server)
            t1 = time.perf_counter_ns()
            if isinstance(client, TLSClient):
                if to_client:
                    client.receive_data(to_client)
                client_done |= _drain(client, None)
                to_server = client.data_to_send()
            else:
                to_server = client.step(to_client)
                client_done = client.done
            t2 = time.perf_counter_ns()
            clock.server += t1 - t0
            clock.client += t2 - t1
            if client_done and server.done and not to_server and not to_client:
                return
        raise RuntimeError(f"{name}: handshake did not complete")

    return Row(name, run)


def build_rows(pki: Pki, names: list[str]) -> list[Row]:
    qkd_client = ClientConfig(trust=[pki.ca], qkd="required", rekey=True, key_announce=True)
    qkd_server = ServerConfig(
        certificate_chain=[pki.leaf], private_key=pki.key, qkd="required", rekey=True,
        accept_key_announcements=True,
    )
    ref_client = ClientConfig(trust=[pki.ca], qkd="required", qkd_profiles=("reference",))
    ref_server = ServerConfig(
        certificate_chain=[pki.leaf], private_key=pki.key, qkd="required", qkd_profiles=("reference",)
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(pki.cert_path, pki.key_path)
    server_ctx.num_tickets = 0   # what our client would drop anyway; keeps the flights comparable
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    classic_client = ClientConfig(trust=[pki.ca], qkd="off")
    factories: dict[str, Callable[[], Row]] = {
        "secure": lambda: engines_row("secure", qkd_client, qkd_server, "secure"),
        "reference": lambda: engines_row("reference", ref_client, ref_server, "reference"),
        "classic-vs-openssl": lambda: openssl_server_row(
            "classic-vs-openssl", lambda: TLSClient(classic_client, "localhost"), server_ctx
        ),
        "openssl-vs-openssl": lambda: openssl_server_row(
            "openssl-vs-openssl", lambda: _OpenSSLEnd(client_ctx, server_side=False), server_ctx
        ),
    }
    return [factories[name]() for name in names]


def measure(rows: list[Row], runs: int, warmup: int = 50) -> None:
    # Rows alternate run by run so a load change on the machine hits every row alike.
    for i in range(runs + warmup):
        for row in rows:
            clock = Clock()
            row.run(clock)
            if i >= warmup:
                row.client.append(clock.client / 1000)
                row.server.append(clock.server / 1000)
                row.total.append((clock.client + clock.server) / 1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="handshakes per row (after 50 warm-up ones)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--profile", choices=ROWS, help="run this row under cProfile instead")
    args = parser.parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    unknown = set(names) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp))
        if args.profile:
            row = build_rows(pki, [args.profile])[0]
            measure([row], 0, warmup=20)
            profiler = cProfile.Profile()
            profiler.enable()
            measure([row], args.runs, warmup=0)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
            return 0
        rows = build_rows(pki, names)
        measure(rows, args.runs)
    print(f"in-memory handshake, median of {args.runs} runs (µs of CPU per handshake)")
    print(f"{'row':<22}{'both':>10}{'client':>10}{'server':>10}")
    for row in rows:
        print(f"{row.name:<22}{statistics.median(row.total):>10.0f}{statistics.median(row.client):>10.0f}"
              f"{statistics.median(row.server):>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
