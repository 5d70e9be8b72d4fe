"""The testbed's start-up: ports taken between drawing and binding are drawn again; failures say which KME
did not start, its exit code and its log."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from qkdtls.kme.config import load_config
from qkdtls.testbed import Testbed, TestbedError


def test_a_port_taken_before_the_first_start_is_drawn_again(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=1024)
    taken = bed.kmes[2].inter_kme_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with bed:
            assert bed.kmes[2].inter_kme_port != taken
            # Both configurations name the new port (KME 1 calls KME 2 there).
            peer = load_config(bed.config_path(1)).peers[0]
            assert peer.url.endswith(f":{bed.kmes[2].inter_kme_port}")
            assert bed.pid(1) is not None and bed.pid(2) is not None
    assert "address already in use" in bed.log_tail(2).lower()


def test_a_kme_that_cannot_start_is_named_with_its_exit_code_and_log(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=1024)
    bed.config_path(2).write_text(bed.config_path(2).read_text().replace("[kme]", "[kme]\nbogus = 1"))
    with pytest.raises(TestbedError, match=r"(?s)KME 2 exited with 2 .*kme\.bogus: unknown field"):
        bed.start(timeout=60)
    assert bed.pid(1) is None and bed.pid(2) is None
