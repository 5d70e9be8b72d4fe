"""The receivers' picture and statistics in a browser, for machines without a display.

Plain HTTP on 127.0.0.1 only (the media already arrived over TLS-QKD; this page never leaves the machine).
``/`` shows every receiver, ``/view/NAME`` one at its native size, ``/stream/NAME.mjpg`` is the live picture
as MJPEG (multipart/x-mixed-replace, which browsers show in an ``<img>``), ``/frame/NAME.jpg`` the last
picture and ``/stats.json`` the numbers. aiohttp runs in its own thread and event loop.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from qkdtls.apps.video.receiver import MediaReceiver
from qkdtls.web_thread import ThreadedWebApp

LOOPBACK = "127.0.0.1"
BOUNDARY = "qkdtlsframe"
MAX_STREAM_FPS = 60.0

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


class VideoWebServer(ThreadedWebApp):
    """Serves the receivers (a live mapping: receivers may be added after start)."""

    what = "video web server"
    thread_name = "video-web"

    def __init__(self, receivers: Mapping[str, MediaReceiver], host: str = LOOPBACK, port: int = 0) -> None:
        super().__init__(host, port)
        self.receivers = receivers

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/view/{name}", self._view)
        app.router.add_get("/stream/{name}.mjpg", self._stream)
        app.router.add_get("/frame/{name}.jpg", self._frame)
        app.router.add_get("/stats.json", self._stats)
        return app

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
