"""HTTPS over TLS-QKD on the two-site testbed: our client, curl (classic) and the CLI commands."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from qkdtls.apps.demo import SITE_A_SAE, SITE_B_SAE, DemoSites
from qkdtls.apps.https import HttpsServer, https_get


@pytest.fixture
def server(qkd_sites: DemoSites) -> Iterator[HttpsServer]:
    with HttpsServer(qkd_sites.b.server, handshake_timeout=5, idle_timeout=5) as srv:
        yield srv


def test_get_over_tls_qkd_names_the_key_on_both_sides(qkd_sites: DemoSites, server: HttpsServer) -> None:
    response = https_get(server.url + "status", qkd_sites.a.client, SITE_B_SAE)
    assert response.status == 200
    seen_by_server = response.json()
    assert seen_by_server["mode"] == response.connection["mode"] == "qkd"
    assert seen_by_server["profile"] == "secure"
    assert seen_by_server["peer_SAE_ID"] == SITE_A_SAE
    assert seen_by_server["key_ID"] == response.connection["key_ID"]
    again = https_get(server.url + "status", qkd_sites.a.client, SITE_B_SAE)
    assert again.connection["key_ID"] != response.connection["key_ID"]  # one key per connection
    page = https_get(server.url, qkd_sites.a.client, SITE_B_SAE)
    assert b"qkd" in page.body and page.headers["content-type"].startswith("text/html")


def test_curl_gets_classic_tls_from_the_same_server(qkd_sites: DemoSites, server: HttpsServer) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is required (scripts/install-system-deps.sh installs it)"
    out = subprocess.run(
        [curl, "-sS", "--max-time", "10", "--cacert", str(qkd_sites.testbed.pki.trust_bundle),
         server.url + "status"],
        capture_output=True, timeout=20, check=True,
    )
    status = json.loads(out.stdout)
    assert status["mode"] == "classic" and status["key_ID"] is None


def test_https_get_command(qkd_sites: DemoSites, server: HttpsServer) -> None:
    tb = qkd_sites.testbed
    cert, key, ca = tb.sae_credentials(SITE_A_SAE)
    out = subprocess.run(
        [sys.executable, "-m", "qkdtls", "https-get", server.url + "status", "--target-sae", str(SITE_B_SAE),
         "--cafile", str(tb.pki.trust_bundle), "--qkd", "required", "--kme", tb.sae_url(1),
         "--kme-cert", str(cert), "--kme-key", str(key), "--kme-ca", str(ca)],
        capture_output=True, timeout=60, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stdout)["mode"] == "qkd"
    assert b"HTTP 200" in out.stderr and b"mode qkd, profile secure" in out.stderr


def test_https_get_command_reports_missing_kme_options(server: HttpsServer) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qkdtls", "https-get", server.url, "--cafile", "/nonexistent",
         "--qkd", "required"],
        capture_output=True, timeout=60,
    )
    assert out.returncode == 2
    assert b"--qkd required needs --kme" in out.stderr


def test_https_server_command(qkd_sites: DemoSites) -> None:
    tb = qkd_sites.testbed
    cert, key, ca = tb.sae_credentials(SITE_B_SAE)
    app_cert, app_key, _ = tb.app_server_credentials(SITE_B_SAE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdtls", "https-server", "--cert", str(app_cert), "--key", str(app_key),
         "--kme", tb.sae_url(2), "--kme-cert", str(cert), "--kme-key", str(key), "--kme-ca", str(ca)],
        stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert proc.stderr is not None
        banner = b""
        deadline = time.monotonic() + 30
        while b"Ctrl-C" not in banner:
            assert time.monotonic() < deadline and proc.poll() is None, banner.decode()
            if select.select([proc.stderr], [], [], 0.5)[0]:
                banner += os.read(proc.stderr.fileno(), 4096)
        url = re.search(rb"serving (\S+) ", banner).group(1).decode()
        status = https_get(url + "status", qkd_sites.a.client, SITE_B_SAE).json()
        assert status["mode"] == "qkd" and status["peer_SAE_ID"] == SITE_A_SAE
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
