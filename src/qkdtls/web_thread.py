"""An aiohttp application served from its own thread and event loop, for the local pages of blocking
programs (the video call's web view, the network map). ``start()`` returns once it listens (port 0: the port
the kernel chose is in ``port``) or raises ``error(...)``; ``close()`` stops it and runs ``on_close``."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

START_TIMEOUT = 10.0


class ThreadedWebApp:
    what = "web server"  # for messages: "the map proxy", ...
    thread_name = "web"
    access_log = True  # aiohttp's access log (logger aiohttp.access)

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing: asyncio.Event | None = None
        self._error: BaseException | None = None

    # What subclasses provide.
    def make_app(self) -> web.Application:
        raise NotImplementedError

    async def on_close(self) -> None:
        """Runs in the server's loop after it stopped serving (close clients, ...)."""

    def error(self, message: str) -> Exception:
        return RuntimeError(message)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> Any:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise self.error(f"{self.what} did not start")
        if self._error is not None:
            raise self.error(f"{self.what} failed on {self.host}:{self.port}: {self._error}")
        return self

    def close(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._closing is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._closing.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Any:
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
        quiet: dict[str, Any] = {} if self.access_log else {"access_log": None}
        runner = web.AppRunner(self.make_app(), handle_signals=False, shutdown_timeout=1.0, **quiet)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            if runner.addresses:  # port 0: learn the one the kernel chose
                self.port = int(runner.addresses[0][1])
            self._ready.set()
            await self._closing.wait()
        finally:
            await runner.cleanup()
            await self.on_close()
