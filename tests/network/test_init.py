"""`qkdtls network init`: from a topology to a network folder whose every generated configuration passes
`qkdtls kme check-config`, with the PKI, the key folders and their first key material, and the manifest."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qkdtls.kme.config import load_config
from qkdtls.network.build import BuildError, build_network
from qkdtls.network.layout import LayoutError, NetworkLayout
from qkdtls.network.topology import example_path, load_topology, parse_topology


def _qkdtls(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdtls", *argv], capture_output=True, text=True, timeout=120
    )


def test_init_of_the_paper_network_writes_configurations_the_kme_accepts(tmp_path: Path) -> None:
    root = tmp_path / "net"
    init = _qkdtls("network", "init", "spread-8", str(root), "--base-port", "24480")
    assert init.returncode == 0, init.stderr
    assert "next: qkdtls network up" in init.stdout
    layout = NetworkLayout.load(root)
    assert [s.kme_id for s in layout.sites] == list(range(1, 9))
    assert len(layout.links) == 13 and layout.site(8).sae_port == 24480 + 14
    # The KME's own command accepts every generated file (one process checks them all, as an operator would).
    configs = [str(p) for p in sorted(root.glob("kme*.toml"))]
    script = "import sys\nfrom qkdtls.cli.kme import main\n"
    script += "sys.exit(max(main(['check-config', f]) for f in sys.argv[1:]))"
    check = subprocess.run(
        [sys.executable, "-c", script, *configs], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.count(": OK") == 8, check.stdout
    kme1 = load_config(root / "kme1.toml")
    assert sorted(p.kme_id for p in kme1.peers) == [2, 3, 4] and kme1.nickname == "KME1"
    # Links start with key material at both ends (identical files), and the KMEs delete what they imported.
    for link in layout.links:
        a, b = link.folders
        names = sorted(p.name for p in a.glob("*.key"))
        assert names and names == sorted(p.name for p in b.glob("*.key"))
        assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
        assert sum((a / n).stat().st_size for n in names) == 256 * 1024
    assert all(p.delete_after_import for p in kme1.peers)
    assert (root / "topology.toml").read_text() == example_path("spread-8").read_text()
    assert (root / "pki" / "trust-bundle.pem").is_file() and (root / "logs").is_dir()


def test_kme_tables_of_the_topology_reach_the_configurations(tmp_path: Path) -> None:
    text = example_path("chain-4").read_text()
    text += "\n[kme.service]\nreservation_ttl = 33.0\n"
    text = text.replace("saes = [2001]\n", "saes = [2001]\n[sites.kme.service]\nmax_key_per_request = 7\n", 1)
    topology = parse_topology(text, origin="chain.toml", base_port_override=24440)
    build_network(topology, tmp_path / "net", topology_text=text)
    configs = {k: load_config(tmp_path / "net" / f"kme{k}.toml") for k in (1, 2, 3, 4)}
    assert {c.service.reservation_ttl for c in configs.values()} == {33.0}
    assert [c.service.max_key_per_request for c in configs.values()].count(7) == 1
    assert configs[2].service.max_key_per_request == 7
    doc = tomllib.loads((tmp_path / "net" / "kme2.toml").read_text())
    assert doc["kme"] == {"id": 2, "nickname": "B"}


def test_init_refuses_what_the_kme_would_refuse_and_busy_folders(tmp_path: Path) -> None:
    bad = example_path("chain-4").read_text() + "\n[kme.service]\nblock_sise = 64\n"
    with pytest.raises(
        BuildError,
        match=r"KME 1 is refused: .*kme1.toml: service.block_sise: unknown field.*"
        r"\[kme\] and \[sites.kme\] tables",
    ):
        build_network(parse_topology(bad, origin="bad.toml"), tmp_path / "bad")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(BuildError, match="not an empty folder"):
        build_network(load_topology(example_path("chain-4")), tmp_path / "busy")
    busy = _qkdtls("network", "init", "chain-4", str(tmp_path / "busy"))
    assert busy.returncode == 2 and "not an empty folder" in busy.stderr
    missing = _qkdtls("network", "init", str(tmp_path / "nope.toml"), str(tmp_path / "x"))
    assert missing.returncode == 2 and "nope.toml: cannot read" in missing.stderr
    with pytest.raises(LayoutError, match="network init"):
        NetworkLayout.load(tmp_path / "busy")
    up = _qkdtls("network", "up", str(tmp_path / "busy"))
    assert up.returncode == 2 and "holds no network" in up.stderr
