"""``qkdtls pki``: issue the certificates of a network and write its KME configurations (``init``), list
them (``show``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from qkdtls import pki, provision
from qkdtls.pki import LOOPBACK

DEFAULT_ZONES = ("1:1001,1002", "2:2001")
_ZONE = re.compile(r"^\s*(-?\d+)\s*(?::(.*))?$")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("pki", help="certificates for a testbed (one CA per KME zone)")
    sub = parser.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    init = sub.add_parser(
        "init",
        help="issue the certificates and write a working KME configuration per zone",
        description="Issue every certificate a network of KMEs needs into DIR/pki and write, for every "
        "zone, DIR/kme<ID>.toml (listeners, store, peers with their URLs and certificate identities, SAEs, "
        "admin) and its key folders DIR/keys/kme<ID>/link-<PEER> and DIR/keys/kme<ID>/local. Then: "
        "`qkdtls kme serve --config DIR/kme1.toml` per zone, and `qkdtls qkd-link` (or a QKD stack) "
        "writing into the two folders of each link.",
    )
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument(
        "--zone",
        action="append",
        metavar="KME_ID:SAE_ID[=SERIAL],...",
        help="a KME and its SAEs; SERIAL is decimal or 0x-hex, random if omitted (repeatable; default: "
        + " and ".join(DEFAULT_ZONES)
        + ")",
    )
    init.add_argument("--key-type", choices=pki.KEY_TYPES, default="ec-p256", help="key algorithm")
    init.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    init.add_argument("--hostname", default="localhost", help="SAN of the server certificates (+127.0.0.1)")
    init.add_argument(
        "--link",
        action="append",
        metavar="KME_ID-KME_ID",
        help="a QKD link between two zones (repeatable; default: every pair of zones)",
    )
    init.add_argument(
        "--host",
        default=LOOPBACK,
        help="address the KMEs listen on and call each other at (default 127.0.0.1)",
    )
    init.add_argument(
        "--base-port",
        type=int,
        default=8440,
        help="the n-th zone listens on BASE+2n (SAE interface) and BASE+2n+1 (inter-KME) (default 8440)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing layout in DIR")
    init.set_defaults(func=cmd_init)

    show = sub.add_parser("show", help="list the certificates of a layout with serials and fingerprints")
    show.add_argument("dir", type=Path, metavar="DIR")
    show.set_defaults(func=cmd_show)


def parse_zone(text: str) -> pki.ZoneSpec:
    """``"1:1001=0x2a,1002"`` -> ZoneSpec(1, {1001: 42, 1002: <random>})."""
    from qkdtls.cli.main import UserError

    match = _ZONE.match(text)
    if not match:
        raise UserError(f"--zone {text!r}: expected KME_ID:SAE_ID[=SERIAL],...")
    saes: dict[int, int] = {}
    for item in filter(None, (part.strip() for part in (match.group(2) or "").split(","))):
        sae_text, _, serial_text = item.partition("=")
        try:
            sae = int(sae_text)
            serial = int(serial_text, 0) if serial_text else pki.x509.random_serial_number()
            pki.check_serial(serial)
        except (ValueError, pki.PkiError) as exc:
            raise UserError(f"--zone {text!r}: bad SAE entry {item!r} ({exc})") from None
        if sae in saes:
            raise UserError(f"--zone {text!r}: SAE {sae} listed twice")
        saes[sae] = serial
    return pki.ZoneSpec(kme_id=int(match.group(1)), saes=saes)


def parse_link(text: str) -> tuple[int, int]:
    from qkdtls.cli.main import UserError

    a, sep, b = text.partition("-")
    try:
        if not sep:
            raise ValueError
        return int(a), int(b)
    except ValueError:
        raise UserError(f"--link {text!r}: expected KME_ID-KME_ID, e.g. 1-2") from None


def cmd_init(args: argparse.Namespace) -> int:
    from qkdtls.cli.main import UserError

    root: Path = args.dir
    if (root / "pki" / pki.LAYOUT_FILE).exists() and not args.force:
        raise UserError(f"{root} already holds a PKI layout; use --force to replace it")
    if args.days < 1:
        raise UserError("--days must be at least 1")
    specs = [parse_zone(z) for z in (args.zone or DEFAULT_ZONES)]
    ids = [s.kme_id for s in specs]
    if args.link:
        links = [parse_link(text) for text in args.link]
    else:
        links = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :]]
    if not 1 <= args.base_port <= 65535 - 2 * len(specs):
        raise UserError(f"--base-port: {args.base_port} leaves no room for {len(specs)} zones")
    sites = [
        provision.Site(
            kme_id=s.kme_id,
            saes=s.saes,
            host=args.host,
            sae_port=args.base_port + 2 * i,
            inter_kme_port=args.base_port + 2 * i + 1,
        )
        for i, s in enumerate(specs)
    ]
    try:
        net = provision.provision(
            root, sites, links, key_type=args.key_type, days=args.days, hostname=args.hostname
        )
    except (pki.PkiError, provision.ProvisionError, OSError) as exc:
        raise UserError(str(exc)) from None
    layout = net.pki
    print(f"wrote {layout.root} ({args.key_type}, valid {args.days} days; keys are mode 0600)")
    print_layout(layout)
    print()
    print("KME configurations (generated; check with `qkdtls kme check-config FILE`):")
    for kme_id, path in net.configs.items():
        print(f"  {path}   SAE interface {net.sae_url(kme_id)}, inter-KME {net.inter_kme_url(kme_id)}")
    print("Key folders (a QKD stack, or `qkdtls qkd-link DIR_A DIR_B`, writes identical files into both):")
    for (a, b), ends in net.folders.items():
        label = f"link {a}-{b}" if a != b else f"KME {a} local"
        print(f"  {label:<14} " + "  ".join(str(f) for f in ends))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from qkdtls.cli.main import UserError

    try:
        layout = pki.PkiLayout.load(args.dir)
    except pki.PkiError as exc:
        raise UserError(str(exc)) from None
    print(f"{layout.root}")
    print_layout(layout)
    return 0


def print_layout(layout: pki.PkiLayout) -> None:
    print(f"  {pki.LAYOUT_FILE:<28} what is where (read by the testbed)")
    print(f"  {layout.trust_bundle.name:<28} all zone CAs")
    for zone in layout.zones.values():
        print(f"  {zone.ca.parent.name}/")
        peers = zone.inter_kme_clients.items()
        rows = [
            (zone.ca.name, "zone CA (trusted by this KME for SAEs/admin, by peers for inter-KME)"),
            (zone.kme_server.cert.name, f"KME {zone.kme_id} SAE interface server"),
            (zone.inter_kme_server.cert.name, f"KME {zone.kme_id} inter-KME interface server"),
            *((c.cert.name, f"client of KME {zone.kme_id} towards KME {p}") for p, c in peers),
            *((c.cert.name, f"SAE {s} client") for s, c in zone.saes.items()),
            *((c.cert.name, f"SAE {s} application server") for s, c in zone.app_servers.items()),
            (zone.admin.cert.name, "administrator client"),
        ]
        for name, what in rows:
            print(f"    {name:<26} {what}")
    print()
    print("Identities to put into each KME configuration (serial in hex; SHA-256 of the DER certificate):")
    for zone in layout.zones.values():
        print(f"  KME {zone.kme_id}:")
        for sae, issued in zone.saes.items():
            _identity(f"SAE {sae}", issued)
        for other in layout.zones.values():
            if zone.kme_id in other.inter_kme_clients:
                _identity(f"peer KME {other.kme_id}", other.inter_kme_clients[zone.kme_id])
        _identity("admin", zone.admin)


def _identity(label: str, issued: pki.Issued) -> None:
    print(f'    {label:<16} serial = "{issued.serial_hex}"  fingerprint = "{issued.fingerprint_sha256}"')
