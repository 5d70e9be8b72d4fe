"""A QKD testbed on loopback: PKI, configuration files, key folders and one KME process per site.

By default two sites: site A runs KME 1 with SAEs 1001 and 1002, site B runs KME 2 with SAE 2001. KME 1 and
KME 2 share a QKD link whose two key folders receive byte-identical files; each KME also has a local link for
SAE pairs on the same site. The KMEs run as subprocesses (``qkdtls kme serve``) so they can be killed
and restarted like real ones. Everything listens on 127.0.0.1 only.

    with Testbed.create(tmp_path) as tb:
        cert, key, ca = tb.sae_credentials(1001)
        url = tb.sae_url(1)

Networks of N sites: give the SAEs per site and the links (``chain(4)`` is 1-2, 2-3, 3-4), and TOML tables
to merge into every configuration (``kme_config``) or into one site's (``site_config``):

    Testbed.create(tmp_path, saes=sites_saes(4), links=chain(4), kme_config={"network": {...}})
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdtls.pki import PkiLayout
from qkdtls.provision import KmeSettings, Network, Site, provision

DEFAULT_SAES: Mapping[int, Sequence[int]] = {1: (1001, 1002), 2: (2001,)}
# Bounds that hold on a loaded 2-core machine: a KME imports its folders before it reports ready.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
LOOPBACK = "127.0.0.1"


class TestbedError(RuntimeError):
    """The testbed could not be built or a KME did not start; the message includes the KME's log tail."""

    __test__ = False  # not a pytest test class


class _PortTaken(TestbedError):
    """A KME exited because one of its ports was taken after it was drawn."""


# Fresh port draws when a KME finds its port taken at the first start (see ``Testbed.start``).
PORT_ATTEMPTS = 4


# KME ports are written into the configurations before the KMEs start, so they are chosen ahead of binding.
# Drawing them below Linux's ephemeral range (32768-60999) keeps them out of the way of the ports the kernel
# hands to every connecting socket and to servers that bind port 0 in the meantime.
_PORT_RANGE = (20000, 32000)
# Ports handed out by this process: a port is free until its KME binds it, so two draws in a row (the four
# ports of one testbed, say) could otherwise return the same one.
_HANDED_OUT: set[int] = set()


def sites_saes(count: int) -> dict[int, tuple[int, ...]]:
    """KMEs 1..count with one SAE each: KME k has SAE 1000*k + 1."""
    return {k: (1000 * k + 1,) for k in range(1, count + 1)}


def chain(count: int) -> list[tuple[int, int]]:
    """The links of a chain of KMEs 1..count: 1-2, 2-3, ..."""
    return [(k, k + 1) for k in range(1, count)]


def ring(count: int) -> list[tuple[int, int]]:
    """The links of a ring of KMEs 1..count: the chain and count-1."""
    return [*chain(count), (1, count)] if count > 2 else chain(count)


def site_name(index: int, kme_id: int) -> str:
    """``site A``, ``site B``, ... by position (``site <KME ID>`` past Z)."""
    return f"site {chr(ord('A') + index)}" if index < 26 else f"site {kme_id}"


def free_port() -> int:
    """A TCP port on loopback that is free now, outside the kernel's ephemeral range, and not handed out
    before by this process (until half the range has been)."""
    if len(_HANDED_OUT) > (_PORT_RANGE[1] - _PORT_RANGE[0]) // 2:
        _HANDED_OUT.clear()
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise TestbedError(f"no free TCP port on {LOOPBACK} in {_PORT_RANGE[0]}-{_PORT_RANGE[1]}")


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that are all free now, in the same range as
    :func:`free_port` and not handed out before (for configurations that number ports from a base)."""
    for _ in range(200):
        base = random.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - count)
        ports = range(base, base + count)
        if any(port in _HANDED_OUT for port in ports):
            continue
        with contextlib.ExitStack() as probes:
            try:
                for port in ports:
                    probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    probe.bind((LOOPBACK, port))
            except OSError:
                continue
        _HANDED_OUT.update(ports)
        return base
    raise TestbedError(f"no {count} consecutive free TCP ports on {LOOPBACK}")


@dataclass
class KmeProcess:
    kme_id: int
    config: Path
    ready_file: Path
    log: Path
    sae_port: int
    inter_kme_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None


@dataclass
class _LinkFolders:
    folders: tuple[Path, ...]  # identical files go to every folder
    sequence: int = 0


@dataclass
class Testbed:
    __test__ = False  # not a pytest test class

    root: Path
    pki: PkiLayout
    kmes: dict[int, KmeProcess]
    sae_kme: dict[int, int]  # SAE ID -> KME ID
    network: Network | None = None
    links: dict[tuple[int, int], _LinkFolders] = field(default_factory=dict)
    verbosity: int = 0
    event_loop: str = "auto"  # KME processes: "auto" (uvloop when installed), "uvloop" or "asyncio"
    # KMEs in their own process group: a Ctrl-C in the terminal reaches the supervisor alone (it stops them).
    process_group: bool = False

    # --- building ------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        store: str | Mapping[int, str] = "sqlite",
        saes: Mapping[int, Sequence[int]] = DEFAULT_SAES,
        links: Sequence[tuple[int, int]] | None = None,
        initial_key_bytes: int = 1 << 20,
        local_key_bytes: int | None = None,
        block_size: int = 32,
        service: Mapping[str, Any] | None = None,
        sae_interface: Mapping[str, Any] | None = None,
        delete_after_import: bool = False,
        peer_timeout: float = 3.0,
        sweep_interval: float = 1.0,
        ingest_interval: float = 0.2,
        key_type: str = "ec-p256",
        verbosity: int = 0,
        event_loop: str = "auto",
        kme_config: Mapping[str, Any] | None = None,
        site_config: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> Testbed:
        """Write PKI, configs and key folders under ``root`` (nothing runs until :meth:`start`).

        ``store``: "sqlite" (a file per KME), "memory" (in-memory SQLite: lost on restart) or a mapping
        KME ID -> store URL (e.g. two PostgreSQL databases). ``service``: extra ``[service]`` settings such
        as ``max_key_per_request`` or ``reservation_ttl``; ``sae_interface``: extra ``[sae_interface]``
        settings (connection caps). ``local_key_bytes`` defaults to ``initial_key_bytes``. The files are
        written by :func:`qkdtls.provision.provision`.

        ``saes``: KME ID -> its SAE IDs, one site per KME (named site A, B, ... in this order); ``links``:
        the QKD links (default: the one link of two sites; required for more). ``initial_key_bytes`` go
        to every link, ``local_key_bytes`` to every local link. ``kme_config`` / ``site_config``: TOML
        tables merged into every configuration / into one KME's (:func:`qkdtls.provision.merge_tables`).
        """
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if links is None:
            if len(saes) != 2:
                raise TestbedError(f"{len(saes)} sites: say which pairs share a QKD link (links=...)")
            first, second = saes
            links = [(first, second)]
        site_config = site_config or {}
        unknown = sorted(set(site_config) - set(saes))
        if unknown:
            raise TestbedError(f"site_config names KME {unknown[0]}, which is not one of the sites")
        sites = [
            Site(
                kme_id=k,
                saes={s: 0x5AE0_0000_0000 + s for s in ids},
                nickname=site_name(i, k),
                sae_port=free_port(),
                inter_kme_port=free_port(),
                extra=dict(site_config.get(k, {})),
            )
            for i, (k, ids) in enumerate(saes.items())
        ]
        settings = KmeSettings(
            store=store,
            block_size=block_size,
            service=dict(service or {}),
            sae_interface=dict(sae_interface or {}),
            delete_after_import=delete_after_import,
            peer_timeout=peer_timeout,
            sweep_interval=sweep_interval,
            ingest_interval=ingest_interval,
            extra=dict(kme_config or {}),
        )
        try:
            network = provision(root, sites, links, settings, key_type=key_type)
        except ValueError as exc:
            raise TestbedError(str(exc)) from None
        kmes = {
            site.kme_id: KmeProcess(
                kme_id=site.kme_id,
                config=network.configs[site.kme_id],
                ready_file=root / f"kme{site.kme_id}.ready.json",
                log=root / f"kme{site.kme_id}.log",
                sae_port=site.sae_port,
                inter_kme_port=site.inter_kme_port,
            )
            for site in sites
        }
        bed = cls(
            root=root,
            pki=network.pki,
            kmes=kmes,
            sae_kme={s: k for k, ids in saes.items() for s in ids},
            network=network,
            verbosity=verbosity,
            event_loop=event_loop,
        )
        bed.links = {link: _LinkFolders(folders) for link, folders in network.folders.items()}

        if initial_key_bytes:
            for link in network.links:
                bed.add_key_material(initial_key_bytes, link=link)
        local = initial_key_bytes if local_key_bytes is None else local_key_bytes
        if local:
            for kme_id in kmes:
                if (kme_id, kme_id) in bed.links:
                    bed.add_key_material(local, link=(kme_id, kme_id))
        return bed

    # --- key material --------------------------------------------------------------------------------------

    def add_key_material(
        self, nbytes: int, *, link: tuple[int, int] = (1, 2), data: bytes | None = None
    ) -> bytes:
        """Write one new key file with identical bytes into every folder of ``link``; returns the bytes.

        Follows the folder rule of docs/design.md: written under a ``.part`` name, then renamed to ``*.key``.
        ``link=(k, k)`` is KME k's local link.
        """
        pair = (min(link), max(link))
        if pair not in self.links:
            raise TestbedError(f"no link {pair[0]}-{pair[1]} in this testbed")
        folders = self.links[pair]
        payload = secrets.token_bytes(nbytes) if data is None else data
        folders.sequence = max(folders.sequence, *(self._last_sequence(f) for f in folders.folders)) + 1
        name = f"{folders.sequence:09d}.key"
        for folder in folders.folders:
            part = folder / f".{name}.part"
            part.write_bytes(payload)
            part.replace(folder / name)
        return payload

    @staticmethod
    def _last_sequence(folder: Path) -> int:
        numbers = [int(p.stem) for p in folder.glob("*.key") if p.stem.isdigit()]
        return max(numbers, default=0)

    # --- processes -----------------------------------------------------------------------------------------

    def command(self, kme_id: int) -> list[str]:
        kme = self.kmes[kme_id]
        # `python -m qkdtls.cli.kme` is `qkdtls kme` without loading the other command groups.
        argv = [sys.executable, "-m", "qkdtls.cli.kme"]
        if self.verbosity:
            argv.append("-" + "v" * self.verbosity)
        return [
            *argv, "serve", "--config", str(kme.config), "--ready-file", str(kme.ready_file),
            "--event-loop", self.event_loop,
        ]  # fmt: skip

    def start(
        self,
        timeout: float = START_TIMEOUT,
        *,
        on_ready: Callable[[int], None] | None = None,
        redraw_ports: bool = True,
    ) -> None:
        """Start every KME that is not running and wait until all listen; on failure stop them all.

        ``on_ready(kme_id)`` is called as each KME reports ready (in the order they do).
        Ports are chosen before the KMEs bind them, so another process may take one in between: when a KME
        exits because its port is in use and nothing ran yet, every port is drawn again, the configurations
        are rewritten and the KMEs started again (a few times; not with ``redraw_ports=False``)."""
        fresh = not any(kme.running for kme in self.kmes.values())
        for attempt in range(PORT_ATTEMPTS):
            try:
                pending = [kme_id for kme_id in self.kmes if not self.kmes[kme_id].running]
                for kme_id in pending:
                    self._spawn(kme_id)
                self._wait_all(pending, time.monotonic() + timeout, on_ready)
                return
            except _PortTaken:
                self.stop()
                if not (fresh and redraw_ports) or attempt == PORT_ATTEMPTS - 1 or self.network is None:
                    raise
                self._new_ports()
            except BaseException:
                self.stop()
                raise

    def _wait_all(
        self, kme_ids: Sequence[int], deadline: float, on_ready: Callable[[int], None] | None
    ) -> None:
        pending = list(kme_ids)
        started = time.monotonic()
        while pending:
            for kme_id in list(pending):
                if self._is_ready(kme_id, started):
                    pending.remove(kme_id)
                    if on_ready is not None:
                        on_ready(kme_id)
            if pending and time.monotonic() > deadline:
                raise self._not_ready(pending[0], time.monotonic() - started)
            if pending:
                time.sleep(0.02)

    def _new_ports(self) -> None:
        assert self.network is not None
        ports = {kme_id: (free_port(), free_port()) for kme_id in self.kmes}
        self.network.set_ports(ports)
        for kme_id, (sae_port, inter_port) in ports.items():
            self.kmes[kme_id].sae_port, self.kmes[kme_id].inter_kme_port = sae_port, inter_port

    def start_kme(self, kme_id: int, timeout: float = START_TIMEOUT) -> None:
        if not self.kmes[kme_id].running:
            self._spawn(kme_id)
        try:
            self._wait_ready(kme_id, time.monotonic() + timeout)
        except BaseException:
            self.kill(kme_id)
            raise

    def _spawn(self, kme_id: int) -> None:
        kme = self.kmes[kme_id]
        with contextlib.suppress(FileNotFoundError):
            kme.ready_file.unlink()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with kme.log.open("ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            kme.proc = subprocess.Popen(
                self.command(kme_id),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=self.process_group,
            )

    def _wait_ready(self, kme_id: int, deadline: float) -> None:
        started = time.monotonic()
        while not self._is_ready(kme_id, started):
            if time.monotonic() > deadline:
                raise self._not_ready(kme_id, time.monotonic() - started)
            time.sleep(0.02)

    def _not_ready(self, kme_id: int, seconds: float) -> TestbedError:
        kme = self.kmes[kme_id]
        pid = kme.proc.pid if kme.proc is not None else None
        return TestbedError(
            f"KME {kme_id} (pid {pid}, still running) wrote no ready file {kme.ready_file} within "
            f"{seconds:.1f} s; log {kme.log}:\n{self.log_tail(kme_id)}"
        )

    def _is_ready(self, kme_id: int, started: float) -> bool:
        """Whether the KME wrote its ready file; raises (naming it, its exit code and log) if it exited."""
        kme = self.kmes[kme_id]
        assert kme.proc is not None
        if kme.proc.poll() is not None:
            tail = self.log_tail(kme_id)
            error = _PortTaken if "address already in use" in tail.lower() else TestbedError
            raise error(
                f"KME {kme_id} exited with {kme.proc.returncode} (exit code of "
                f"{' '.join(self.command(kme_id)[1:])}) after {time.monotonic() - started:.1f} s; "
                f"log {kme.log}:\n{tail}"
            )
        try:
            doc = json.loads(kme.ready_file.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("pid") == kme.proc.pid

    def log_tail(self, kme_id: int, lines: int = 40) -> str:
        try:
            text = self.kmes[kme_id].log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM every KME, wait (bounded), then SIGKILL what is left."""
        for kme in self.kmes.values():
            if kme.running and kme.proc is not None:
                kme.proc.send_signal(signal.SIGTERM)
        for kme_id in self.kmes:
            self._reap(kme_id, STOP_TIMEOUT)

    def stop_kme(self, kme_id: int) -> None:
        kme = self.kmes[kme_id]
        if kme.running and kme.proc is not None:
            kme.proc.send_signal(signal.SIGTERM)
        self._reap(kme_id, STOP_TIMEOUT)

    def _reap(self, kme_id: int, timeout: float) -> None:
        proc = self.kmes[kme_id].proc
        if proc is None:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def kill(self, kme_id: int) -> None:
        """SIGKILL, as a crash or power loss would stop it."""
        proc = self.kmes[kme_id].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._reap(kme_id, STOP_TIMEOUT)

    def restart(self, kme_id: int, timeout: float = START_TIMEOUT) -> None:
        """Stop the KME if it runs (SIGTERM) and start it again on the same ports."""
        self.stop_kme(kme_id)
        self.start_kme(kme_id, timeout)

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what clients need ---------------------------------------------------------------------------------

    def kme_of(self, sae_id: int) -> int:
        return self.sae_kme[sae_id]

    def sae_url(self, kme_id: int) -> str:
        """Base URL of a KME's SAE interface (append /api/v1/...)."""
        return f"https://{LOOPBACK}:{self.kmes[kme_id].sae_port}"

    def inter_kme_url(self, kme_id: int) -> str:
        return f"https://{LOOPBACK}:{self.kmes[kme_id].inter_kme_port}"

    def sae_credentials(self, sae_id: int) -> tuple[Path, Path, Path]:
        """(client cert, client key, CA of its KME's server certificate) for an SAE."""
        zone = self.pki.zones[self.sae_kme[sae_id]]
        issued = zone.saes[sae_id]
        return issued.cert, issued.key, zone.ca

    def admin_credentials(self, kme_id: int) -> tuple[Path, Path, Path]:
        zone = self.pki.zones[kme_id]
        return zone.admin.cert, zone.admin.key, zone.ca

    def app_server_credentials(self, sae_id: int) -> tuple[Path, Path, Path]:
        """(server cert, key, CA) for a TLS server run by this SAE's application."""
        zone = self.pki.zones[self.sae_kme[sae_id]]
        issued = zone.app_servers[sae_id]
        return issued.cert, issued.key, zone.ca

    def config_path(self, kme_id: int) -> Path:
        return self.kmes[kme_id].config

    def pid(self, kme_id: int) -> int | None:
        return self.kmes[kme_id].pid
