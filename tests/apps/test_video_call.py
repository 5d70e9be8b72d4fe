"""A short full-duplex call over TLS-QKD, over classic TLS 1.3, and the web view in headless Chromium."""

from __future__ import annotations

import io
import json
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from qkdtls.apps.demo import SITE_A_SAE, SITE_B_SAE, DemoSites
from qkdtls.apps.video.call import (
    CallSettings,
    CallSite,
    Direction,
    close_direction,
    open_direction,
    run_call,
)
from qkdtls.apps.video.receiver import MediaReceiver
from qkdtls.apps.video.sources import BARS, TestPattern
from qkdtls.apps.video.web import VideoWebServer
from qkdtls.pki import PkiLayout

from .conftest import CLIENT_SAE, SERVER_SAE


def _qkd_sites(sites: DemoSites) -> tuple[CallSite, CallSite]:
    return (CallSite("A", SITE_A_SAE, sites.a.server, sites.a.client),
            CallSite("B", SITE_B_SAE, sites.b.server, sites.b.client))


def _check_direction(d: Direction, min_frames: int) -> None:
    rx, tx = d.receiver.stats, d.sender.stats
    assert rx.error is None and tx.error is None
    assert rx.bye
    assert rx.order_errors == rx.decode_errors == rx.size_errors == 0
    assert rx.frames_received == tx.frames_sent >= min_frames
    assert rx.frames_decoded + rx.frames_skipped == rx.frames_received
    assert (rx.width, rx.height) == (1280, 720)
    assert rx.audio_chunks == tx.audio_sent >= min_frames  # 20 ms chunks: more of them than frames
    assert d.receiver.sink.peak > 0  # the tone arrived, not silence
    assert rx.bytes_received == tx.bytes_sent
    assert rx.latency_ms(50) is not None and rx.latency_ms(50) < 150


def test_short_call_over_tls_qkd(qkd_sites: DemoSites) -> None:
    a, b = _qkd_sites(qkd_sites)
    directions = run_call(a, b, CallSettings(duration=2.0))
    assert [d.name for d in directions] == ["A-to-B", "B-to-A"]
    for d in directions:
        _check_direction(d, min_frames=30)
        assert d.sender_connection["mode"] == d.receiver_connection["mode"] == "qkd"
        assert d.sender_connection["key_ID"] == d.receiver_connection["key_ID"]
    assert directions[0].receiver_connection["peer_SAE_ID"] == SITE_A_SAE
    assert directions[1].receiver_connection["peer_SAE_ID"] == SITE_B_SAE
    assert directions[0].sender_connection["key_ID"] != directions[1].sender_connection["key_ID"]


def test_short_call_over_classic_tls(pki: PkiLayout, classic_client_context: ssl.SSLContext) -> None:
    def server(zone: int, sae: int) -> ssl.SSLContext:
        issued = pki.zones[zone].app_servers[sae]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(issued.cert, issued.key)
        return ctx

    a = CallSite("A", CLIENT_SAE, server(1, CLIENT_SAE), classic_client_context)
    b = CallSite("B", SERVER_SAE, server(2, SERVER_SAE), classic_client_context)
    for d in run_call(a, b, CallSettings(duration=1.0)):
        _check_direction(d, min_frames=15)
        assert d.sender_connection["mode"] == "classic"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("headless Chromium is needed for the web view test: apt-get install chromium "
                "(scripts/install-system-deps.sh)")


def test_web_view_shows_the_received_pattern(qkd_sites: DemoSites, tmp_path: Path) -> None:
    browser = _chromium()
    a, b = _qkd_sites(qkd_sites)
    receivers: dict[str, MediaReceiver] = {}
    shot = tmp_path / "view.png"
    with VideoWebServer(receivers) as web:
        direction = open_direction(a, b, CallSettings(fps=15))
        try:
            receivers[direction.receiver.name] = direction.receiver
            deadline = time.monotonic() + 5
            while direction.receiver.latest_jpeg is None and time.monotonic() < deadline:
                time.sleep(0.05)
            with urllib.request.urlopen(f"{web.url}stats.json", timeout=5) as answer:
                stats = json.load(answer)["receivers"]
            with urllib.request.urlopen(f"{web.url}frame/{direction.receiver.name}.jpg", timeout=5) as answer:
                assert answer.headers["Content-Type"] == "image/jpeg" and answer.read(2) == b"\xff\xd8"
            subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800", "--timeout=2000",
                 f"--screenshot={shot}", f"{web.url}view/{direction.receiver.name}"],
                capture_output=True, timeout=60, check=True,
            )
        finally:
            close_direction(direction)
    assert direction.sender_connection["mode"] == "qkd"
    assert [r["name"] for r in stats] == ["A-to-B"] and stats[0]["frames_decoded"] >= 1
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.size == (1280, 800)
    for (x, y), colour in zip(TestPattern().bar_centres(), BARS, strict=True):
        pixel = image.getpixel((x, y))
        assert max(abs(p - c) for p, c in zip(pixel, colour, strict=True)) <= 12, (x, y, pixel, colour)
