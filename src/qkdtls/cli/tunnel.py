"""``qkdtls tunnel``: put any TCP protocol on TLS-QKD, like stunnel (docs/tunnel.md).

With ``--config FILE`` it runs every service of a TOML file; with ``--client``/``--server`` it runs one
service described by flags (the quick mode). ``--check`` validates and exits. SIGHUP reloads the file,
SIGTERM lets running connections finish within the grace period.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

from qkdtls.cli.main import UserError
from qkdtls.net.admission import DEFAULT_MAX_LOOKUPS, DEFAULT_USED_KEY_MEMORY

QUICK_SERVICE = "tunnel"
# Quick mode: configuration field → the flag that sets it, so errors name what the user typed.
_FLAGS = {
    "kme.url": "--kme", "kme.cert": "--kme-cert", "kme.key": "--kme-key", "kme.ca": "--kme-ca",
    "kme.kme_id": "--kme-id", "kme.timeout": "--kme-timeout", "target_sae_id": "--target-sae",
    "allowed_peer_sae_ids": "--allow-peer-sae", "profiles": "--profile", "alpn": "--alpn",
    "tunnel.grace_period": "--grace-period", "tunnel.metrics": "--metrics",
}  # fmt: skip


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tunnel",
        help="stunnel-like TLS-QKD tunnel for any TCP protocol",
        description="Put any TCP protocol on TLS-QKD without changing the programs. A client-mode service "
        "accepts plaintext TCP and opens TLS-QKD to a remote tunnel (or TLS-QKD server); a server-mode "
        "service accepts TLS-QKD and forwards the plaintext to a local target. Run the services of a TOML "
        "file (--config; SIGHUP reloads it) or one service from flags (--client/--server). SIGTERM stops "
        "accepting and lets running connections finish within the grace period. One log line per "
        "connection; Prometheus metrics with --metrics or [tunnel] metrics. See docs/tunnel.md.",
    )
    parser.add_argument("--config", type=Path, metavar="TOML", help="run the services of this file")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument(
        "--ready-file", type=Path, metavar="JSON", help="once listening, write the bound ports here"
    )
    parser.add_argument(
        "--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
        help="asyncio implementation (auto: uvloop when installed)",
    )  # fmt: skip
    parser.add_argument(
        "--quiet", action="store_true", help="no line per connection (warnings and errors only)"
    )
    quick = parser.add_argument_group("quick mode", "one service from flags instead of --config")
    side = quick.add_mutually_exclusive_group()
    side.add_argument("--client", dest="mode", action="store_const", const="client",
                      help="accept plaintext, connect with TLS-QKD")  # fmt: skip
    side.add_argument("--server", dest="mode", action="store_const", const="server",
                      help="accept TLS-QKD, connect in plaintext")  # fmt: skip
    quick.add_argument("--accept", metavar="HOST:PORT", help="where to listen (port 0: any free port)")
    quick.add_argument("--connect", metavar="HOST:PORT", help="where to connect")
    quick.add_argument(
        "--qkd", choices=("required", "preferred", "off"), default="required",
        help="required (default): TLS-QKD or no connection; preferred: else TLS 1.3 with certificates; off",
    )  # fmt: skip
    quick.add_argument("--profile", dest="profiles", action="append", choices=("secure", "reference"),
                       help="TLS-QKD profile, repeatable (default: secure)")  # fmt: skip
    quick.add_argument("--alpn", action="append", metavar="PROTO", help="ALPN protocol, repeatable")
    quick.add_argument("--cert", type=Path, metavar="PEM", help="certificate (server: for classic clients)")
    quick.add_argument("--key", type=Path, metavar="PEM", help="its private key")
    quick.add_argument(
        "--cafile", type=Path, metavar="PEM",
        help="client: CAs for the server certificate; server: require client certificates",
    )  # fmt: skip
    quick.add_argument("--kme", metavar="URL", help="this SAE's KME (SAE interface), https://...")
    quick.add_argument("--kme-cert", type=Path, metavar="PEM", help="SAE client certificate for the KME")
    quick.add_argument("--kme-key", type=Path, metavar="PEM", help="its private key")
    quick.add_argument("--kme-ca", type=Path, metavar="PEM", help="CA of the KME's server certificate")
    quick.add_argument("--kme-id", type=int, metavar="ID", help="refuse a KME that reports another ID")
    quick.add_argument("--kme-timeout", type=float, metavar="S", help="bound for each KME request")
    quick.add_argument("--target-sae", type=int, metavar="ID", help="client: the remote SAE ID")
    quick.add_argument("--sae-directory", type=Path, metavar="TOML", help="client: host[:port] = SAE ID")
    quick.add_argument("--sni", metavar="NAME", help="client: server name (SNI, certificate check)")
    quick.add_argument("--no-verify", action="store_true", help="client: no certificate check (testing)")
    quick.add_argument("--prefetch", type=int, metavar="N", help="client: keys kept ready")
    quick.add_argument("--announce-keys", type=int, metavar="N", help="client: keys announced ahead (0..16)")
    quick.add_argument("--rekey-after-bytes", type=int, metavar="N", help="client: QKD rekey every N bytes")
    quick.add_argument("--rekey-after-seconds", type=float, metavar="S", help="client: ... or every S s")
    quick.add_argument("--allow-peer-sae", type=int, action="append", metavar="ID",
                       help="server: accept TLS-QKD only from this SAE (repeatable)")  # fmt: skip
    quick.add_argument("--accept-key-announcements", action="store_true",
                       help="server: collect announced keys ahead (one process per SAE ID)")  # fmt: skip
    quick.add_argument("--max-kme-lookups", type=int, metavar="N",
                       help=f"server: KME requests at once (default {DEFAULT_MAX_LOOKUPS})")  # fmt: skip
    quick.add_argument(
        "--max-kme-lookups-per-source", type=int, metavar="N",
        help=f"server: ... per client address (default {DEFAULT_MAX_LOOKUPS}; a remote tunnel is one)",
    )  # fmt: skip
    quick.add_argument(
        "--used-key-memory", type=float, metavar="S",
        help=f"server: seconds used key IDs are remembered (default {DEFAULT_USED_KEY_MEMORY:g})",
    )  # fmt: skip
    quick.add_argument("--allow-keys-without-holders", action="store_true",
                       help="accept keys whose KME reports no holders")  # fmt: skip
    quick.add_argument("--max-connections", type=int, metavar="N", help="connections at once (1024)")
    quick.add_argument(
        "--max-handshakes", type=int, metavar="N",
        help="server: handshakes in progress at once; past it the oldest is closed (256)",
    )  # fmt: skip
    quick.add_argument("--idle-timeout", type=float, metavar="S", help="close after S s without data (300)")
    quick.add_argument("--handshake-timeout", type=float, metavar="S", help="TLS set-up bound (10)")
    quick.add_argument("--connect-timeout", type=float, metavar="S", help="server: target connect bound (10)")
    quick.add_argument("--grace-period", type=float, metavar="S", help="SIGTERM: time to finish (30)")
    quick.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    parser.set_defaults(func=run_tunnel)


def _quick_document(args: argparse.Namespace) -> dict[str, Any]:
    service: dict[str, Any] = {"mode": args.mode, "qkd": args.qkd}
    simple = (
        "accept", "connect", "alpn", "cert", "key", "cafile", "sae_directory", "sni", "prefetch",
        "announce_keys", "rekey_after_bytes", "rekey_after_seconds", "max_kme_lookups",
        "max_kme_lookups_per_source", "used_key_memory", "max_connections", "max_handshakes", "idle_timeout",
        "handshake_timeout", "connect_timeout", "profiles",
    )  # fmt: skip
    for name in simple:
        value = getattr(args, name)
        if value is not None:
            service[name] = str(value) if isinstance(value, Path) else value
    if args.target_sae is not None:
        service["target_sae_id"] = args.target_sae
    if args.allow_peer_sae:
        service["allowed_peer_sae_ids"] = args.allow_peer_sae
    if args.no_verify:
        service["verify"] = False
    if args.accept_key_announcements:
        service["accept_key_announcements"] = True
    if args.allow_keys_without_holders:
        service["allow_keys_without_holders"] = True
    if args.kme is not None:
        kme: dict[str, Any] = {"url": args.kme}
        for field, value in (("cert", args.kme_cert), ("key", args.kme_key), ("ca", args.kme_ca)):
            if value is not None:
                kme[field] = str(value)
        if args.kme_id is not None:
            kme["kme_id"] = args.kme_id
        if args.kme_timeout is not None:
            kme["timeout"] = args.kme_timeout
        service["kme"] = kme
    doc: dict[str, Any] = {"services": {QUICK_SERVICE: service}}
    tunnel: dict[str, Any] = {}
    if args.grace_period is not None:
        tunnel["grace_period"] = args.grace_period
    if args.metrics is not None:
        tunnel["metrics"] = args.metrics
    if tunnel:
        doc["tunnel"] = tunnel
    return doc


def _flag_message(message: str) -> str:
    """'command line: services.tunnel.kme.url: missing' → '--kme: missing'."""
    match = re.match(r"command line: (?:services\.tunnel\.)?([\w.\[\]]+): (.*)", message, re.S)
    if not match:
        return message
    field, problem = match.groups()
    base = re.sub(r"\[\d+\]$", "", field)
    flag = _FLAGS.get(base, "--" + base.replace("_", "-"))
    return f"{flag}: {problem}"


def load(args: argparse.Namespace) -> Any:
    from qkdtls.tunnel.config import ConfigError, load_config, parse_config

    if args.config is not None:
        if args.mode is not None:
            raise UserError("--config and --client/--server exclude each other")
        try:
            return load_config(args.config)
        except ConfigError as exc:
            raise UserError(str(exc)) from None
    if args.mode is None:
        raise UserError("give --config FILE, or --client/--server with --accept and --connect (quick mode)")
    try:
        return parse_config(_quick_document(args), origin="command line")
    except ConfigError as exc:
        raise UserError(_flag_message(str(exc))) from None


def run_tunnel(args: argparse.Namespace) -> int:
    from qkdtls.tunnel.config import ConfigError, load_config
    from qkdtls.tunnel.runner import run

    config = load(args)
    if args.check:
        names = ", ".join(f"{s.name} ({s.mode})" for s in config.services)
        print(f"configuration OK: {names}", file=sys.stderr)
        return 0
    if not args.quiet and not args.verbose:
        logging.getLogger("qkdtls.tunnel").setLevel(logging.INFO)  # one line per connection
    loader = None
    if args.config is not None:
        path = args.config

        def loader() -> Any:
            return load_config(path)

    try:
        run(config, loader=loader, ready_file=args.ready_file, event_loop=args.event_loop)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot start: {exc}") from None
    except ValueError as exc:  # a context the settings cannot make (unreadable certificate, ...)
        raise UserError(str(exc)) from None
    return 0
