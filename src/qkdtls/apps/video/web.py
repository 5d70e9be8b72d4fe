"""The receivers' picture and statistics in a browser, for machines without a display.

Plain HTTP on 127.0.0.1 only (the media already arrived over TLS-QKD; this page never leaves the machine).
``/`` shows every receiver, ``/view/NAME`` one at its native size, ``/stream/NAME.mjpg`` is the live picture
as MJPEG (multipart/x-mixed-replace, which browsers show in an ``<img>``), ``/frame/NAME.jpg`` the last
picture and ``/stats.json`` the numbers. aiohttp runs in its own thread and event loop.
"""

from __future__ import annotations

import asyncio
import html
import threading
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from qkdtls.apps.video.receiver import MediaReceiver

LOOPBACK = "127.0.0.1"
BOUNDARY = "qkdtlsframe"
MAX_STREAM_FPS = 60.0
START_TIMEOUT = 10.0

_STATS_SCRIPT = """
<script>
async function refresh() {
  try {
    const stats = await (await fetch('/stats.json')).json();
    for (const s of stats.receivers) {
      const el = document.getElementById('stats-' + s.name);
      if (el) el.textContent = `${s.resolution || '-'}  ${s.live_fps} fps  ${s.live_mbit_s} Mbit/s  ` +
        `latency p50 ${s.latency_ms_p50} ms  frames ${s.frames_decoded}  audio ${s.audio_chunks}  ` +
        `order errors ${s.order_errors}`;
    }
  } catch (e) {}
}
setInterval(refresh, 1000); refresh();
</script>"""


class VideoWebServer:
    """Serves the receivers (a live mapping: receivers may be added after start)."""

    def __init__(self, receivers: Mapping[str, MediaReceiver], host: str = LOOPBACK, port: int = 0) -> None:
        self.receivers = receivers
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> VideoWebServer:
        self._thread = threading.Thread(target=self._run, name="video-web", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("video web server did not start")
        if self._error is not None:
            raise RuntimeError(f"video web server failed: {self._error}")
        return self

    def close(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._closing is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._closing.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> VideoWebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/view/{name}", self._view)
        app.router.add_get("/stream/{name}.mjpg", self._stream)
        app.router.add_get("/frame/{name}.jpg", self._frame)
        app.router.add_get("/stats.json", self._stats)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self._runner.addresses:  # port 0: learn the one the kernel chose
            self.port = int(self._runner.addresses[0][1])
        self._ready.set()
        try:
            await self._closing.wait()
        finally:
            await self._runner.cleanup()

    def _receiver(self, request: web.Request) -> MediaReceiver:
        receiver = self.receivers.get(request.match_info["name"])
        if receiver is None:
            raise web.HTTPNotFound(text="no such receiver\n")
        return receiver

    async def _index(self, request: web.Request) -> web.Response:
        cells = "".join(
            f"<figure><img src='/stream/{html.escape(n)}.mjpg' width='640' alt='{html.escape(n)}'>"
            f"<figcaption><a href='/view/{html.escape(n)}'>{html.escape(n)}</a> "
            f"<span id='stats-{html.escape(n)}'></span></figcaption></figure>"
            for n in self.receivers
        )
        return web.Response(text=_page("qkdtls video call", cells), content_type="text/html")

    async def _view(self, request: web.Request) -> web.Response:
        receiver = self._receiver(request)
        name = html.escape(receiver.name)
        body = (
            f"<img src='/stream/{name}.mjpg' style='display:block;margin:0' alt='{name}'>"
            f"<div id='stats-{name}'></div>"
        )
        return web.Response(text=_page(f"qkdtls video: {name}", body), content_type="text/html")

    async def _frame(self, request: web.Request) -> web.Response:
        latest = self._receiver(request).latest_jpeg
        if latest is None:
            raise web.HTTPServiceUnavailable(text="no picture yet\n")
        return web.Response(body=latest[1], content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        receiver = self._receiver(request)
        assert self._closing is not None
        response = web.StreamResponse(
            headers={
                "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                "Cache-Control": "no-store",
            }
        )
        await response.prepare(request)
        sent = -1
        while not self._closing.is_set():
            latest = receiver.latest_jpeg
            if latest is not None and latest[0] != sent:
                sent, jpeg = latest
                part = (
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                ).encode()
                try:
                    await response.write(part + jpeg + b"\r\n")
                except (ConnectionError, RuntimeError):
                    break
            await asyncio.sleep(1 / MAX_STREAM_FPS)
        return response

    async def _stats(self, request: web.Request) -> web.Response:
        doc: dict[str, Any] = {"receivers": [r.live() for r in list(self.receivers.values())]}
        return web.json_response(doc)


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{margin:0;background:#222;color:#eee;font:14px sans-serif}"
        "figure{display:inline-block;margin:8px}</style></head>"
        f"<body>{body}{_STATS_SCRIPT}</body></html>"
    )
