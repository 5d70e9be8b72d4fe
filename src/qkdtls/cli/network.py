"""``qkdtls network``: a QKD network on this machine from a topology file. ``init`` writes it, ``up`` runs
it, ``map`` shows a running one in a browser, ``check`` validates a topology, ``examples`` lists the shipped
ones."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from qkdtls.cli.main import UserError
from qkdtls.cli.qkd_link import parse_size
from qkdtls.network.topology import EXAMPLES, example_path


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "network",
        help="a QKD network of many sites on this machine: init from a topology, run, map",
        description="Build a QKD network from a topology file (sites, their SAEs, QKD links and their key "
        "rates), run it, and look at it. Format of the topology: docs/network.md; examples: "
        "`qkdtls network examples`.",
    )
    sub = parser.add_subparsers(dest="network_command", metavar="ACTION", required=True)

    init = sub.add_parser(
        "init",
        help="write the PKI, every KME configuration and the key folders of a topology",
        description="Read TOPOLOGY (a TOML file, or the name of a shipped example: "
        + ", ".join(EXAMPLES)
        + ") and write into DIR (new or empty): the PKI (DIR/pki), one generated configuration per KME "
        "(DIR/kme<ID>.toml, each checked as `qkdtls kme check-config` does), the key folders with their "
        "first key material (DIR/keys), and DIR/network.json for `qkdtls network up DIR`.",
    )
    init.add_argument("topology", metavar="TOPOLOGY", help="topology file, or an example name")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--base-port", type=int, help="override [defaults] base_port of the topology")
    init.set_defaults(func=cmd_init)

    up = sub.add_parser(
        "up",
        help="run a network made by `network init`: every KME, the simulated links, the map",
        description="Start every KME of DIR (each reported as it becomes ready), the simulated QKD links "
        "at their rates (the code of `qkdtls qkd-link`) and the map on a loopback port, then print what "
        "programs need (SAE URLs, certificates, map URLs, logs). Runs until Ctrl-C or SIGTERM, which stop "
        "everything. Nothing is restarted: a KME that exits is reported with its log and stays down "
        "(exit status 1 at the end).",
    )
    up.add_argument("dir", type=Path, metavar="DIR")
    up.add_argument(
        "--rate",
        type=parse_size,
        help="key rate of every link in bytes/s (default: per link, from the topology)",
    )
    up.add_argument("--map-port", type=int, default=0, help="map port on 127.0.0.1 (default: any free)")
    up.add_argument("--seconds", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    up.set_defaults(func=cmd_up)

    show = sub.add_parser(
        "map",
        help="serve the map of a running network (or of one KME) on a loopback port",
        description="Serve the network map on 127.0.0.1 over plain HTTP, fetching the KMEs' admin JSON "
        "with the administrator certificate (browsers cannot easily present it). Either DIR (a network "
        "made by `network init`, run by `network up` or otherwise) or one KME: --kme URL --cert --key --ca.",
    )
    show.add_argument("dir", type=Path, nargs="?", metavar="DIR")
    show.add_argument("--kme", metavar="URL", help="one KME's SAE interface, e.g. https://127.0.0.1:8440")
    show.add_argument("--cert", type=Path, help="administrator certificate of that KME (PEM)")
    show.add_argument("--key", type=Path, help="its private key (PEM)")
    show.add_argument("--ca", type=Path, help="CA of the KME's server certificate")
    show.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free)")
    show.set_defaults(func=cmd_map)

    check = sub.add_parser(
        "check",
        help="validate a topology file and exit",
        description="Validate TOPOLOGY; errors name the file and the bad field. Nothing is written.",
    )
    check.add_argument("topology", metavar="TOPOLOGY", help="topology file, or an example name")
    check.set_defaults(func=cmd_check)

    examples = sub.add_parser("examples", help="list the shipped example topologies (or print one)")
    examples.add_argument("name", nargs="?", choices=sorted(EXAMPLES), help="print this example")
    examples.set_defaults(func=cmd_examples)


def _topology(text: str, *, base_port: int | None = None) -> tuple[Any, str]:
    from qkdtls.network.topology import TopologyError, load_topology, topology_path

    path = topology_path(text)
    try:
        topology = load_topology(path, base_port=base_port)
        return topology, path.read_text(encoding="utf-8")
    except TopologyError as exc:
        raise UserError(str(exc)) from None


def cmd_check(args: argparse.Namespace) -> int:
    topology, _ = _topology(args.topology)
    print(
        f"{args.topology}: network {topology.name!r}, {len(topology.sites)} sites, {len(topology.links)} "
        f"links, {sum(len(s.saes) for s in topology.sites)} SAEs: OK"
    )
    _islands(topology)
    return 0


def _islands(topology: Any) -> None:
    islands = topology.islands()
    if len(islands) > 1:
        groups = "; ".join(", ".join(map(str, g)) for g in islands)
        print(f"note: the sites form {len(islands)} groups that cannot reach each other: {groups}")


def cmd_examples(args: argparse.Namespace) -> int:
    if args.name:
        sys.stdout.write(example_path(args.name).read_text(encoding="utf-8"))
        return 0
    for name, what in EXAMPLES.items():
        print(f"{name:<10} {what}\n           {example_path(name)}")
    print("use: qkdtls network init NAME DIR  (or copy one and edit it)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from qkdtls.network.build import BuildError, build_network

    topology, text = _topology(args.topology, base_port=args.base_port)
    try:
        layout = build_network(topology, args.dir, topology_text=text, progress=print)
    except BuildError as exc:
        raise UserError(str(exc)) from None
    print(f"network {layout.name!r} written to {layout.root}:")
    for site in layout.sites:
        print(
            f"  site {site.name:<8} KME {site.kme_id}: {site.config.name}  SAE interface {site.sae_url}  "
            f"inter-KME {site.inter_kme_url}  SAEs {', '.join(map(str, site.saes)) or '-'}"
        )
    for link in layout.links:
        ends = "  ".join(str(f.relative_to(layout.root)) for f in link.folders)
        print(f"  link {link.a}-{link.b}: {link.rate} bytes/s when running; folders {ends}")
    _islands(topology)
    print(f"next: qkdtls network up {layout.root}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from qkdtls.network.layout import LayoutError, NetworkLayout
    from qkdtls.network.map_proxy import MapProxyError
    from qkdtls.network.runner import NetworkRunner, RunnerError
    from qkdtls.testbed import TestbedError

    if args.seconds is not None and args.seconds <= 0:
        raise UserError("--seconds must be positive")
    if args.rate is not None and args.rate < 1:
        raise UserError("--rate must be at least 1 byte per second")
    try:
        layout = NetworkLayout.load(args.dir)
    except LayoutError as exc:
        raise UserError(str(exc)) from None
    runner = NetworkRunner(
        layout,
        rate=args.rate,
        map_port=args.map_port,
        # KME logs: warnings and errors; `qkdtls -v network up` adds info events (requests, imports, relays).
        verbosity=args.verbose,
        say=lambda text: print(text, flush=True),
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            runner.start()
        except (TestbedError, MapProxyError, RunnerError, OSError) as exc:
            raise UserError(f"the network did not start: {exc}") from None
        print(runner.summary(), flush=True)
        timer = threading.Timer(args.seconds, stop.set) if args.seconds is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        state = runner.wait(stop)
        print("stopping: links, map, KMEs", flush=True)
    finally:
        runner.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stopped; every KME process has exited (logs in {layout.logs})", flush=True)
    return 1 if state.exited or state.failed_links else 0


def cmd_map(args: argparse.Namespace) -> int:
    from qkdtls.apps.demo import wait_for_interrupt
    from qkdtls.network.layout import LayoutError, NetworkLayout
    from qkdtls.network.map_proxy import MapProxy, MapProxyError, Upstream

    one = (args.kme, args.cert, args.key, args.ca)
    if args.dir is not None:
        if any(v is not None for v in one):
            raise UserError("give DIR or --kme/--cert/--key/--ca, not both")
        try:
            layout = NetworkLayout.load(args.dir)
            pki = layout.pki()
        except (LayoutError, ValueError) as exc:
            raise UserError(str(exc)) from None
        upstreams = [
            Upstream(s.kme_id, s.name, s.saes, s.host, s.sae_port, pki.zones[s.kme_id].admin.cert,
                     pki.zones[s.kme_id].admin.key, pki.zones[s.kme_id].ca)
            for s in layout.sites
        ]  # fmt: skip
        links, title = [(link.a, link.b) for link in layout.links], layout.name
    else:
        if any(v is None for v in one):
            raise UserError("one KME needs --kme URL --cert FILE --key FILE --ca FILE (or a network DIR)")
        import urllib.parse

        url = urllib.parse.urlsplit(args.kme)
        if url.scheme != "https" or not url.hostname:
            raise UserError(f"--kme must be https://HOST:PORT, got {args.kme!r}")
        upstreams = [
            Upstream(0, url.hostname, (), url.hostname, url.port or 443, args.cert, args.key, args.ca)
        ]
        links, title = [], f"QKD network seen from {args.kme}"
    try:
        proxy = MapProxy(upstreams, links, title=title, port=args.port).start()
    except MapProxyError as exc:
        raise UserError(str(exc)) from None
    try:
        print(
            f"map: {proxy.map_url if args.dir is not None else proxy.kme_map_url(0)}  (Ctrl-C stops)",
            flush=True,
        )
        wait_for_interrupt()
    finally:
        proxy.close()
    return 0
