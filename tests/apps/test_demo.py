"""``qkdtls demo`` runs, reports the right facts, cleans up (so it can run again at once); --keep works."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qkdtls.apps.demo import demo, format_report


def test_demo_runs_twice_in_a_row_and_reports(tmp_path: Path) -> None:
    for attempt in range(2):
        lines: list[str] = []
        report = demo(tmp_path / f"run{attempt}", handshakes=2, call_seconds=1.0, progress=lines.append)
        assert [h.mode for h in report.handshakes] == ["qkd", "qkd"]
        assert {h.profile for h in report.handshakes} == {"secure"}
        key_ids = [h.key_id for h in report.handshakes]
        assert len(set(key_ids)) == 2 and all(key_ids)
        assert report.https["status"] == 200 and report.https["peer_SAE_ID"] == 1001
        assert [d.name for d in report.call] == ["A-to-B", "B-to-A"]
        for d in report.call:
            assert d.receiver.stats.frames_decoded > 0 and d.receiver.stats.order_errors == 0
        assert len(report.stock) == 2 and all(count > 0 for count in report.stock.values())
        summary = format_report(report)
        assert summary in lines
        for key_id in key_ids:
            assert key_id in summary
        assert "SAE 1001 (site A) -> SAE 2001 (site B): mode qkd, profile secure" in summary
        assert re.search(r"key stock left: KME 1 for SAE 1001 -> SAE 2001: \d+ keys", summary)
        assert "everything stopped" in lines[-1]
    # Every KME of both runs is gone.
    for ready in tmp_path.glob("run*/kme*.ready.json"):
        pid = json.loads(ready.read_text())["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_demo_refuses_a_folder_in_use(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    with pytest.raises(FileExistsError):
        demo(tmp_path, progress=lambda _: None)


def test_demo_keep_serves_until_terminated(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdtls", "demo", "--keep", "--dir", str(tmp_path / "bed"),
         "--handshakes", "1", "--call-seconds", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    output = b""
    deadline = time.monotonic() + 60
    try:
        while b"Ctrl-C stops it" not in output or b"classic TLS 1.3 to the same server" not in output:
            assert time.monotonic() < deadline, output.decode()
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, output.decode()
                output += chunk
        text = output.decode()
        url = re.search(r"HTTPS over TLS-QKD \(SAE 2001\): (\S+)", text).group(1)
        assert "qkdtls s_client" in text and "KME 1 (site A): https://127.0.0.1:" in text
        ctx = ssl.create_default_context(cafile=str(tmp_path / "bed" / "pki" / "trust-bundle.pem"))
        with urllib.request.urlopen(url + "status", context=ctx, timeout=10) as answer:
            assert json.load(answer)["mode"] == "classic"
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest.decode()
    assert b"everything stopped" in rest
