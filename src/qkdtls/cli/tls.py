"""``qkdtls s_client`` and ``qkdtls s_server``: TLS-QKD counterparts of ``openssl s_client``/``s_server``.

The client copies stdin to the connection and the connection to stdout, so it works in shell pipelines; the
connection facts (mode, profile, key ID, cipher, peer SAE ID, handshake time) go to stderr. The server echoes
by default, or with ``--www`` answers an HTTP GET with a page describing the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qkdtls.cli.main import UserError
from qkdtls.net.admission import DEFAULT_MAX_LOOKUPS, DEFAULT_MAX_LOOKUPS_PER_SOURCE, DEFAULT_USED_KEY_MEMORY
from qkdtls.tls.events import ConnectionInfo

_POLICY_HELP = (
    "required: refuse peers without TLS-QKD (insufficient_security alert); preferred: use QKD when both "
    "sides can, else standard TLS 1.3 with certificate checks; off: standard TLS 1.3 only"
)
_REQUEST_HEAD_LIMIT = 16384


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _add_kme_arguments(parser: argparse.ArgumentParser, *, cert_aliases: bool) -> None:
    group = parser.add_argument_group(
        "KME (ETSI GS QKD 014)", "the SAE's own KME and the client certificate that identifies the SAE to it"
    )
    group.add_argument(
        "--kme", metavar="URL", help="SAE interface of this SAE's KME, e.g. https://127.0.0.1:8443"
    )
    cert_flags = ("--kme-cert", "--cert") if cert_aliases else ("--kme-cert",)
    key_flags = ("--kme-key", "--key") if cert_aliases else ("--kme-key",)
    group.add_argument(*cert_flags, dest="kme_cert", type=Path, metavar="PEM", help="SAE client certificate")
    group.add_argument(*key_flags, dest="kme_key", type=Path, metavar="PEM", help="SAE client private key")
    group.add_argument(
        "--kme-ca", type=Path, metavar="PEM", help="CA that issued the KME's server certificate"
    )
    group.add_argument(
        "--kme-id",
        type=int,
        metavar="ID",
        help="refuse the KME unless it reports this KME ID (ETSI 014 §5.1)",
    )
    group.add_argument(
        "--kme-timeout", type=float, default=5.0, metavar="S", help="bound for each KME request"
    )
    group.add_argument(
        "--allow-keys-without-holders",
        action="store_true",
        help="accept keys from a KME that does not report their holders (key_extension); only for a KME "
        "trusted to hand out keys shared by exactly two SAEs (no multicast keys)",
    )


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--qkd", choices=("required", "preferred", "off"), default="preferred", help=_POLICY_HELP
    )
    parser.add_argument(
        "--profile",
        dest="profiles",
        action="append",
        choices=("secure", "reference"),
        metavar="NAME",
        help="TLS-QKD profile, repeatable: secure (QKD key as TLS 1.3 external PSK with ECDHE; default) or "
        "reference (the authors' wire format; insecure, for interoperability only)",
    )
    parser.add_argument(
        "--alpn", action="append", default=[], metavar="PROTO", help="ALPN protocol, repeatable"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="handshake timeout (seconds)"
    )


def register(subparsers: Any) -> None:
    client = subparsers.add_parser(
        "s_client",
        help="connect with TLS-QKD and relay stdin/stdout",
        description="Connect to HOST:PORT with TLS-QKD (falling back to TLS 1.3 per --qkd), print the "
        "connection facts on stderr, then copy stdin to the server and the server's data to stdout. "
        "End of stdin sends close_notify; the command ends when the server closes.",
    )
    client.add_argument("address", type=_parse_hostport, metavar="HOST:PORT", help="server to connect to")
    client.add_argument(
        "--target-sae", type=int, metavar="ID", help="the server's SAE ID (else --sae-directory)"
    )
    client.add_argument("--sae-directory", type=Path, metavar="TOML", help="host[:port] = SAE ID table")
    client.add_argument(
        "--servername", metavar="NAME", help="SNI and certificate name (default: HOST if a name)"
    )
    client.add_argument("--cafile", type=Path, metavar="PEM", help="CAs trusted for the server certificate")
    client.add_argument(
        "--no-verify", action="store_true", help="do not verify the server certificate (testing)"
    )
    client.add_argument(
        "--prefetch", type=int, default=0, metavar="N", help="keep N keys ready per target SAE"
    )
    client.add_argument("--quiet", action="store_true", help="do not print the connection facts")
    client.add_argument(
        "--wait",
        type=float,
        default=5.0,
        metavar="S",
        help="after stdin ends, wait this long for the server to finish",
    )
    _add_tls_arguments(client)
    _add_kme_arguments(client, cert_aliases=True)
    client.set_defaults(func=run_client)

    server = subparsers.add_parser(
        "s_server",
        help="accept TLS-QKD connections (echo or --www)",
        description="Accept TLS-QKD connections (and classic TLS 1.3 per --qkd) on 127.0.0.1:PORT. Echoes "
        "what each client sends, or with --www answers an HTTP GET with a page describing the connection. "
        "Prints 'listening on HOST:PORT' on stderr once ready, then one line per connection.",
    )
    server.add_argument(
        "--accept", type=int, required=True, metavar="PORT", help="port to listen on (0: any free)"
    )
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--cert", type=Path, required=True, metavar="PEM", help="server certificate chain")
    server.add_argument("--key", type=Path, required=True, metavar="PEM", help="server private key")
    server.add_argument(
        "--cafile", type=Path, metavar="PEM", help="require client certificates from these CAs"
    )
    server.add_argument(
        "--www", action="store_true", help="answer HTTP GET with a status page instead of echoing"
    )
    server.add_argument(
        "--allow-peer-sae",
        dest="allowed_peer_saes",
        action="append",
        type=int,
        metavar="ID",
        help="accept TLS-QKD only from this SAE (repeatable); other SAEs' offers are refused before any KME "
        "request. With --cafile (client certificates required), only the SAEs listed may use TLS-QKD",
    )
    server.add_argument(
        "--max-kme-lookups",
        type=int,
        default=DEFAULT_MAX_LOOKUPS,
        metavar="N",
        help="KME requests for handshakes at once; past it a QKD offer is refused (default %(default)s)",
    )
    server.add_argument(
        "--max-kme-lookups-per-source",
        type=int,
        default=DEFAULT_MAX_LOOKUPS_PER_SOURCE,
        metavar="N",
        help="the same, per client address (default %(default)s)",
    )
    server.add_argument(
        "--used-key-memory",
        type=float,
        default=DEFAULT_USED_KEY_MEMORY,
        metavar="S",
        help="how long used key IDs are remembered, so a replayed ClientHello is refused; at least the KMEs' "
        "reservation TTL and re-collection window (default %(default)s)",
    )
    server.add_argument(
        "--accept-key-announcements",
        action="store_true",
        help="collect the keys qkdtls clients announce for their next connections ahead of time, so those "
        "handshakes make no KME request (only correct when this process alone serves its SAE ID)",
    )
    _add_tls_arguments(server)
    _add_kme_arguments(server, cert_aliases=False)
    server.set_defaults(func=run_server)


def _kme_settings(args: argparse.Namespace, prefetch: int = 0) -> Any:
    if args.kme is None:
        if args.qkd == "required":
            raise UserError("--qkd required needs --kme (and --kme-cert, --kme-key, --kme-ca)")
        return None
    missing = [
        flag
        for flag, value in (
            ("--kme-cert", args.kme_cert),
            ("--kme-key", args.kme_key),
            ("--kme-ca", args.kme_ca),
        )
        if value is None
    ]
    if missing:
        raise UserError(f"--kme needs {', '.join(missing)}")
    from qkdtls.etsi014.client import KmeClientSettings

    return KmeClientSettings(
        url=args.kme,
        certfile=args.kme_cert,
        keyfile=args.kme_key,
        cafile=args.kme_ca,
        timeout=args.kme_timeout,
        prefetch=prefetch,
        expected_kme_id=args.kme_id,
    )


def describe(
    info: ConnectionInfo, handshake_seconds: float | None, peer_sae_id: int | None = None
) -> list[tuple[str, str]]:
    """The connection facts, in the order both commands print them.

    A client knows its peer's SAE ID from its own settings (the server learns it from the PSK identity).
    """
    if info.peer_sae_id is not None or info.mode != "qkd":
        peer_sae_id = info.peer_sae_id
    facts = [
        ("mode", info.mode),
        ("profile", info.profile or "-"),
        ("key ID", info.key_id or "-"),
        ("cipher", info.cipher),
        ("version", info.version),
        ("group", info.group or "-"),
        ("peer SAE ID", str(peer_sae_id) if peer_sae_id is not None else "-"),
        ("ALPN", info.alpn or "-"),
    ]
    if handshake_seconds is not None:
        facts.append(("handshake", f"{handshake_seconds * 1000:.2f} ms"))
    return facts


# -- s_client ----------------------------------------------------------------------------------------------


def run_client(args: argparse.Namespace) -> int:
    from qkdtls.net.context import QKDContext
    from qkdtls.net.errors import QKDError

    host, port = args.address
    try:
        context = QKDContext(
            "client",
            kme=_kme_settings(args, args.prefetch),
            qkd=args.qkd,
            profiles=args.profiles or ("secure",),
            cafile=args.cafile,
            check_hostname=not args.no_verify,
            alpn_protocols=args.alpn,
            sae_directory=args.sae_directory,
            handshake_timeout=args.timeout,
            allow_keys_without_holders=args.allow_keys_without_holders,
        )
    except (QKDError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if args.no_verify:
        context.verify = False
    servername = args.servername
    if servername is None and not _is_ip(host):
        servername = host
    started = time.monotonic()
    try:
        # The KME requests happen before TCP is opened: the server never waits for them.
        prepared = context.prepare_offer(
            host, port, server_hostname=servername, target_sae_id=args.target_sae
        )
    except QKDError as exc:
        print(f"qkdtls s_client: {exc}", file=sys.stderr)
        context.close()
        return 1
    try:
        raw = socket.create_connection((host, port), timeout=args.timeout)
    except OSError as exc:
        print(f"qkdtls s_client: cannot connect to {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        context.close()
        return 1
    try:
        conn = context.wrap_socket(
            raw, server_hostname=servername, target_sae_id=args.target_sae, prepared_offer=prepared
        )
    except QKDError as exc:
        raw.close()
        print(f"qkdtls s_client: {exc}", file=sys.stderr)
        context.close()
        return 1
    elapsed = time.monotonic() - started
    try:
        if not args.quiet and conn.info is not None:
            for name, value in describe(conn.info, elapsed, conn.target_sae_id):
                print(f"{name}: {value}", file=sys.stderr)
            sys.stderr.flush()
        conn.settimeout(None)
        return _relay(conn, args.wait)
    finally:
        conn.close()
        context.close()


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _relay(conn: Any, wait: float) -> int:
    """stdin → connection in this thread, connection → stdout in another, until both ends are done."""
    failure: list[BaseException] = []

    def downstream() -> None:
        out = sys.stdout.buffer
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                out.write(data)
                out.flush()
        except (OSError, ValueError) as exc:
            failure.append(exc)

    reader = threading.Thread(target=downstream, name="s_client-recv", daemon=True)
    reader.start()
    stdin = sys.stdin.buffer.fileno()
    try:
        while reader.is_alive():
            chunk = os.read(stdin, 65536)
            if not chunk:
                break
            conn.sendall(chunk)
    except OSError as exc:
        failure.append(exc)
    else:
        # End of input: close_notify (TLS 1.3 half-close), then let the server finish its answer.
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    reader.join(wait)
    if failure:
        print(f"qkdtls s_client: {failure[0]}", file=sys.stderr)
        return 1
    return 0


# -- s_server ----------------------------------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> int:
    from qkdtls.net.context import QKDContext
    from qkdtls.net.errors import QKDError

    try:
        context = QKDContext(
            "server",
            kme=_kme_settings(args),
            qkd=args.qkd,
            profiles=args.profiles or ("secure",),
            certfile=args.cert,
            keyfile=args.key,
            cafile=args.cafile,
            alpn_protocols=args.alpn,
            handshake_timeout=args.timeout,
            accept_key_announcements=args.accept_key_announcements,
            allowed_peer_sae_ids=args.allowed_peer_saes,
            allow_keys_without_holders=args.allow_keys_without_holders,
            max_kme_lookups=args.max_kme_lookups,
            max_kme_lookups_per_source=args.max_kme_lookups_per_source,
            used_key_memory=args.used_key_memory,
        )
        context.check_server_access()
    except (QKDError, ValueError) as exc:
        raise UserError(str(exc)) from None
    try:
        asyncio.run(_serve(context, args))
    finally:
        context.close()
    return 0


async def _serve(context: Any, args: argparse.Namespace) -> None:
    from qkdtls.net.aio import close_writer, start_server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info: ConnectionInfo = writer.get_extra_info("qkd")
        seconds = writer.get_extra_info("handshake_seconds")
        peer = writer.get_extra_info("peername")
        facts = " ".join(f"{k.replace(' ', '_')}={v}" for k, v in describe(info, seconds))
        print(f"connection from {peer[0]}:{peer[1]} {facts}", file=sys.stderr, flush=True)
        try:
            if args.www:
                await _answer_www(reader, writer, info, seconds)
            else:
                await _echo(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            await close_writer(writer)

    server = await start_server(handle, args.host, args.accept, context=context)
    async with server:
        bound = server.sockets[0].getsockname()
        print(f"listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
        await stop.wait()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            return
        writer.write(data)
        await writer.drain()


async def _answer_www(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: ConnectionInfo, seconds: float | None
) -> None:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10.0)
    if len(head) > _REQUEST_HEAD_LIMIT:
        return
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if not request_line.startswith(("GET ", "HEAD ")):
        status, body = "405 Method Not Allowed", "<p>only GET</p>"
    else:
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in describe(info, seconds)
        )
        status = "200 OK"
        body = (
            f"<!doctype html><title>qkdtls s_server</title><h1>TLS-QKD connection</h1><table>{rows}</table>\n"
        )
    payload = body.encode()
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {len(payload)}\r\n"
        f"Connection: close\r\n\r\n".encode()
        + (payload if not request_line.startswith("HEAD ") else b"")
    )
    await writer.drain()
