"""``qkdtls s_client`` / ``qkdtls s_server`` as real processes through the two KMEs."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from tests.peers.clients import curl_client, run_peer
from tests.tls_qkd.conftest import HOST, SERVER_SAE, TIMEOUT, Site

QKDTLS = [sys.executable, "-m", "qkdtls"]


def _kme_flags(site: Site, cert_flag: str, key_flag: str) -> list[str]:
    return [
        "--kme",
        site.kme.url,
        cert_flag,
        str(site.kme.certfile),
        key_flag,
        str(site.kme.keyfile),
        "--kme-ca",
        str(site.kme.cafile),
    ]


class ServerProcess:
    """``qkdtls s_server`` on a free port; stderr lines are collected for the assertions."""

    def __init__(self, site_b: Site, *extra: str) -> None:
        argv = [
            *QKDTLS,
            "s_server",
            "--accept",
            "0",
            "--cert",
            str(site_b.app_cert),
            "--key",
            str(site_b.app_key),
            *_kme_flags(site_b, "--kme-cert", "--kme-key"),
            *extra,
        ]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(TIMEOUT) or not self.port:
            self.stop()
            pytest.fail(f"s_server did not start: {self.lines}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("listening on "):
                self.port = int(line.rsplit(":", 1)[1])
                self._ready.set()
        self._ready.set()

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            return -9


@pytest.fixture
def s_server(site_b: Site) -> Iterator[ServerProcess]:
    server = ServerProcess(site_b, "--qkd", "preferred")
    yield server
    assert server.stop() == 0, server.lines


def test_s_client_through_qkd_echo(s_server: ServerProcess, site_a: Site, site_b: Site) -> None:
    argv = [
        *QKDTLS,
        "s_client",
        f"{HOST}:{s_server.port}",
        "--servername",
        "localhost",
        "--cafile",
        str(site_b.app_ca),
        "--target-sae",
        str(SERVER_SAE),
        "--qkd",
        "required",
        *_kme_flags(site_a, "--cert", "--key"),
    ]
    # Like a user at a terminal: stdin stays open until the echo is back, then ends (close_notify).
    result = run_peer(argv, send=b"hello over QKD\n", expect=b"hello over QKD\n", timeout=TIMEOUT)
    err = result.stderr.decode()
    assert result.returncode == 0 and not result.timed_out, err
    assert result.stdout == b"hello over QKD\n"
    assert "mode: qkd" in err and "profile: secure" in err
    assert f"peer SAE ID: {SERVER_SAE}" in err
    key_line = next(line for line in err.splitlines() if line.startswith("key ID: "))
    key_id = key_line.removeprefix("key ID: ")
    assert any(f"key_ID={key_id}" in line and "peer_SAE_ID=1001" in line for line in s_server.lines)


def test_s_server_www_status_page(site_b: Site) -> None:
    server = ServerProcess(site_b, "--www", "--qkd", "preferred")
    try:
        result = curl_client(server.port, site_b.app_ca)
    finally:
        assert server.stop() == 0
    assert result.returncode == 0, result.output
    assert b"<th>mode</th><td>classic</td>" in result.stdout


def test_s_client_required_without_kme_is_a_usage_error() -> None:
    done = subprocess.run(
        [*QKDTLS, "s_client", "127.0.0.1:1", "--qkd", "required"], capture_output=True, timeout=TIMEOUT
    )
    assert done.returncode == 2
    assert b"--qkd required needs --kme" in done.stderr


def test_help_texts() -> None:
    for command in ("s_client", "s_server"):
        done = subprocess.run([*QKDTLS, command, "--help"], capture_output=True, timeout=TIMEOUT, text=True)
        assert done.returncode == 0
        assert "--qkd" in done.stdout and "insufficient_security" in done.stdout
        assert "--profile" in done.stdout and "reference" in done.stdout


def test_s_server_allow_list_and_its_errors(site_a: Site, site_b: Site) -> None:
    server = ServerProcess(site_b, "--qkd", "required", "--allow-peer-sae", "1002")
    try:
        argv = [
            *QKDTLS, "s_client", f"{HOST}:{server.port}", "--servername", "localhost", "--cafile",
            str(site_b.app_ca), "--target-sae", str(SERVER_SAE), *_kme_flags(site_a, "--cert", "--key"),
        ]
        result = run_peer(argv, send=b"ping\n", timeout=TIMEOUT)  # SAE 1001 is not on the list
    finally:
        assert server.stop() == 0
    assert result.returncode == 1 and "insufficient_security" in result.stderr.decode()
    assert any("peer SAE not allowed" in line for line in server.lines), server.lines
    # Client certificates under required, and no SAE listed: nobody could connect, said at start.
    for extra in (["--cafile", str(site_b.app_ca)], ["--allow-peer-sae", "0"]):
        argv = [
            *QKDTLS, "s_server", "--accept", "0", "--cert", str(site_b.app_cert), "--key",
            str(site_b.app_key), *_kme_flags(site_b, "--kme-cert", "--kme-key"), "--qkd", "required", *extra,
        ]
        done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, text=True)
        assert done.returncode == 2 and "allowed_peer_sae_ids" in done.stderr, done.stderr
