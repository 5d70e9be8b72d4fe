"""`qkdtls demo --network`: TLS-QKD between the two end sites of the chain of four (three QKD links apart),
every key relayed by the two KMEs between them, and the paths shown from the first KME's relay statistics;
then the same with keys spread over the two disjoint paths of the ring of five."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from qkdtls.apps.network_demo import endpoints
from qkdtls.network.topology import example_path, load_topology


def _demo(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdtls", "demo", "--network", *argv],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_tls_qkd_three_links_apart_shows_the_relay_paths(tmp_path: Path) -> None:
    done = _demo("--dir", str(tmp_path / "net"), "--handshakes", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "SAE 1001 at site A (KME 1) -> SAE 4001 at site D (KME 4): 3 QKD links apart" in out
    assert len(re.findall(r"TLS-QKD handshake #\d: mode qkd, profile secure, key [0-9a-f-]{36}", out)) == 2
    assert re.search(r"HTTPS GET /status: 200 .* saw mode qkd, key [-0-9a-f]{36}, peer SAE 1001", out)
    relays = re.findall(r"trusted +(\d+) key\(s\) over (.*?)  \((\w+)\)", out)
    assert relays and {(path, outcome) for _, path, outcome in relays} == {("1 -> 2 -> 3 -> 4", "delivered")}
    # Every key reached the server through a relay: at least the handshakes' and the GET's keys were relayed.
    assert sum(int(n) for n, _, _ in relays) >= 3
    assert re.search(r"link material spent by relays .*1-2: \d+ B, 2-3: \d+ B, 3-4: \d+ B", out)
    assert "everything stopped" in out
    assert (tmp_path / "net" / "logs" / "kme2.log").stat().st_size > 0  # the network ran in --dir


def test_spread_over_the_ring_uses_two_disjoint_paths(tmp_path: Path) -> None:
    assert endpoints(load_topology(example_path("ring-5"))) == (1, 3, 2)  # farthest: two links
    assert endpoints(load_topology(example_path("spread-8"))) == (1, 8, 3)
    done = _demo("--topology", "ring-5", "--mode", "spread", "--handshakes", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    relays = re.findall(r"spread +\d+ key\(s\) over (.*?)  \((\w+)\)", done.stdout)
    assert relays and all(r == ("1 -> 2 -> 3 | 1 -> 5 -> 4 -> 3", "delivered") for r in relays), done.stdout
