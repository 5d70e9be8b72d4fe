"""``qkdtls demo``: two sites on one machine, and what TLS-QKD does between them, in a few seconds.

Builds the testbed (PKI, two KMEs on SQLite, the QKD link's key files), starts an HTTPS server for SAE 2001
at site B, then SAE 1001 at site A runs TLS-QKD handshakes (secure profile), an HTTPS GET and a short video
call in both directions. It prints a summary and shuts everything down, or with ``--keep`` leaves the
testbed and the HTTPS server running and prints how to use them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdtls.apps.https import HttpsServer, https_get, tls_connect
from qkdtls.apps.video.call import CallSettings, CallSite, Direction, run_call

SITE_A_SAE = 1001
SITE_B_SAE = 2001
Progress = Callable[[str], None]


@dataclass
class SaeEndpoint:
    """One SAE's TLS-QKD contexts: as a client (master: it fetches keys) and as a server (slave)."""

    sae_id: int
    kme_id: int
    client: Any  # QKDContext("client")
    server: Any  # QKDContext("server")

    def close(self) -> None:
        self.client.close()
        self.server.close()


@dataclass
class DemoSites:
    testbed: Any
    a: SaeEndpoint
    b: SaeEndpoint

    def close(self) -> None:
        self.a.close()
        self.b.close()


def sae_endpoint(testbed: Any, sae_id: int, *, profile: str = "secure", prefetch: int = 2) -> SaeEndpoint:
    """Contexts for ``sae_id`` on a running testbed: QKD required, kept-alive KME connections."""
    from qkdtls.etsi014.client import KmeClientSettings
    from qkdtls.net.context import QKDContext

    kme_id = testbed.kme_of(sae_id)
    cert, key, ca = testbed.sae_credentials(sae_id)
    settings = KmeClientSettings(url=testbed.sae_url(kme_id), certfile=cert, keyfile=key, cafile=ca,
                                 expected_kme_id=kme_id)
    app_cert, app_key, _ = testbed.app_server_credentials(sae_id)
    client = QKDContext("client", kme=settings, qkd="required", profiles=(profile,),
                        cafile=testbed.pki.trust_bundle, prefetch=prefetch)
    # One process serves each SAE here, so announced keys can be collected ahead of the handshakes.
    server = QKDContext("server", kme=settings, qkd="preferred", profiles=(profile,),
                        certfile=app_cert, keyfile=app_key, accept_key_announcements=True)
    return SaeEndpoint(sae_id, kme_id, client, server)


@contextlib.contextmanager
def demo_sites(root: Path, progress: Progress, *, key_bytes: int = 1 << 20) -> Iterator[DemoSites]:
    """A running testbed with the contexts of SAE 1001 (site A) and SAE 2001 (site B)."""
    from qkdtls.testbed import Testbed

    progress(f"building the testbed in {root}: PKI, KME configs, {key_bytes // 1024} KiB of QKD key per link")
    testbed = Testbed.create(root, store="sqlite", initial_key_bytes=key_bytes)
    progress("starting KME 1 (site A) and KME 2 (site B)")
    with testbed:
        sites = DemoSites(testbed, sae_endpoint(testbed, SITE_A_SAE), sae_endpoint(testbed, SITE_B_SAE))
        try:
            yield sites
        finally:
            sites.close()


@dataclass
class Handshake:
    key_id: str | None
    mode: str
    profile: str | None
    cipher: str
    ms: float


@dataclass
class DemoReport:
    sites: dict[str, str] = field(default_factory=dict)
    handshakes: list[Handshake] = field(default_factory=list)
    https: dict[str, Any] = field(default_factory=dict)
    call: list[Direction] = field(default_factory=list)
    stock: dict[str, int] = field(default_factory=dict)
    app_bytes: int = 0


def run_handshakes(sites: DemoSites, server: HttpsServer, count: int) -> list[Handshake]:
    return handshakes(sites.a.client, server, SITE_B_SAE, count)


def handshakes(client: Any, server: HttpsServer, target_sae_id: int, count: int) -> list[Handshake]:
    """``count`` TLS-QKD handshakes of the ``client`` context with ``server`` (SAE ``target_sae_id``)."""
    results = []
    for _ in range(count):
        stream: Any = tls_connect(client, server.address, server_hostname="localhost",
                                  target_sae_id=target_sae_id)
        try:
            info = stream.info
            seconds = getattr(stream, "handshake_seconds", None) or 0.0
            results.append(Handshake(info.key_id, info.mode, info.profile, info.cipher, seconds * 1000))
        finally:
            stream.close()
    return results


def key_stock(sites: DemoSites) -> dict[str, int]:
    """Keys each KME can still hand out for the demo's SAE pairs (ETSI 014 Status)."""
    stock = {}
    for master, slave in ((sites.a, sites.b), (sites.b, sites.a)):
        kme = master.client.keys.kme
        status = kme.status(slave.sae_id)
        stock[f"KME {master.kme_id} for SAE {master.sae_id} -> SAE {slave.sae_id}"] = status.stored_key_count
    return stock


def run_demo(root: Path, progress: Progress, *, handshakes: int = 3, call_seconds: float = 2.0,
             keep: bool = False) -> DemoReport:
    """The demo's steps on a fresh testbed in ``root``; with ``keep``, blocks until Ctrl-C before stopping."""
    report = DemoReport()
    with demo_sites(root, progress) as sites, HttpsServer(sites.b.server) as server:
        tb = sites.testbed
        report.sites = {
            "A": f"KME 1 at {tb.sae_url(1)}, SAE {SITE_A_SAE}",
            "B": f"KME 2 at {tb.sae_url(2)}, SAE {SITE_B_SAE} (HTTPS server {server.url})",
        }
        progress(f"site B: SAE {SITE_B_SAE} serves HTTPS over TLS-QKD at {server.url}")
        progress(f"site A: SAE {SITE_A_SAE} runs {handshakes} TLS-QKD handshakes with SAE {SITE_B_SAE}")
        report.handshakes = run_handshakes(sites, server, handshakes)
        progress(f"site A: HTTPS GET {server.url}status over TLS-QKD")
        response = https_get(server.url + "status", sites.a.client, SITE_B_SAE)
        report.https = {"status": response.status, "bytes": len(response.body), **response.json(),
                        "ms": response.elapsed * 1000}
        report.app_bytes += len(response.body)
        progress(f"video call A <-> B for {call_seconds:g} s (1280x720 test pattern + tone, both directions)")
        a = CallSite("A", SITE_A_SAE, sites.a.server, sites.a.client)
        b = CallSite("B", SITE_B_SAE, sites.b.server, sites.b.client)
        report.call = run_call(a, b, CallSettings(duration=call_seconds))
        report.app_bytes += sum(d.receiver.stats.bytes_received for d in report.call)
        report.stock = key_stock(sites)
        if keep:
            progress(format_report(report))
            progress(keep_instructions(sites, server))
            wait_for_interrupt()
            progress("stopping")
    return report


def format_report(report: DemoReport) -> str:
    lines = ["", "=== qkdtls demo: summary ==="]
    for name, text in report.sites.items():
        lines.append(f"site {name}: {text}")
    if report.handshakes:
        first = report.handshakes[0]
        lines.append(
            f"TLS-QKD handshakes SAE {SITE_A_SAE} (site A) -> SAE {SITE_B_SAE} (site B): mode {first.mode}, "
            f"profile {first.profile}, {first.cipher}"
        )
        for i, h in enumerate(report.handshakes, 1):
            note = "  (first: opens the KME connections)" if i == 1 else ""
            lines.append(f"  #{i}: key {h.key_id}  handshake {h.ms:.1f} ms{note}")
    if report.https:
        h = report.https
        lines.append(
            f"HTTPS GET /status: {h['status']}, {h['bytes']} bytes in {h['ms']:.1f} ms; the server saw mode "
            f"{h['mode']}, profile {h['profile']}, key {h['key_ID']}, peer SAE {h['peer_SAE_ID']}"
        )
    for d in report.call:
        rx = d.receiver.stats
        c = d.sender_connection
        lines.append(
            f"video {d.name}: key {c['key_ID']}, {rx.frames_decoded} frames {rx.width}x{rx.height} at "
            f"{rx.fps():.1f} fps, latency p50 {rx.latency_ms(50) or 0:.1f} ms, "
            f"{rx.audio_chunks} audio chunks, order errors {rx.order_errors}"
        )
    lines.append(f"application bytes moved over TLS-QKD: {report.app_bytes / 1e6:.2f} MB")
    for name, count in report.stock.items():
        lines.append(f"key stock left: {name}: {count} keys")
    return "\n".join(lines)


def keep_instructions(sites: DemoSites, server: HttpsServer) -> str:
    tb = sites.testbed
    cert, key, ca = tb.sae_credentials(SITE_A_SAE)
    b_cert, b_key, b_ca = tb.sae_credentials(SITE_B_SAE)
    kme_a = f"--kme {tb.sae_url(1)} --kme-cert {cert} --kme-key {key} --kme-ca {ca}"
    trust = f"--cafile {tb.pki.trust_bundle}"
    host, port = server.address
    return "\n".join([
        "",
        "=== the testbed keeps running (Ctrl-C stops it) ===",
        f"KME 1 (site A): {tb.sae_url(1)}   config {tb.config_path(1)}",
        f"KME 2 (site B): {tb.sae_url(2)}   config {tb.config_path(2)}",
        f"SAE {SITE_A_SAE} (site A): cert {cert}  key {key}  KME CA {ca}",
        f"SAE {SITE_B_SAE} (site B): cert {b_cert}  key {b_key}  KME CA {b_ca}",
        f"trust bundle (all zone CAs): {tb.pki.trust_bundle}",
        f"HTTPS over TLS-QKD (SAE {SITE_B_SAE}): {server.url}",
        "",
        "try:",
        f"  curl --cert {cert} --key {key} --cacert {ca} {tb.sae_url(1)}/api/v1/keys/{SITE_B_SAE}/status",
        f"  qkdtls https-get {server.url}status --target-sae {SITE_B_SAE} {trust} {kme_a}",
        f"  printf 'GET /status HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n' | "
        f"qkdtls s_client {host}:{port} --target-sae {SITE_B_SAE} {trust} {kme_a}",
        f"  curl --cacert {tb.pki.trust_bundle} {server.url}status   (classic TLS 1.3 to the same server)",
    ])


def wait_for_interrupt(stop: threading.Event | None = None) -> None:
    """Blocks until Ctrl-C or SIGTERM (or ``stop`` is set)."""
    stop = stop or threading.Event()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def demo(directory: Path | None, *, keep: bool = False, handshakes: int = 3, call_seconds: float = 2.0,
         progress: Progress = print) -> DemoReport:
    """Runs the demo in ``directory`` (default: a new temporary folder, removed afterwards unless kept)."""
    temporary = directory is None
    root = Path(tempfile.mkdtemp(prefix="qkdtls-demo-")) if directory is None else directory
    if not temporary and root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: choose a new or empty folder for the testbed")
    started = time.monotonic()
    try:
        report = run_demo(root, progress, handshakes=handshakes, call_seconds=call_seconds, keep=keep)
        if not keep:
            progress(format_report(report))
        progress(f"done in {time.monotonic() - started:.1f} s; everything stopped")
    finally:
        if temporary and not keep:
            shutil.rmtree(root, ignore_errors=True)
    return report
