"""``qkdtls pki``: issue (``init``) and list (``show``) the certificates of a testbed."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from qkdtls import pki

DEFAULT_ZONES = ("1:1001,1002", "2:2001")
_ZONE = re.compile(r"^\s*(-?\d+)\s*(?::(.*))?$")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("pki", help="certificates for a testbed (one CA per KME zone)")
    sub = parser.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    init = sub.add_parser(
        "init",
        help="issue CA, KME, inter-KME, SAE, application and admin certificates",
        description="Issue every certificate a testbed needs into DIR and print the SAE serials and "
        "fingerprints to put into the KME configurations.",
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


def cmd_init(args: argparse.Namespace) -> int:
    from qkdtls.cli.main import UserError

    root: Path = args.dir
    if (root / pki.LAYOUT_FILE).exists() and not args.force:
        raise UserError(f"{root} already holds a PKI layout; use --force to replace it")
    if args.days < 1:
        raise UserError("--days must be at least 1")
    specs = [parse_zone(z) for z in (args.zone or DEFAULT_ZONES)]
    specs = [pki.ZoneSpec(s.kme_id, s.saes, args.hostname) for s in specs]
    try:
        layout = pki.build_testbed_pki(root, specs, key_type=args.key_type, days=args.days)
    except (pki.PkiError, OSError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {layout.root} ({args.key_type}, valid {args.days} days; keys are mode 0600)")
    print_layout(layout)
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
