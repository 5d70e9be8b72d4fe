"""A short full-duplex call over classic TLS 1.3 (Python ssl) and its web view in headless Chromium."""

from __future__ import annotations

import io
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from qkdtls.apps.video.call import CallSettings, CallSite, close_direction, open_direction, run_call
from qkdtls.apps.video.sources import BARS, TestPattern
from qkdtls.apps.video.web import VideoWebServer
from qkdtls.pki import PkiLayout

from .conftest import CLIENT_SAE, SERVER_SAE


def _sites(pki: PkiLayout, client: ssl.SSLContext) -> tuple[CallSite, CallSite]:
    def server(zone: int, sae: int) -> ssl.SSLContext:
        issued = pki.zones[zone].app_servers[sae]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(issued.cert, issued.key)
        return ctx

    return (CallSite("A", CLIENT_SAE, server(1, CLIENT_SAE), client),
            CallSite("B", SERVER_SAE, server(2, SERVER_SAE), client))


def test_short_call_both_directions(pki: PkiLayout, classic_client_context: ssl.SSLContext) -> None:
    a, b = _sites(pki, classic_client_context)
    directions = run_call(a, b, CallSettings(duration=2.0))
    assert [d.name for d in directions] == ["A-to-B", "B-to-A"]
    for d in directions:
        rx, tx = d.receiver.stats, d.sender.stats
        assert rx.error is None and tx.error is None
        assert rx.bye
        assert rx.order_errors == rx.decode_errors == rx.size_errors == 0
        assert rx.frames_received == tx.frames_sent >= 30
        assert rx.frames_decoded + rx.frames_skipped == rx.frames_received
        assert (rx.width, rx.height) == (1280, 720)
        assert rx.audio_chunks == tx.audio_sent >= 50  # 20 ms chunks
        assert rx.bytes_received == tx.bytes_sent
        assert rx.latency_ms(50) is not None and rx.latency_ms(50) < 150


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("headless Chromium is needed for the web view test: apt-get install chromium "
                "(scripts/install-system-deps.sh)")


def test_web_view_shows_the_received_pattern(
    pki: PkiLayout, classic_client_context: ssl.SSLContext, tmp_path: Path
) -> None:
    browser = _chromium()
    a, b = _sites(pki, classic_client_context)
    receivers: dict = {}
    shot = tmp_path / "view.png"
    with VideoWebServer(receivers) as web:
        direction = open_direction(a, b, CallSettings(fps=15))
        try:
            receivers[direction.receiver.name] = direction.receiver
            deadline = time.monotonic() + 5
            while direction.receiver.latest_jpeg is None and time.monotonic() < deadline:
                time.sleep(0.05)
            subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800", "--timeout=2000",
                 f"--screenshot={shot}", f"{web.url}view/{direction.receiver.name}"],
                capture_output=True, timeout=60, check=True,
            )
        finally:
            close_direction(direction)
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    for (x, y), colour in zip(TestPattern().bar_centres(), BARS, strict=True):
        pixel = image.getpixel((x, y))
        assert max(abs(p - c) for p, c in zip(pixel, colour, strict=True)) <= 12, (x, y, pixel, colour)
