"""``qkdtls network up``: run a network folder — every KME as a child process, every QKD link simulated (the
code of ``qkdtls qkd-link``) at its rate, and the map on a loopback port — until told to stop.

- Start-up reports each KME as it becomes ready; a KME that does not start stops the whole start with its
  exit code and log tail.
- Nothing is restarted: a KME that exits later, or a link writer that fails, is reported (with the KME's
  exit code and log tail) and stays down; the rest keeps running and the map shows it. The exit status is 1
  if that happened.
- Stopping (``stop()``, Ctrl-C, SIGTERM): the link writers stop, the map proxy closes, every KME gets
  SIGTERM and, after a bounded wait, SIGKILL; no child process outlives the runner. KMEs run in their own
  process group, so a Ctrl-C in the terminal reaches the runner alone, which then stops them in order.
- ``DIR/run/run.json`` says what runs where (removed at the end): for scripts and tests.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdtls import link_sim
from qkdtls.kme.admin_map import DOCUMENT_PATH
from qkdtls.kme.auth import client_context
from qkdtls.network.layout import NetworkLayout
from qkdtls.network.map_proxy import MapProxy, Upstream
from qkdtls.pki import PkiLayout
from qkdtls.testbed import START_TIMEOUT, KmeProcess, Testbed

Say = Callable[[str], None]
RUN_FILE = "run.json"


class RunnerError(RuntimeError):
    """The network cannot be started as asked (it already runs)."""


@dataclass
class LinkFeed:
    a: int
    b: int
    rate: int
    link: link_sim.QkdLink
    thread: threading.Thread | None = None
    written: int = 0
    error: str | None = None


@dataclass
class RunState:
    """What ``wait()`` saw: KMEs that exited on their own, link writers that failed."""

    exited: dict[int, int] = field(default_factory=dict)  # KME ID -> exit code
    failed_links: dict[tuple[int, int], str] = field(default_factory=dict)


class NetworkRunner:
    def __init__(
        self,
        layout: NetworkLayout,
        *,
        rate: int | None = None,
        map_port: int = 0,
        map_host: str = "127.0.0.1",
        verbosity: int = 0,
        say: Say = print,
    ) -> None:
        self.layout = layout
        self.pki: PkiLayout = layout.pki()
        self.say = say
        self.rate_override = rate
        self.map_port, self.map_host = map_port, map_host
        self.testbed = Testbed(
            root=layout.root,
            pki=self.pki,
            kmes={
                s.kme_id: KmeProcess(
                    kme_id=s.kme_id,
                    config=s.config,
                    ready_file=layout.run / f"kme{s.kme_id}.ready.json",
                    log=layout.logs / f"kme{s.kme_id}.log",
                    sae_port=s.sae_port,
                    inter_kme_port=s.inter_kme_port,
                )
                for s in layout.sites
            },
            sae_kme=layout.sae_site(),
            verbosity=verbosity,
            process_group=True,
        )
        self.feeds: list[LinkFeed] = []
        self.proxy: MapProxy | None = None
        self.state = RunState()
        self._stop = threading.Event()
        self._started_at = 0.0
        self._run_file_written = False

    # --- start --------------------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """KMEs (reporting each as it is ready), then the links, then the map; on failure nothing is left."""
        running = load_run_file(self.layout.root)
        if running is not None and _alive(running.get("pid")):
            raise RunnerError(
                f"{self.layout.root} is already running (qkdtls network up, pid {running['pid']}): "
                "stop that one first"
            )
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        self.layout.run.mkdir(parents=True, exist_ok=True)
        total = len(self.layout.sites)
        self.say(f"starting {total} KMEs of network {self.layout.name!r} (logs in {self.layout.logs})")
        count = 0

        def ready(kme_id: int) -> None:
            nonlocal count
            count += 1
            site = self.layout.site(kme_id)
            self.say(
                f"  [{count}/{total}] KME {kme_id} ({site.name}) is up: {site.sae_url}, "
                f"pid {self.testbed.pid(kme_id)}"
            )

        self._started_at = time.monotonic()
        try:
            self.testbed.start(timeout, on_ready=ready, redraw_ports=False)
            self._start_links()
            upstreams = []
            for s in self.layout.sites:
                zone = self.pki.zones[s.kme_id]
                upstreams.append(
                    Upstream(
                        s.kme_id, s.name, s.saes, s.host, s.sae_port, zone.admin.cert, zone.admin.key, zone.ca
                    )
                )
            self.proxy = MapProxy(
                upstreams, [(link.a, link.b) for link in self.layout.links], title=self.layout.name,
                host=self.map_host, port=self.map_port,
            ).start()  # fmt: skip
            self._write_run_file()
        except BaseException:
            self.stop()
            raise
        self.say(f"network {self.layout.name!r} is up in {time.monotonic() - self._started_at:.1f} s")

    def _start_links(self) -> None:
        for link in self.layout.links:
            rate = self.rate_override or link.rate
            feed = LinkFeed(link.a, link.b, rate, link_sim.QkdLink(*link.folders))
            feed.thread = threading.Thread(
                target=self._feed, args=(feed,), name=f"qkd-link-{link.a}-{link.b}", daemon=True
            )
            self.feeds.append(feed)
        for feed in self.feeds:
            assert feed.thread is not None
            feed.thread.start()
        rates = ", ".join(f"{f.a}-{f.b} {_human(f.rate)}/s" for f in self.feeds)
        self.say(f"simulated QKD links writing key material: {rates or 'none'}")

    def _feed(self, feed: LinkFeed) -> None:
        def progress(p: link_sim.Progress) -> None:
            feed.written = p.bytes

        try:
            feed.link.run(feed.rate, stop=self._stop, on_progress=progress)
        except (
            Exception
        ) as exc:  # reported by wait(); a link writer is never restarted behind the user's back
            feed.error = f"{type(exc).__name__}: {exc}"

    def _write_run_file(self) -> None:
        assert self.proxy is not None
        doc = {
            "pid": os.getpid(),
            "network": self.layout.name,
            "map_url": self.proxy.map_url,
            "kmes": {
                str(k): {"pid": self.testbed.pid(k), "sae_url": self.layout.site(k).sae_url}
                for k in self.testbed.kmes
            },
            "links": [{"between": [f.a, f.b], "rate": f.rate} for f in self.feeds],
        }
        path = self.layout.run / RUN_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
        self._run_file_written = True

    # --- what a user needs --------------------------------------------------------------------------------

    def summary(self) -> str:
        lay, pki = self.layout, self.pki
        lines = ["", f"=== network {lay.name!r}: {len(lay.sites)} sites, {len(lay.links)} links ==="]
        if lay.description:
            lines.append(lay.description)
        for s in lay.sites:
            zone = pki.zones[s.kme_id]
            peers = sorted({k.b if k.a == s.kme_id else k.a for k in lay.links if s.kme_id in (k.a, k.b)})
            lines.append(
                f"site {s.name} — KME {s.kme_id}: SAE interface {s.sae_url} (CA {zone.ca}); "
                f"inter-KME {s.inter_kme_url}; linked to KME {', '.join(map(str, peers)) or '-'}"
            )
            for sae in s.saes:
                issued, app = zone.saes[sae], zone.app_servers[sae]
                lines.append(
                    f"  SAE {sae}: --kme {s.sae_url} --kme-cert {issued.cert} --kme-key {issued.key} "
                    f"--kme-ca {zone.ca}"
                )
                lines.append(f"            its TLS server certificate {app.cert}, key {app.key}")
            lines.append(
                f"  admin: cert {zone.admin.cert} key {zone.admin.key}; "
                f"map {s.sae_url}/api/v1/admin/map (admin certificate)"
            )
            if self.proxy is not None:
                lines.append(
                    f"         the same map without a certificate: {self.proxy.kme_map_url(s.kme_id)}"
                )
            lines.append(f"  config {s.config}; log {lay.logs / f'kme{s.kme_id}.log'}")
        lines.append(f"trust bundle (every zone CA, for TLS-QKD clients): {pki.trust_bundle}")
        if self.proxy is not None:
            lines.append(
                f"map of the whole network (this machine only, no certificate): {self.proxy.map_url}"
            )
        lines.append("Ctrl-C (or SIGTERM) stops every KME and link.")
        return "\n".join(lines)

    # --- running and stopping -----------------------------------------------------------------------------

    def wait(self, stop: threading.Event | None = None, poll: float = 0.5) -> RunState:
        """Watch the KMEs and links until ``stop`` (or :meth:`request_stop`); report what fails, once."""
        stop = stop or self._stop
        while not stop.wait(poll) and not self._stop.is_set():
            self.check()
        return self.state

    def check(self) -> None:
        """Report KMEs that exited and link writers that failed since the last check (never restarted)."""
        for kme_id, kme in self.testbed.kmes.items():
            proc = kme.proc
            if proc is None or kme_id in self.state.exited or proc.poll() is None:
                continue
            self.state.exited[kme_id] = proc.returncode
            site = self.layout.site(kme_id)
            self.say(
                f"!! KME {kme_id} ({site.name}) exited with code {proc.returncode} at "
                f"{time.strftime('%H:%M:%S')}; it is not restarted. Log {kme.log}, last lines:\n"
                + _indent(self.testbed.log_tail(kme_id, 12))
            )
        for feed in self.feeds:
            if feed.error is not None and (feed.a, feed.b) not in self.state.failed_links:
                self.state.failed_links[(feed.a, feed.b)] = feed.error
                self.say(
                    f"!! the simulated link {feed.a}-{feed.b} stopped: {feed.error}; it is not restarted"
                )

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        """Links, map, then every KME (SIGTERM, bounded wait, SIGKILL). Safe to call more than once."""
        self._stop.set()
        for feed in self.feeds:
            if feed.thread is not None:
                feed.thread.join(5.0)
        if self.proxy is not None:
            self.proxy.close()
        self.testbed.stop()
        if self._run_file_written:
            with contextlib.suppress(FileNotFoundError):
                (self.layout.run / RUN_FILE).unlink()
            self._run_file_written = False

    def admin_document(self, kme_id: int, timeout: float = 10.0) -> dict[str, Any]:
        """KME ``kme_id``'s ``GET /api/v1/admin/network``, fetched now with its administrator certificate."""
        site, zone = self.layout.site(kme_id), self.pki.zones[kme_id]
        context = client_context(zone.admin.cert, zone.admin.key, zone.ca)
        conn = http.client.HTTPSConnection(site.host, site.sae_port, context=context, timeout=timeout)
        try:
            conn.request("GET", DOCUMENT_PATH)
            answer = conn.getresponse()
            body = answer.read()
        except http.client.HTTPException as exc:
            raise OSError(f"KME {kme_id}: {type(exc).__name__}") from None
        finally:
            conn.close()
        if answer.status != 200:
            raise OSError(f"KME {kme_id} answered {DOCUMENT_PATH} with HTTP {answer.status}")
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError(f"KME {kme_id}: {DOCUMENT_PATH} is not a JSON object")
        return doc

    def kme_pids(self) -> dict[int, int | None]:
        return {k: kme.proc.pid if kme.proc is not None else None for k, kme in self.testbed.kmes.items()}

    def link_bytes(self) -> dict[tuple[int, int], int]:
        return {(f.a, f.b): f.written for f in self.feeds}

    def __enter__(self) -> NetworkRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_run_file(root: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((Path(root) / "run" / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _human(n: float) -> str:
    return f"{n / 1024:g} KiB" if n >= 1024 else f"{n:g} B"
