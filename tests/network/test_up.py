"""`qkdtls network up` on the chain of four: progress while it starts, what a user needs printed, the links
feeding the KMEs, a key relayed from site A to site D, the live map through the loopback proxy (screenshot in
headless Chromium) with the relay's path and a killed KME's link shown down, nothing restarted, and Ctrl-C
leaving no KME process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from tests.network.conftest import browse, colour_count

from qkdtls.etsi014.client import KmeClient, KmeClientSettings
from qkdtls.network.runner import load_run_file
from qkdtls.network.topology import example_path
from qkdtls.pki import PkiLayout
from qkdtls.testbed import free_port, free_port_run

RED, GREEN = (214, 39, 40), (44, 160, 44)
BOUND = 60.0  # seconds: generous on a loaded 2-core machine


class Output:
    """The lines a child process printed so far (read by a thread: the child never blocks on its pipe)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        self._thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + BOUND
        while needle not in self.text:
            assert proc.poll() is None or needle in self.text, f"exited with {proc.returncode}:\n{self.text}"
            assert time.monotonic() < deadline, f"no {needle!r} within {BOUND} s:\n{self.text}"
            time.sleep(0.05)


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


def _until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, f"not within {BOUND} s: {what}"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_network_up_runs_the_chain_maps_it_and_stops_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "net"
    # The shipped chain with faster link-state timers (a [kme] table of the topology): a dead KME shows soon.
    topology = tmp_path / "chain.toml"
    topology.write_text(
        example_path("chain-4").read_text() + "\n[kme.network]\nhello_interval = 0.3\ndead_interval = 1.2\n"
    )
    init = subprocess.run(
        [sys.executable, "-m", "qkdtls", "network", "init", str(topology), str(root), "--base-port",
         str(free_port_run(8))],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    map_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdtls", "network", "up", str(root), "--map-port", str(map_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    out = Output(proc)
    pids: dict[str, Any] = {}
    try:
        out.wait_for("Ctrl-C (or SIGTERM) stops every KME and link.", proc)
        text = out.text
        # Progress while starting, then per site what programs need.
        assert re.search(r"\[4/4\] KME \d \(\w\) is up", text) and text.index("[1/4]") < text.index("[4/4]")
        for kme, name in ((1, "A"), (2, "B"), (3, "C"), (4, "D")):
            assert (
                f"KME {kme} ({name}) is up" in text
                and f"site {name} — KME {kme}: SAE interface https://" in text
            )
            assert f"log {root / 'logs' / f'kme{kme}.log'}" in text
        for path in re.findall(r"--kme-(?:cert|key|ca) (\S+)", text) + re.findall(r"admin: cert (\S+)", text):
            assert Path(path).is_file(), path
        assert f"http://127.0.0.1:{map_port}/api/v1/admin/map" in text
        assert "1-2 16 KiB/s, 2-3 32 KiB/s, 3-4 16 KiB/s" in text  # the topology's rate per link

        run = load_run_file(root)
        assert run is not None and run["pid"] == proc.pid
        pids = {k: v["pid"] for k, v in run["kmes"].items()}
        assert len(pids) == 4 and all(_alive(p) for p in pids.values())
        assert [(link["between"], link["rate"]) for link in run["links"]] == [
            ([1, 2], 16384),
            ([2, 3], 32768),
            ([3, 4], 16384),
        ]
        again = subprocess.run([sys.executable, "-m", "qkdtls", "network", "up", str(root)],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (
            again.returncode == 2
            and f"is already running (qkdtls network up, pid {proc.pid})" in again.stderr
        )
        assert load_run_file(root) == run  # the running one's file is left alone
        doc_url = f"http://127.0.0.1:{map_port}/api/v1/admin/network"

        def routing() -> dict[str, Any]:
            return _get(doc_url)["routing"]

        def down() -> tuple[list[int], list[tuple[int, int]]]:
            now = routing()
            return [n["kme_id"] for n in now["nodes"] if not n["up"]], [
                (k["a"], k["b"]) for k in now["links"] if not k["up"]
            ]

        def stock() -> dict[tuple[int, int], int]:
            """Free blocks a -> b of each link as KME a reports them (its store, not the adverts)."""
            out = {}
            for a, b in ((1, 2), (2, 3), (3, 4)):
                reports = _get(f"http://127.0.0.1:{map_port}/kme/{a}/api/v1/admin/network")["links"]
                out[(a, b)] = next(r["stock_blocks"]["0"] for r in reports if r["peer_KME_ID"] == b)
            return out

        _until("every KME and link up", lambda: down() == ([], []) and len(routing()["links"]) == 3)
        first = stock()
        # The simulated links keep writing: the KMEs' stock grows.
        _until("stock grows on every link", lambda: all(n > first[link] for link, n in stock().items()))

        # A key from SAE 1001 (site A) to SAE 4001 (site D): relayed by KMEs 2 and 3, seen on the map.
        pki = PkiLayout.load(root)
        sae = pki.zones[1].saes[1001]
        settings = KmeClientSettings(
            run["kmes"]["1"]["sae_url"], sae.cert, sae.key, pki.zones[1].ca, timeout=10
        )
        with KmeClient(settings) as client:
            assert len(client.enc_keys("4001", number=2).keys) == 2

        def paths() -> list[tuple[list[list[int]], bool]]:
            return [(p["paths"], p["ok"]) for p in _get(doc_url)["relay"]["last_paths"]]

        _until("the relay in the statistics", lambda: paths() != [])  # the proxy caches for half a second
        assert paths() == [([[1, 2, 3, 4]], True)]

        os.kill(pids["4"], signal.SIGKILL)
        out.wait_for("!! KME 4 (D) exited with code -9", proc)
        _until("KME 4 and the link 3-4 down on the map", lambda: down() == ([4], [(3, 4)]))
        shot, dom = browse(f"http://127.0.0.1:{map_port}/", tmp_path, size=(1300, 700))
        for kme, name in ((1, "A"), (2, "B"), (3, "C")):
            assert f">{name}</text>" in dom and f">KME {kme}</text>" in dom and f">SAE {kme}001" in dom
        assert ">D (down)</text>" in dom and 'data-kme="4" data-state="down"' in dom
        assert re.search(r'<line\b[^>]*data-link="3-4" data-state="down"', dom)
        assert re.search(r'<line\b[^>]*data-link="1-2" data-state="(plenty|some)"', dom)
        assert "KME 4: unreachable" in dom and "KME 1: ok" in dom
        assert re.search(r'<polyline\b[^>]*data-path="1-2-3-4"', dom) and "1 → 2 → 3 → 4" in dom
        image = Image.open(shot)
        drawing = image.crop((0, 0, int(image.width * 0.68), image.height))  # the map, without the legend
        # The dashed red link 3-4 and the two green links, several hundred pixels each.
        assert colour_count(drawing, RED) > 400 and colour_count(drawing, GREEN) > 1000

        assert out.text.count("KME 4 (D) is up") == 1  # nothing restarted it
        assert not _alive(pids["4"]) and all(_alive(pids[k]) for k in ("1", "2", "3"))
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(BOUND) == 1  # a KME died while running: reported in the exit status
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "stopped; every KME process has exited" in out.text
    assert [p for p in pids.values() if _alive(p)] == []
    assert load_run_file(root) is None
