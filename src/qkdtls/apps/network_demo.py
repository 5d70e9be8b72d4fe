"""``qkdtls demo --network``: TLS-QKD between two sites several QKD links apart, and the relay paths that
carried their keys.

Builds a network from a topology (default: the chain of four, A-B-C-D), runs it as ``qkdtls network up``
does (KMEs, simulated links, the map proxy), waits until the first site's KME has a route to the farthest
site, then SAE <first> runs TLS-QKD handshakes and an HTTPS GET with an HTTPS server of the farthest site's
SAE. Every key is relayed hop by hop (``trusted``) or spread over node-disjoint paths (``spread``); the
paths come from the first KME's relay statistics (``GET /api/v1/admin/network``), as do the link bytes
every relay spent. ``--keep`` leaves everything running and prints how to use it (and the map).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdtls.apps.demo import Handshake, SaeEndpoint, handshakes, sae_endpoint, wait_for_interrupt
from qkdtls.apps.https import HttpsServer, https_get
from qkdtls.net.errors import QKDError
from qkdtls.network.build import build_network
from qkdtls.network.runner import NetworkRunner
from qkdtls.network.topology import Topology, load_topology, topology_path
from qkdtls.testbed import free_port

Progress = Callable[[str], None]
ROUTE_TIMEOUT = 30.0  # link-state adverts converge within a few hello intervals; bounded on a loaded machine
MODES = ("trusted", "spread")


class NetworkDemoError(RuntimeError):
    """The demo cannot run as asked (no pair of sites far enough apart, no route)."""


@dataclass
class NetworkDemoReport:
    network: str = ""
    master: tuple[int, int, str] = (0, 0, "")  # SAE, KME, site name
    slave: tuple[int, int, str] = (0, 0, "")
    hops: int = 0
    mode: str = "trusted"
    handshakes: list[Handshake] = field(default_factory=list)
    https: dict[str, Any] = field(default_factory=dict)
    relays: list[dict[str, Any]] = field(default_factory=list)  # last_paths of the master's KME, oldest first
    consumed: dict[str, int] = field(default_factory=dict)  # "a-b" -> bytes of link material spent by relays
    map_url: str = ""


def endpoints(topology: Topology) -> tuple[int, int, int]:
    """(master KME, slave KME, links between them): the first site with SAEs and the site farthest from it
    (the first at exactly three links when there is one)."""
    with_saes = [s.kme_id for s in topology.sites if s.saes]
    if len(with_saes) < 2:
        raise NetworkDemoError("the demo needs two sites with SAEs")
    master = with_saes[0]
    hops = {k: n for k, n in topology.hops(master).items() if k in with_saes and k != master}
    if not hops:
        raise NetworkDemoError(f"no site with SAEs can be reached from KME {master}")
    slave = next((k for k in with_saes if hops.get(k) == 3), max(hops, key=lambda k: (hops[k], -k)))
    return master, slave, hops[slave]


def prepare(topology: Topology, mode: str, paths: int) -> Topology:
    """The topology on free loopback ports, with the relay mode of the demo for every KME."""
    if mode not in MODES:
        raise NetworkDemoError(f"mode must be one of {', '.join(MODES)}")
    relay: dict[str, Any] = {"mode": mode} if mode == "trusted" else {"mode": mode, "paths": paths}
    sites = tuple(
        dataclasses.replace(s, sae_port=free_port(), inter_kme_port=free_port()) for s in topology.sites
    )
    return dataclasses.replace(topology, sites=sites, kme={**topology.kme, "relay": relay})


def wait_for_routes(runner: NetworkRunner, master: int, slave_sae: int) -> float:
    """Seconds until the master's KME sees the whole network: every site up, every link up both ways, and
    where the slave SAE is (what a spread over disjoint paths needs, not only one route)."""
    sites = {s.kme_id for s in runner.layout.sites}
    links = {(min(k.a, k.b), max(k.a, k.b)) for k in runner.layout.links}
    started = time.monotonic()
    while True:
        with contextlib.suppress(OSError, ValueError):
            routing = runner.admin_document(master).get("routing") or {}
            nodes = {n.get("kme_id"): n for n in routing.get("nodes", [])}
            up = {(k.get("a"), k.get("b")) for k in routing.get("links", []) if k.get("up")}
            if (
                all(nodes.get(k, {}).get("up") for k in sites)
                and links <= up
                and any(slave_sae in n.get("saes", []) for n in nodes.values())
            ):
                return time.monotonic() - started
        if time.monotonic() - started > ROUTE_TIMEOUT:
            raise NetworkDemoError(
                f"KME {master} does not see the whole network (every site and link up, SAE {slave_sae}) "
                f"after {ROUTE_TIMEOUT:.0f} s; see the KME logs in {runner.layout.logs}"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def running_network(
    root: Path, topology: Topology, progress: Progress, *, rate: int | None = None
) -> Iterator[NetworkRunner]:
    layout = build_network(topology, root, progress=progress)
    runner = NetworkRunner(layout, rate=rate, verbosity=1, say=progress)
    runner.start()
    try:
        yield runner
    finally:
        progress("stopping the network")
        runner.stop()


def run_network_demo(
    root: Path,
    topology: Topology,
    progress: Progress,
    *,
    mode: str = "trusted",
    paths: int = 2,
    count: int = 3,
    keep: bool = False,
) -> NetworkDemoReport:
    master_kme, slave_kme, hops = endpoints(topology)
    master_site, slave_site = topology.site(master_kme), topology.site(slave_kme)
    master_sae, slave_sae = master_site.saes[0], slave_site.saes[0]
    report = NetworkDemoReport(
        network=topology.name,
        master=(master_sae, master_kme, master_site.name),
        slave=(slave_sae, slave_kme, slave_site.name),
        hops=hops,
        mode=mode,
    )
    topology = prepare(topology, mode, paths)
    progress(
        f"network {topology.name!r}: {len(topology.sites)} sites, {len(topology.links)} links, relay mode "
        f"{mode}; SAE {master_sae} (site {master_site.name}) and SAE {slave_sae} (site {slave_site.name}) "
        f"are {hops} links apart"
    )
    with running_network(root, topology, progress) as runner:
        assert runner.proxy is not None
        report.map_url = runner.proxy.map_url
        seconds = wait_for_routes(runner, master_kme, slave_sae)
        progress(f"KME {master_kme} sees every site and link ({seconds:.1f} s after start-up)")
        a: SaeEndpoint = sae_endpoint(runner.testbed, master_sae)
        b: SaeEndpoint = sae_endpoint(runner.testbed, slave_sae)
        try:
            with HttpsServer(b.server) as server:
                progress(f"site {slave_site.name}: SAE {slave_sae} serves HTTPS over TLS-QKD at {server.url}")
                progress(f"site {master_site.name}: SAE {master_sae} runs {count} TLS-QKD handshakes with it")
                try:
                    report.handshakes = handshakes(a.client, server, slave_sae, count)
                    response = https_get(server.url + "status", a.client, slave_sae)
                except (QKDError, OSError) as exc:  # HttpsError is an OSError
                    raise NetworkDemoError(
                        f"TLS-QKD from SAE {master_sae} to SAE {slave_sae} failed: {exc}"
                    ) from None
                report.https = {"status": response.status, **response.json(), "ms": response.elapsed * 1000}
                # Fetched now from the KMEs themselves (the map proxy may answer from its short cache).
                relay = runner.admin_document(master_kme).get("relay") or {}
                report.relays = list(relay.get("last_paths") or [])
                for kme in sorted(runner.testbed.kmes):
                    for entry in (runner.admin_document(kme).get("relay") or {}).get("consumed_bytes") or []:
                        link = "-".join(map(str, sorted(entry["link"])))
                        report.consumed[link] = report.consumed.get(link, 0) + int(entry["bytes"])
                if keep:
                    progress(format_network_report(report))
                    progress(runner.summary())
                    progress(f"HTTPS over TLS-QKD (SAE {slave_sae}): {server.url}")
                    wait_for_interrupt()
        finally:
            a.close()
            b.close()
    return report


def format_network_report(report: NetworkDemoReport) -> str:
    m_sae, m_kme, m_site = report.master
    s_sae, s_kme, s_site = report.slave
    lines = [
        "",
        f"=== qkdtls demo --network ({report.network}): summary ===",
        f"SAE {m_sae} at site {m_site} (KME {m_kme}) -> SAE {s_sae} at site {s_site} (KME {s_kme}): "
        f"{report.hops} QKD links apart, relay mode {report.mode}",
    ]
    for i, h in enumerate(report.handshakes, 1):
        lines.append(
            f"  TLS-QKD handshake #{i}: mode {h.mode}, profile {h.profile}, key {h.key_id}, {h.ms:.1f} ms"
        )
    if report.https:
        h = report.https
        lines.append(
            f"  HTTPS GET /status: {h['status']} in {h['ms']:.1f} ms; the server saw mode {h['mode']}, "
            f"key {h['key_ID']}, peer SAE {h['peer_SAE_ID']}"
        )
    lines.append(f"paths used by KME {m_kme}'s relays (its relay statistics, oldest first):")
    if not report.relays:
        lines.append("  none recorded")
    for r in report.relays:
        at = time.strftime("%H:%M:%S", time.localtime(r.get("at", 0)))
        paths = " | ".join(" -> ".join(map(str, p)) for p in r.get("paths", []))
        outcome = "delivered" if r.get("ok", True) else "FAILED"
        lines.append(f"  {at} {r.get('mode', '?'):<7} {r.get('keys', '?')} key(s) over {paths}  ({outcome})")
    if report.consumed:
        spent = ", ".join(f"{link}: {n} B" for link, n in sorted(report.consumed.items()))
        lines.append(f"link material spent by relays (keys, pads, MAC keys): {spent}")
    return "\n".join(lines)


def network_demo(
    directory: Path | None,
    *,
    topology: str | Path = "chain-4",
    mode: str = "trusted",
    paths: int = 2,
    count: int = 3,
    keep: bool = False,
    progress: Progress = print,
) -> NetworkDemoReport:
    """Runs the network demo in ``directory`` (default: a temporary folder, removed afterwards)."""
    parsed = load_topology(topology_path(topology))
    temporary = directory is None
    root = Path(tempfile.mkdtemp(prefix="qkdtls-network-demo-")) if directory is None else directory
    started = time.monotonic()
    try:
        report = run_network_demo(
            root / "net" if temporary else root,
            parsed,
            progress,
            mode=mode,
            paths=paths,
            count=count,
            keep=keep,
        )
        if not keep:
            progress(format_network_report(report))
        progress(f"done in {time.monotonic() - started:.1f} s; everything stopped")
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    return report
