"""Helpers of the network tests: headless Chromium (screenshot + DOM after the page's scripts ran), a small
HTTP server for recorded documents, free runs of ports, and PNG colour counts."""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

Route = tuple[int, str, bytes]  # status, content type, body


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("headless Chromium is needed for the map tests: apt-get install chromium "
                "(scripts/install-system-deps.sh)")  # fmt: skip


def browse(
    url: str, workdir: Path, *, size: tuple[int, int] = (1400, 900), png: bool = True
) -> tuple[Path, str]:
    """Load ``url`` in a fresh headless Chromium; return (screenshot, DOM after the scripts ran, without the
    scripts' own text).

    ``--virtual-time-budget`` lets the page's timers and fetches run before the capture."""
    shot = workdir / "map.png"
    profile = workdir / f"profile-{len(list(workdir.glob('profile-*')))}"
    argv = [
        chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--disable-background-networking", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=4000",
        "--dump-dom", *([f"--screenshot={shot}"] if png else []), url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    if png:
        assert shot.is_file(), done.stderr[-2000:]
    return shot, re.sub(r"<script\b.*?</script>", "", done.stdout, flags=re.DOTALL)


@pytest.fixture
def static_server() -> Iterator[Callable[[dict[str, Route]], str]]:
    """``serve({"/path": (status, type, body)})`` -> base URL of a loopback server answering exactly those."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(routes: dict[str, Route]) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, ctype, body = routes.get(self.path.split("?")[0], (404, "text/plain", b"not here"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def colour_count(image: Image.Image, rgb: tuple[int, int, int], tolerance: int = 18) -> int:
    """Pixels within ``tolerance`` (per channel) of ``rgb``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(rgb, dtype=np.int16)).max(axis=2) <= tolerance).sum())


def distinct_colours(image: Image.Image) -> int:
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint32)
    return len(np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]))
