"""From `qkdtls pki init` to running KMEs without writing a configuration by hand: three zones, two links,
configurations checked by `qkdtls kme check-config`, KME processes started from them, `qkdtls qkd-link`
feeding the link folders, and key cycles across both links."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkdtls.etsi014.client import KmeClient, KmeClientSettings
from qkdtls.pki import PkiLayout
from qkdtls.provision import KmeSettings, ProvisionError, Site, provision
from qkdtls.testbed import free_port_run

START_TIMEOUT = 60.0


def _qkdtls(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdtls.cli.main", *argv], capture_output=True, text=True, timeout=timeout
    )


def _start(config: Path, ready: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qkdtls.cli.kme",
                "serve",
                "--config",
                str(config),
                "--ready-file",
                str(ready),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{log.stem} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{log.stem} not ready after {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_pki_init_to_key_cycles_across_three_sites(tmp_path: Path) -> None:
    root = tmp_path / "net"
    base = free_port_run(6)  # below the ephemeral range: no outgoing socket takes one meanwhile
    zones = ("--zone", "1:1001", "--zone", "2:2001", "--zone", "3:3001")
    links = ("--link", "1-2", "--link", "2-3")
    init = _qkdtls("pki", "init", str(root), *zones, *links, "--base-port", str(base))
    assert init.returncode == 0, init.stderr
    for kme in (1, 2, 3):
        check = _qkdtls("kme", "check-config", str(root / f"kme{kme}.toml"))
        assert check.returncode == 0 and "OK" in check.stdout, check.stderr
    # Only linked zones trust each other: KME 1 and KME 3 share no link.
    assert "link-3" not in (root / "kme1.toml").read_text()
    assert not (root / "keys" / "kme1" / "link-3").exists()

    for a, b in ((1, 2), (2, 3)):
        feed = _qkdtls(
            "qkd-link", "--bytes", "64K", "-q", str(root / "keys" / f"kme{a}" / f"link-{b}"),
            str(root / "keys" / f"kme{b}" / f"link-{a}"),
        )  # fmt: skip
        assert feed.returncode == 0, feed.stderr
    procs: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for kme in (1, 2, 3):
            procs[kme] = _start(root / f"kme{kme}.toml", root / f"kme{kme}.ready", root / f"kme{kme}.log")
        for kme, proc in procs.items():
            _wait_ready(proc, root / f"kme{kme}.ready", root / f"kme{kme}.log")
        layout = PkiLayout.load(root)
        ports = {k: json.loads((root / f"kme{k}.ready").read_text())["sae_port"] for k in procs}

        def client(sae: int, kme: int) -> KmeClient:
            issued = layout.zones[kme].saes[sae]
            url = f"https://127.0.0.1:{ports[kme]}"
            return KmeClient(
                KmeClientSettings(url, issued.cert, issued.key, layout.zones[kme].ca, timeout=10.0)
            )

        for master, master_kme, slave, slave_kme in ((1001, 1, 2001, 2), (3001, 3, 2001, 2)):
            with client(master, master_kme) as m, client(slave, slave_kme) as s:
                got = m.enc_keys(str(slave), number=2)
                again = s.dec_keys(str(master), [k.key_ID for k in got.keys])
                assert [k.key for k in again.keys] == [k.key for k in got.keys] and len(got.keys) == 2
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_bad_networks_are_refused(tmp_path: Path) -> None:
    sites = [Site(1, {1001: 5}), Site(2, {2001: 6})]
    for links, message in (
        ([(1, 1)], "local link"),
        ([(1, 3)], "not one of the sites"),
        ([(1, 2), (2, 1)], "twice"),
    ):
        with pytest.raises(ProvisionError, match=message):
            provision(tmp_path / "n", sites, links)
    with contextlib.suppress(ProvisionError), pytest.raises(ProvisionError, match="unknown store"):
        provision(tmp_path / "m", sites, [(1, 2)], KmeSettings(store="mysql"))
