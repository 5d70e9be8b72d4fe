"""The paper's handshake benchmark in quick form: every variant runs, in the right mode, through the relay."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from PIL import Image

from qkdtls.apps.paper_bench import VARIANTS, BenchSettings, add_arguments, run_benchmark, settings_from


def test_quick_benchmark_measures_every_variant(tmp_path: Path) -> None:
    lines: list[str] = []
    rtt = 2.0
    results = run_benchmark(BenchSettings(runs=1, rtts=(0.0, rtt), out=tmp_path), progress=lines.append)
    assert {(s.rtt_ms, s.variant.key) for s in results} == {(r, v.key) for r in (0.0, rtt) for v in VARIANTS}
    by = {(s.rtt_ms, s.variant.key): s for s in results}
    for (rtt_ms, key), series in by.items():
        run = series.runs[0]
        assert run.mode == ("classic" if key.startswith("tls13") else "qkd")
        assert run.sae_link.flights >= 4  # ClientHello, server flight, Finished + request, answer
        if rtt_ms == rtt:
            # Floors no implementation can beat, in round trips across the emulated link: TCP, TLS and the
            # request (3); the reference profile's ChallengeAck (+1); cold, the master KME's new inter-KME
            # connection (TCP, TLS) and the reservation (+3).
            floor = 3 + key.startswith("reference") + 3 * key.endswith("cold")
            assert run.ms >= floor * rtt, (key, run.ms)
            assert series.measured_rtt_ms >= rtt
    for key in ("secure-cold", "reference-cold"):
        run = by[(rtt, key)].runs[0]
        assert run.kme_link.connections >= 1  # the inter-KME connection was dropped before the run
        assert run.client_kme_connections >= 1 and run.server_kme_connections >= 1
    for key in ("secure-warm", "reference-warm"):
        run = by[(rtt, key)].runs[0]
        assert run.kme_link.connections == 0
        assert run.client_kme_connections == run.server_kme_connections == 0
        assert run.server_kme_requests == 1  # dec_keys
    assert by[(rtt, "tls13")].runs[0].kme_link.chunks == 0
    # The messages besides the SAE link's chunks (how TCP coalesced the TLS flights varies with the load):
    # the cold variant adds connections, the warm one its KME request, against classic TLS 1.3.
    beyond = {
        k: by[(rtt, k)].to_json()["messages_estimate"] - by[(rtt, k)].to_json()["sae_link_chunks"]
        for k in ("secure-cold", "secure-warm", "tls13")
    }
    assert beyond["secure-cold"] > beyond["secure-warm"] > beyond["tls13"], beyond
    table = (tmp_path / "paper_handshake.md").read_text()
    assert table.count("| TLS-QKD secure, kept-alive + prefetch |") == 2
    assert "Paper (≈1 ms RTT, 10 runs)" in table
    with Image.open(tmp_path / "paper_handshake.png") as plot:
        assert plot.format == "PNG" and plot.width > 500
    assert any(line.startswith("RTT 2 ms") for line in lines)


def test_command_line_settings() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    quick = settings_from(parser.parse_args(["--quick"]))
    assert (quick.runs, quick.rtts) == (2, (0.0, 1.0))
    full = settings_from(parser.parse_args([]))
    assert (full.runs, full.rtts, full.store) == (10, (0.0, 1.0, 10.0), "sqlite")
    with pytest.raises(ValueError):
        settings_from(parser.parse_args(["--rtt", "-1"]))
