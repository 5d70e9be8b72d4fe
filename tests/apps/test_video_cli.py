"""``qkdtls video serve`` and ``qkdtls video send``: a call between two processes over TLS-QKD."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

from qkdtls.apps.demo import SITE_A_SAE, SITE_B_SAE, DemoSites


def _kme_args(sites: DemoSites, sae: int) -> list[str]:
    tb = sites.testbed
    cert, key, ca = tb.sae_credentials(sae)
    return ["--kme", tb.sae_url(tb.kme_of(sae)), "--kme-cert", str(cert), "--kme-key", str(key),
            "--kme-ca", str(ca), "--qkd", "required"]


def _read_until(proc: subprocess.Popen[bytes], pattern: bytes, timeout: float) -> bytes:
    assert proc.stderr is not None
    output = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, output):
        assert time.monotonic() < deadline, output.decode()
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk, output.decode()
            output += chunk
    return output


def test_serve_and_send(qkd_sites: DemoSites) -> None:
    tb = qkd_sites.testbed
    app_cert, app_key, _ = tb.app_server_credentials(SITE_B_SAE)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    serve = subprocess.Popen(
        [sys.executable, "-m", "qkdtls", "video", "serve", "--cert", str(app_cert), "--key", str(app_key),
         "--display", "none", *_kme_args(qkd_sites, SITE_B_SAE)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        banner = _read_until(serve, rb"receiving calls on 127\.0\.0\.1:\d+", 30)
        port = re.search(rb"127\.0\.0\.1:(\d+)", banner).group(1).decode()
        send = subprocess.run(
            [sys.executable, "-m", "qkdtls", "video", "send", f"127.0.0.1:{port}",
             "--servername", "localhost", "--target-sae", str(SITE_B_SAE),
             "--cafile", str(tb.pki.trust_bundle), "--duration", "1",
             *_kme_args(qkd_sites, SITE_A_SAE)],
            capture_output=True, timeout=60, env=env,
        )
        assert send.returncode == 0, send.stderr.decode()
        result = json.loads(send.stdout)
        assert result["connection"]["mode"] == "qkd" and result["connection"]["profile"] == "secure"
        assert result["sender"]["frames_sent"] >= 15 and result["sender"]["error"] is None
        deadline = time.monotonic() + 15
        assert serve.stdout is not None
        line = b""
        while b"\n" not in line and time.monotonic() < deadline:
            ready, _, _ = select.select([serve.stdout], [], [], 0.5)
            if ready:
                line += os.read(serve.stdout.fileno(), 4096)
        text = line.decode()
        assert text.startswith(f"call1-from-SAE-{SITE_A_SAE}: "), text
        frames = int(re.search(r"(\d+) frames 1280x720", text).group(1))
        assert frames >= 10 and "order errors 0" in text
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=30)
    assert serve.returncode == 0
