"""``qkdtls kme``: run a KME (``serve``) and talk to one as an SAE or administrator (operator commands)."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from qkdtls.cli.main import UserError, add_global_options, run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "kme",
        help="ETSI GS QKD 014 Key Management Entity",
        description="Run a KME or call one over mutual TLS.",
    )
    _add_actions(parser)


def _add_actions(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kme_command", metavar="ACTION", required=True)

    serve = sub.add_parser("serve", help="run a KME from a TOML configuration file")
    serve.add_argument(
        "--config", required=True, type=Path, help="configuration file (see docs/kme.example.toml)"
    )
    serve.add_argument("--ready-file", type=Path, help="write the bound ports as JSON here once listening")
    serve.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="asyncio implementation: auto = uvloop when installed (faster TLS and HTTP), else asyncio",
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file and exit",
        description="Validate a KME configuration; errors name the file and the bad field.",
    )
    check.add_argument("file", nargs="?", type=Path, metavar="FILE", help="configuration file")
    check.add_argument("--config", type=Path, help="configuration file (same as FILE)")
    check.set_defaults(func=_check_config)

    status = sub.add_parser("status", help="ETSI 'Get status' for a slave SAE")
    _client_args(status)
    status.add_argument("slave", help="slave SAE ID")
    status.set_defaults(func=_status)

    get = sub.add_parser("get-keys", help="ETSI 'Get key' (enc_keys) as master SAE; prints the keys")
    _client_args(get)
    get.add_argument("slave", help="slave SAE ID")
    get.add_argument("-n", "--number", type=int, default=None, help="number of keys")
    get.add_argument("--size", type=int, default=None, help="key size in bits")
    get.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="SAE_ID",
        help="additional slave SAE (multicast); repeatable",
    )
    get.add_argument("--hex", action="store_true", help="print keys in hex instead of base64")
    get.set_defaults(func=_get_keys)

    by_id = sub.add_parser("get-keys-by-id", help="ETSI 'Get key with key IDs' (dec_keys) as slave SAE")
    _client_args(by_id)
    by_id.add_argument("master", help="master SAE ID")
    by_id.add_argument("key_ids", nargs="+", metavar="KEY_ID")
    by_id.add_argument("--hex", action="store_true", help="print keys in hex instead of base64")
    by_id.set_defaults(func=_get_keys_by_id)

    links = sub.add_parser("links", help="per-link key stock and entropy (administrator certificate)")
    _client_args(links)
    links.set_defaults(func=_links)


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kme", required=True, help="KME base URL, e.g. https://127.0.0.1:8443")
    parser.add_argument("--cert", required=True, type=Path, help="client certificate (PEM)")
    parser.add_argument("--key", required=True, type=Path, help="client private key (PEM)")
    parser.add_argument(
        "--ca", required=True, type=Path, help="CA certificate that signed the KME's certificate"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")


def _load(path: Path) -> Any:
    from qkdtls.kme.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    from qkdtls.kme.server import run

    config = _load(args.config)
    from qkdtls.kme.store import StoreError

    try:
        run(config, ready_file=args.ready_file, event_loop=args.event_loop)
    except (OSError, StoreError, ValueError) as exc:
        # Port in use, unreadable certificate or key, database unreachable: the operator's to fix.
        raise UserError(f"cannot start the KME: {exc}") from None
    return 0


def _check_config(args: argparse.Namespace) -> int:
    if args.file is not None and args.config is not None and args.file != args.config:
        raise UserError("check-config: give the file once (FILE or --config FILE)")
    path = args.file if args.file is not None else args.config
    if path is None:
        raise UserError("check-config: which file? qkdtls kme check-config FILE")
    config = _load(path)
    print(
        f"{path}: KME {config.kme_id} ({config.nickname}), {len(config.peers)} peer(s), "
        f"{len(config.saes)} SAE(s): OK"
    )
    return 0


def _print(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _keys_doc(container: Any, as_hex: bool) -> dict[str, Any]:
    keys = []
    for key in container.keys:
        value = key.key.hex() if as_hex else base64.b64encode(key.key).decode("ascii")
        keys.append({"key_ID": key.key_ID, "key": value})
    return {"keys": keys}


def _run(args: argparse.Namespace, call: Any) -> Any:
    from qkdtls.etsi014.client import KmeClient, KmeClientError, KmeClientSettings

    settings = KmeClientSettings(
        url=args.kme, certfile=args.cert, keyfile=args.key, cafile=args.ca, timeout=args.timeout, pool_size=1
    )
    try:
        with KmeClient(settings) as client:
            return call(client)
    except KmeClientError as exc:
        raise UserError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot use the KME: {exc}") from None


def _status(args: argparse.Namespace) -> int:
    status = _run(args, lambda c: c.status(args.slave))
    _print(status.to_json())
    return 0


def _get_keys(args: argparse.Namespace) -> int:
    container = _run(
        args,
        lambda c: c.enc_keys(
            args.slave, number=args.number, size=args.size, additional_slave_sae_ids=args.also
        ),
    )
    _print(_keys_doc(container, args.hex))
    return 0


def _get_keys_by_id(args: argparse.Namespace) -> int:
    container = _run(args, lambda c: c.dec_keys(args.master, args.key_ids))
    _print(_keys_doc(container, args.hex))
    return 0


def _links(args: argparse.Namespace) -> int:
    _print({"links": _run(args, lambda c: c.admin_links())})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m qkdtls.cli.kme ACTION``: the ``kme`` commands alone, without the other command groups.

    The testbed starts KMEs this way so a KME never depends on unrelated CLI modules.
    """
    parser = argparse.ArgumentParser(prog="qkdtls kme", description="Run a KME or call one over mutual TLS.")
    add_global_options(parser)
    _add_actions(parser)
    return run(parser.parse_args(argv))

if __name__ == "__main__":
    sys.exit(main())
