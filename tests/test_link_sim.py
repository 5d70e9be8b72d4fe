from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from qkdtls import link_sim
from qkdtls.cli import qkd_link as qkd_link_cli


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _entropy(data: bytes) -> float:
    counts = Counter(data)
    return -sum(c / len(data) * math.log2(c / len(data)) for c in counts.values())


def test_both_ends_get_identical_files_with_sequence_names(tmp_path: Path) -> None:
    a, b = tmp_path / "kme1", tmp_path / "kme2"
    link = link_sim.QkdLink(a, b)
    result = link.emit(10_000, 4096)
    assert (result.files, result.bytes, result.last_name) == (3, 10_000, "000000002.key")
    files_a, files_b = _files(a), _files(b)
    assert files_a == files_b
    assert link_sim.existing_key_files(a) == ["000000000.key", "000000001.key", "000000002.key"]
    assert [len(files_a[n]) for n in link_sim.existing_key_files(a)] == [4096, 4096, 1808]
    # Only final names and the hidden sequence record remain: no part files.
    assert set(files_a) == {"000000000.key", "000000001.key", "000000002.key", link_sim.STATE_FILE}
    assert len(set(files_a[n] for n in link_sim.existing_key_files(a))) == 3  # fresh material each file
    assert (a / "000000000.key").stat().st_mode & 0o077 == 0


def test_numbering_continues_after_existing_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "000000041.key").write_bytes(b"x" * 32)  # only one end has it: the higher of the two counts
    (a / "notes.txt").write_text("ignored")
    link = link_sim.QkdLink(a, b)
    assert link.next_name == "000000042.key"
    assert link.write_file(32) == "000000042.key"


def test_numbering_survives_deleted_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    link_sim.QkdLink(a, b).emit(96, 32)
    for folder in (a, b):  # a KME with delete_after_import removes what it imported
        for name in link_sim.existing_key_files(folder):
            (folder / name).unlink()
    assert link_sim.QkdLink(a, b).write_file(32) == "000000003.key"


def test_same_folder_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(link_sim.LinkError, match="different folders"):
        link_sim.QkdLink(tmp_path, tmp_path / "." / "")


@pytest.mark.parametrize("size", [0, link_sim.MAX_FILE_SIZE + 1])
def test_bad_file_sizes_are_refused(tmp_path: Path, size: int) -> None:
    with pytest.raises(link_sim.LinkError, match="file size"):
        link_sim.QkdLink(tmp_path / "a", tmp_path / "b").write_file(size)


def test_rate_schedule_is_pure_arithmetic() -> None:
    schedule = link_sim.RateSchedule(rate=1000)
    assert schedule.delay(elapsed=0.0, written=0, next_size=500) == pytest.approx(0.5)
    assert schedule.delay(elapsed=2.0, written=1000, next_size=500) == 0.0
    assert schedule.delay(elapsed=1.0, written=1000, next_size=1000) == pytest.approx(1.0)


def test_rate_mode_does_not_exceed_the_rate(tmp_path: Path) -> None:
    link = link_sim.QkdLink(tmp_path / "a", tmp_path / "b")
    started = time.monotonic()
    result = link.run(rate=32_000, duration=0.5, file_size=3200)
    took = time.monotonic() - started
    assert took == pytest.approx(0.5, abs=0.25)
    # 0.5 s at 32 kB/s allows 16 kB; at least a few files must have been written in that time.
    assert 3 <= result.files <= 5
    assert result.bytes == result.files * 3200 <= 16_000
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_rate_mode_stops_on_event_and_on_total(tmp_path: Path) -> None:
    link = link_sim.QkdLink(tmp_path / "a", tmp_path / "b")
    assert link.run(rate=1_000_000, total=1000, file_size=300).bytes == 1000
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    started = time.monotonic()
    result = link.run(rate=100, file_size=32, stop=stop)  # one file every 0.32 s, no duration
    timer.join()
    assert time.monotonic() - started < 1.0
    assert result.files <= 1


def test_qber_material_has_the_expected_entropy() -> None:
    healthy = link_sim.material_source(0.0)(64 * 1024)
    assert _entropy(healthy) > 7.99
    failing = link_sim.material_source(link_sim.FAIL_QBER)(64 * 1024)
    expected = link_sim.shannon_entropy_per_byte(0.5 + link_sim.FAIL_QBER)
    assert expected == pytest.approx(2.29, abs=0.01)
    assert _entropy(failing) == pytest.approx(expected, abs=0.1)
    with pytest.raises(link_sim.LinkError):
        link_sim.material_source(0.6)


def test_failing_link_still_writes_identical_files(tmp_path: Path) -> None:
    link = link_sim.QkdLink(tmp_path / "a", tmp_path / "b", qber=0.5)
    link.emit(256, 128)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    assert files["000000000.key"] == bytes(128)  # every bit 0: zero entropy


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    qkd_link_cli.register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_cli_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli("qkd-link", str(a), str(b), "--bytes", "10K", "--file-size", "4K") == 0
    out = capsys.readouterr().out
    assert "wrote 3 files, 10.0 KiB to each folder" in out
    assert (
        link_sim.existing_key_files(a)
        == link_sim.existing_key_files(b)
        == [
            "000000000.key",
            "000000001.key",
            "000000002.key",
        ]
    )


def test_cli_requires_an_amount(tmp_path: Path) -> None:
    from qkdtls.cli.main import UserError

    with pytest.raises(UserError, match="--bytes"):
        _cli("qkd-link", str(tmp_path / "a"), str(tmp_path / "b"))
    assert qkd_link_cli.parse_size("1.5MiB") == 1536 * 1024
    with pytest.raises(argparse.ArgumentTypeError):
        qkd_link_cli.parse_size("lots")


def test_cli_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    script = textwrap.dedent(
        f"""
        import argparse, sys
        from qkdtls.cli import qkd_link
        parser = argparse.ArgumentParser()
        qkd_link.register(parser.add_subparsers())
        args = parser.parse_args(["qkd-link", {str(a)!r}, {str(b)!r}, "--rate", "64K", "--file-size", "4K"])
        sys.exit(args.func(args))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 10
        while not (a.exists() and link_sim.existing_key_files(a)) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "(stopped)" in out
    assert link_sim.existing_key_files(a) == link_sim.existing_key_files(b) != []
    assert not [p for p in a.iterdir() if p.name.endswith(".part")]
