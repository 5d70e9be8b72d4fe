"""Application commands: ``demo``, ``https-server``, ``https-get``, ``video call``, ``bench-handshake``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qkdtls.cli.main import UserError

_POLICY_HELP = "required: TLS-QKD only; preferred: TLS-QKD when possible, else TLS 1.3; off: TLS 1.3 only"


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo", help="two sites on this machine: TLS-QKD handshakes, HTTPS and a video call",
        description="Builds a two-site testbed (PKI, two KMEs on SQLite, a simulated QKD link), runs TLS-QKD "
        "handshakes, an HTTPS GET and a short video call between SAE 1001 (site A) and SAE 2001 (site B), "
        "prints a summary and stops everything.",
    )
    demo.add_argument("--dir", type=Path, help="testbed folder (new or empty; default: a temporary folder)")
    demo.add_argument("--keep", action="store_true",
                      help="keep the testbed and the HTTPS server running and print how to use them")
    demo.add_argument("--handshakes", type=int, default=3, help="TLS-QKD handshakes to run (default 3)")
    demo.add_argument("--call-seconds", type=float, default=2.0, help="length of the video call (default 2)")
    network = demo.add_argument_group(
        "network", "--network: TLS-QKD between sites several QKD links apart, keys relayed by the KMEs "
        "between them (docs/network.md)")
    network.add_argument("--network", action="store_true",
                         help="run the network demo instead: handshakes between sites three links apart and "
                         "the relay paths that carried their keys")
    network.add_argument("--topology", default="chain-4", metavar="FILE|NAME",
                         help="with --network: topology file or example (chain-4, ring-5, spread-8; default "
                         "chain-4)")
    network.add_argument("--mode", choices=("trusted", "spread"), default="trusted",
                         help="with --network: relay mode of the KMEs (spread needs node-disjoint paths: "
                         "--topology spread-8)")
    network.add_argument("--paths", type=int, default=2,
                         help="with --network --mode spread: node-disjoint paths per key (default 2)")
    demo.set_defaults(func=run_demo)

    server = subparsers.add_parser(
        "https-server", help="HTTPS over TLS-QKD: GET / (page) and GET /status (JSON)",
        description="Serves GET / and GET /status (JSON: mode, profile, key ID, peer SAE) over TLS-QKD, and "
        "classic TLS 1.3 to clients such as curl. Prints its URL once listening; Ctrl-C stops it.",
    )
    server.add_argument("--accept", type=int, default=0, metavar="PORT", help="port on 127.0.0.1 (0: any)")
    server.add_argument("--cert", type=Path, required=True, help="server certificate chain (PEM)")
    server.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    _tls_options(server)
    _kme_options(server)
    server.set_defaults(func=run_https_server)

    get = subparsers.add_parser(
        "https-get", help="GET an https:// URL over TLS-QKD",
        description="Fetches URL over TLS-QKD (or TLS 1.3 per --qkd): the body goes to stdout, the status "
        "line and the connection facts to stderr. Exit status 0 for HTTP 2xx.",
    )
    get.add_argument("url", help="https://HOST:PORT/PATH")
    get.add_argument("--target-sae", type=int, metavar="ID", help="the server's SAE ID")
    get.add_argument("--cafile", type=Path, required=True, help="CAs trusted for the server certificate")
    get.add_argument("--prefetch", type=int, default=0, metavar="N", help="keys kept ready per target SAE")
    _tls_options(get)
    _kme_options(get)
    get.set_defaults(func=run_https_get)

    video = subparsers.add_parser("video", help="a full-duplex video and audio call over TLS-QKD")
    video_sub = video.add_subparsers(dest="video_command", metavar="SUBCOMMAND", required=True)
    call = video_sub.add_parser(
        "call", help="a call between the two sites of a local testbed",
        description="Builds a testbed and runs a call in both directions between SAE 1001 (site A) and SAE "
        "2001 (site B), each direction over its own TLS-QKD connection. The received pictures are shown in "
        "a browser page on 127.0.0.1 (its URL is printed). Statistics are printed every second and at the "
        "end.",
    )
    _media_options(call, sending=True, receiving=True)
    call.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    call.set_defaults(func=run_video_call)

    serve = video_sub.add_parser(
        "serve", help="receive calls (one site's receiver)",
        description="Accepts calls over TLS-QKD on 127.0.0.1:PORT (or --host) and shows them (window or web "
        "view); prints each call's statistics when it ends. Ctrl-C stops.",
    )
    serve.add_argument("--accept", type=int, default=0, metavar="PORT", help="port to listen on (0: any)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--cert", type=Path, required=True, help="server certificate chain (PEM)")
    serve.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    _media_options(serve, sending=False, receiving=True)
    _tls_options(serve)
    _kme_options(serve)
    serve.set_defaults(func=run_video_serve)

    send = video_sub.add_parser(
        "send", help="call a receiver (one site's sender)",
        description="Streams video and audio over TLS-QKD to a `qkdtls video serve` at HOST:PORT.",
    )
    send.add_argument("address", metavar="HOST:PORT", help="the receiver")
    send.add_argument("--target-sae", type=int, metavar="ID", help="the receiver's SAE ID")
    send.add_argument("--cafile", type=Path, required=True, help="CAs trusted for the receiver's certificate")
    send.add_argument("--servername", help="name in the receiver's certificate (default: HOST)")
    send.add_argument("--prefetch", type=int, default=0, metavar="N", help="keys kept ready per target SAE")
    _media_options(send, sending=True, receiving=False)
    _tls_options(send)
    _kme_options(send)
    send.set_defaults(func=run_video_send)

    bench = subparsers.add_parser(
        "bench-handshake", help="the paper's handshake benchmark (TLS-QKD vs TLS 1.3 at emulated RTTs)",
        description="Times connect -> first application record for TLS 1.3 and TLS-QKD (secure and "
        "reference, cold and kept-alive) between two sites joined by a delaying relay, and writes a "
        "markdown table, JSON and a PNG plot.",
    )
    from qkdtls.apps.paper_bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=run_bench)


def _media_options(parser: argparse.ArgumentParser, *, sending: bool, receiving: bool) -> None:
    if sending:
        parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
        parser.add_argument("--fps", type=float, default=30.0, help="frames per second (default 30)")
        parser.add_argument("--quality", type=int, default=70, help="JPEG quality 1-95 (default 70)")
        parser.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of the picture (default 720p)")
        parser.add_argument("--video", choices=("pattern", "camera", "auto"), default="pattern",
                            help="video source (camera needs OpenCV and /dev/video0)")
        parser.add_argument("--audio", choices=("tone", "mic", "auto", "none"), default="tone",
                            help="audio source (mic needs sounddevice)")
    if receiving:
        parser.add_argument("--speaker", choices=("count", "speaker", "auto"), default="count",
                            help="play received audio (needs sounddevice) or only count it")
        parser.add_argument("--display", choices=("auto", "window", "web", "none"), default="auto",
                            help="auto: a window per call if there is a display (OpenCV), else the web view")
        parser.add_argument("--web-port", type=int, default=0, help="port of the web view on 127.0.0.1")


def _call_settings(args: argparse.Namespace) -> Any:
    from qkdtls.apps.video.call import CallSettings

    size = getattr(args, "size", "1280x720")
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must be WIDTHxHEIGHT, got {size!r}") from None
    fps, quality = getattr(args, "fps", 30.0), getattr(args, "quality", 70)
    duration = getattr(args, "duration", 1.0)
    if not 0 < fps <= 120 or not 1 <= quality <= 95 or duration <= 0:
        raise UserError("--fps must be in (0, 120], --quality in 1..95 and --duration > 0")
    display = getattr(args, "display", "none")
    return CallSettings(
        duration=duration, fps=fps, quality=quality, width=width, height=height,
        video=getattr(args, "video", "pattern"), audio=getattr(args, "audio", "none"),
        speaker=getattr(args, "speaker", "count"), display="none" if display in ("web", "none") else display,
    )


def _web_view(args: argparse.Namespace, receivers: dict[str, Any]) -> Any:
    from qkdtls.apps.video.sources import WindowDisplay
    from qkdtls.apps.video.web import VideoWebServer

    if args.display == "web" or (args.display == "auto" and not WindowDisplay.available()):
        web = VideoWebServer(receivers, port=args.web_port).start()
        print(f"web view of the received pictures: {web.url}", file=sys.stderr, flush=True)
        return web
    return None


def _receiver_line(name: str, rx: Any, seconds: float) -> str:
    return (f"{name}: {rx.frames_decoded} frames {rx.width}x{rx.height}, {rx.fps():.1f} fps, "
            f"{rx.bytes_received * 8 / max(seconds, 1e-9) / 1e6:.1f} Mbit/s, latency p50 "
            f"{rx.latency_ms(50) or 0:.1f} ms p95 {rx.latency_ms(95) or 0:.1f} ms; skipped at receiver "
            f"{rx.frames_skipped}; audio {rx.audio_chunks} chunks; order errors {rx.order_errors}")


def _tls_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qkd", choices=("required", "preferred", "off"), default="preferred",
                        help=_POLICY_HELP)
    parser.add_argument("--profile", dest="profiles", action="append", choices=("secure", "reference"),
                        help="TLS-QKD profile, repeatable (default secure; reference is insecure)")
    parser.add_argument("--timeout", type=float, default=10.0, help="connection and handshake timeout (s)")


def _kme_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KME", "this SAE's KME (ETSI GS QKD 014) and its SAE certificate")
    group.add_argument("--kme", metavar="URL", help="SAE interface of the KME, e.g. https://127.0.0.1:8443")
    group.add_argument("--kme-cert", type=Path, help="SAE client certificate (PEM)")
    group.add_argument("--kme-key", type=Path, help="SAE client private key (PEM)")
    group.add_argument("--kme-ca", type=Path, help="CA of the KME's server certificate")


def _kme_settings(args: argparse.Namespace, prefetch: int = 0) -> Any:
    if args.kme is None:
        if args.qkd == "required":
            raise UserError("--qkd required needs --kme, --kme-cert, --kme-key and --kme-ca")
        return None
    missing = [f for f, v in (("--kme-cert", args.kme_cert), ("--kme-key", args.kme_key),
                              ("--kme-ca", args.kme_ca)) if v is None]
    if missing:
        raise UserError(f"--kme needs {', '.join(missing)}")
    from qkdtls.etsi014.client import KmeClientSettings

    try:
        return KmeClientSettings(url=args.kme, certfile=args.kme_cert, keyfile=args.kme_key,
                                 cafile=args.kme_ca, timeout=args.timeout, prefetch=prefetch)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _context(purpose: str, args: argparse.Namespace, **kwargs: Any) -> Any:
    from qkdtls.net.context import QKDContext
    from qkdtls.net.errors import QKDError

    try:
        return QKDContext(purpose, kme=_kme_settings(args, kwargs.pop("prefetch", 0)), qkd=args.qkd,
                          profiles=args.profiles or ("secure",), handshake_timeout=args.timeout, **kwargs)
    except (QKDError, ValueError) as exc:
        raise UserError(str(exc)) from None


def run_demo(args: argparse.Namespace) -> int:
    from qkdtls.apps.demo import demo

    if args.handshakes < 1 or args.call_seconds <= 0:
        raise UserError("--handshakes must be >= 1 and --call-seconds > 0")
    if args.network:
        return run_network_demo(args)
    try:
        demo(args.dir, keep=args.keep, handshakes=args.handshakes, call_seconds=args.call_seconds)
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    return 0


def run_network_demo(args: argparse.Namespace) -> int:
    from qkdtls.apps.network_demo import NetworkDemoError, network_demo
    from qkdtls.network.build import BuildError
    from qkdtls.network.topology import TopologyError
    from qkdtls.testbed import TestbedError

    if not 2 <= args.paths <= 16:
        raise UserError("--paths must lie within 2..16")
    try:
        network_demo(args.dir, topology=args.topology, mode=args.mode, paths=args.paths,
                     count=args.handshakes, keep=args.keep, progress=lambda text: print(text, flush=True))
    except (NetworkDemoError, BuildError, TopologyError, TestbedError) as exc:
        raise UserError(str(exc)) from None
    return 0


def run_https_server(args: argparse.Namespace) -> int:
    from qkdtls.apps.demo import wait_for_interrupt
    from qkdtls.apps.https import HttpsServer

    context = _context("server", args, certfile=args.cert, keyfile=args.key)
    try:
        with HttpsServer(context, port=args.accept, handshake_timeout=args.timeout) as server:
            print(f"serving {server.url} (GET / and /status); Ctrl-C stops", file=sys.stderr, flush=True)
            wait_for_interrupt()
    except OSError as exc:
        raise UserError(f"cannot listen on port {args.accept}: {exc.strerror or exc}") from None
    finally:
        context.close()
    return 0


def run_https_get(args: argparse.Namespace) -> int:
    from qkdtls.apps.https import HttpsError, https_get

    context = _context("client", args, cafile=args.cafile, prefetch=args.prefetch)
    try:
        response = https_get(args.url, context, args.target_sae, timeout=args.timeout)
    except (HttpsError, OSError) as exc:
        print(f"qkdtls https-get: {exc}", file=sys.stderr)
        return 1
    finally:
        context.close()
    c = response.connection
    print(f"HTTP {response.status} in {response.elapsed * 1000:.1f} ms; mode {c['mode']}, profile "
          f"{c['profile']}, key {c['key_ID']}, {c.get('cipher')}", file=sys.stderr)
    sys.stdout.buffer.write(response.body)
    sys.stdout.flush()
    return 0 if 200 <= response.status < 300 else 1


def run_video_call(args: argparse.Namespace) -> int:
    from qkdtls.apps.demo import SITE_A_SAE, SITE_B_SAE, demo_sites
    from qkdtls.apps.video.call import CallSite, run_call
    from qkdtls.apps.video.receiver import MediaReceiver
    from qkdtls.apps.video.sources import MediaUnavailable

    settings = _call_settings(args)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    receivers: dict[str, MediaReceiver] = {}
    web = _web_view(args, receivers)
    try:
        with tempfile.TemporaryDirectory(prefix="qkdtls-video-") as tmp, demo_sites(Path(tmp), say) as sites:
            a = CallSite("A", SITE_A_SAE, sites.a.server, sites.a.client)
            b = CallSite("B", SITE_B_SAE, sites.b.server, sites.b.client)
            started = time.monotonic()
            try:
                directions = run_call(a, b, settings, receivers=receivers, progress=say)
            except MediaUnavailable as exc:
                raise UserError(str(exc)) from None
            say(f"call ended after {time.monotonic() - started:.1f} s")
    finally:
        if web is not None:
            web.close()
    if args.json:
        print(json.dumps([d.to_json() for d in directions], indent=1))
    else:
        for d in directions:
            c = d.sender_connection
            print(f"{d.name}: {c['mode']}/{c['profile']} key {c['key_ID']}; dropped at sender "
                  f"{d.sender.stats.frames_dropped}")
            print("  " + _receiver_line(d.name, d.receiver.stats, settings.duration))
    healthy = all(
        not d.sender.failed and d.receiver.stats.error is None and d.receiver.stats.order_errors == 0
        for d in directions
    )
    return 0 if healthy else 1


def run_video_serve(args: argparse.Namespace) -> int:
    from qkdtls.apps.demo import wait_for_interrupt
    from qkdtls.apps.video.call import CallServer

    settings = _call_settings(args)
    context = _context("server", args, certfile=args.cert, keyfile=args.key)
    receivers: dict[str, Any] = {}
    web = _web_view(args, receivers)
    started: dict[str, float] = {}

    def ended(receiver: Any, status: dict[str, Any]) -> None:
        seconds = time.monotonic() - started.pop(receiver.name, time.monotonic())
        print(_receiver_line(receiver.name, receiver.stats, seconds or 1.0), flush=True)

    try:
        server = CallServer(context, receivers, settings, host=args.host, port=args.accept, on_end=ended)
    except OSError as exc:
        context.close()
        raise UserError(f"cannot listen on port {args.accept}: {exc.strerror or exc}") from None
    print(f"receiving calls on {server.address[0]}:{server.address[1]}; Ctrl-C stops", file=sys.stderr,
          flush=True)
    try:
        wait_for_interrupt()
    finally:
        server.close()
        if web is not None:
            web.close()
        context.close()
    return 0


def run_video_send(args: argparse.Namespace) -> int:
    from qkdtls.apps.video.call import send_call
    from qkdtls.apps.video.sources import MediaUnavailable

    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"expected HOST:PORT, got {args.address!r}")
    settings = _call_settings(args)
    context = _context("client", args, cafile=args.cafile, prefetch=args.prefetch)
    try:
        sender, status = send_call(
            context, (host, int(port)), settings, target_sae_id=args.target_sae,
            server_hostname=args.servername,
            progress=lambda text: print(text, file=sys.stderr, flush=True),
        )
    except MediaUnavailable as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        print(f"qkdtls video send: {exc}", file=sys.stderr)
        return 1
    finally:
        context.close()
    print(json.dumps({"connection": status, "sender": sender.stats.to_json()}))
    return 1 if sender.failed else 0


def run_bench(args: argparse.Namespace) -> int:
    from qkdtls.apps.paper_bench import run_benchmark, settings_from

    try:
        settings = settings_from(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    run_benchmark(settings, progress=lambda text: print(text, flush=True))
    return 0
