"""``qkdtls qkd-link DIR_A DIR_B``: feed two KMEs' key folders with identical key material."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qkdtls import link_sim

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    """``"4096"``, ``"64K"``, ``"1.5MiB"`` -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64K, 1M)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "qkd-link",
        help="simulate a QKD link: identical key files into two KME key folders",
        description="Write identical random key material into DIR_A and DIR_B (the key folders of the "
        "two KMEs a link joins), as NNNNNNNNN.key files created atomically. Either once (--bytes) or "
        "continuously (--rate, until --duration, --bytes or Ctrl-C).",
    )
    parser.add_argument("dir_a", type=Path, metavar="DIR_A")
    parser.add_argument("dir_b", type=Path, metavar="DIR_B")
    parser.add_argument("--bytes", type=parse_size, dest="total", help="bytes to write (e.g. 64K, 1M)")
    parser.add_argument("--rate", type=parse_size, help="write continuously at this many bytes per second")
    parser.add_argument("--duration", type=float, help="with --rate: stop after this many seconds")
    parser.add_argument("--file-size", type=parse_size, help="bytes per file (default: 64K, or rate/4)")
    faults = parser.add_mutually_exclusive_group()
    faults.add_argument(
        "--qber",
        type=float,
        default=0.0,
        help="simulate failed privacy amplification: bits biased towards 0 by this much (0..0.5)",
    )
    faults.add_argument(
        "--fail",
        action="store_const",
        const=link_sim.FAIL_QBER,
        dest="qber",
        help=f"write low-entropy material (as --qber {link_sim.FAIL_QBER}) to trip the KME's entropy alarm",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    parser.set_defaults(func=cmd_qkd_link)


def cmd_qkd_link(args: argparse.Namespace) -> int:
    from qkdtls.cli.main import UserError

    if args.total is None and args.rate is None:
        raise UserError("say how much to write: --bytes N (once) or --rate BYTES_PER_S (continuously)")
    if args.duration is not None and (args.rate is None or args.duration <= 0):
        raise UserError("--duration needs --rate and must be positive")
    try:
        link = link_sim.QkdLink(args.dir_a, args.dir_b, qber=args.qber)
    except (link_sim.LinkError, OSError) as exc:
        raise UserError(str(exc)) from None

    mode = ""
    if args.qber:
        mode = f" (qber {args.qber}: {_entropy(args.qber):.2f} bits of entropy per byte)"
    print(f"link {args.dir_a} <-> {args.dir_b}: first file {link.next_name}{mode}", flush=True)
    report = _Reporter(quiet=args.quiet)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.rate is None:
            result = link.emit(args.total, args.file_size, on_progress=report)
        else:
            result = link.run(
                args.rate,
                duration=args.duration,
                total=args.total,
                file_size=args.file_size,
                stop=stop,
                on_progress=report,
            )
    except link_sim.LinkError as exc:
        raise UserError(str(exc)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stopped = " (stopped)" if stop.is_set() else ""
    print(
        f"wrote {_files(result.files)}, {_human(result.bytes)} to each folder in {result.elapsed:.1f} s"
        f" ({_human(result.rate)}/s){stopped}; last {result.last_name or '-'}"
    )
    return 0


class _Reporter:
    """Prints a progress line at most once per second."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, progress: link_sim.Progress) -> None:
        now = time.monotonic()
        if self.quiet or now - self.last < 1.0:
            return
        self.last = now
        print(
            f"  {progress.last_name}  {_files(progress.files)}  {_human(progress.bytes)}"
            f"  {_human(progress.rate)}/s",
            file=sys.stdout,
            flush=True,
        )


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _entropy(qber: float) -> float:
    return link_sim.shannon_entropy_per_byte(0.5 + qber)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
