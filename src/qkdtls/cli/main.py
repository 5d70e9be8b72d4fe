"""Entry point of the ``qkdtls`` command: one subcommand group per module in :data:`COMMANDS`.

Each module listed here exposes ``register(subparsers)``, which adds its parser(s) and sets
``func(args) -> int`` as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMANDS = (
    "qkdtls.cli.pki",
    "qkdtls.cli.qkd_link",
    "qkdtls.cli.kme",
    "qkdtls.cli.tls",
    "qkdtls.cli.tunnel",
    "qkdtls.cli.demo",
    "qkdtls.cli.network",
)


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdtls",
        description="Quantum key distribution for ordinary network software: an ETSI GS QKD 014 KME, "
        "TLS 1.3 keyed by QKD, and the tools to run a testbed.",
    )
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: logging set up, user errors printed without a traceback, exit status returned."""
    from qkdtls.logs import configure_logging

    configure_logging(verbosity=args.verbose, fmt=args.log_format)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"qkdtls: error: {exc}", file=sys.stderr)
        return 2


class UserError(Exception):
    """A mistake the user can fix (bad file, bad option); printed without a traceback."""


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
