"""The network map for a browser: plain HTTP on a loopback address, fetching the KMEs' admin JSON with the
administrator's client certificate (browsers cannot easily present one).

    /                              -> /api/v1/admin/map
    /api/v1/admin/map              the map of the whole network (every KME's document merged: map_view.py)
    /api/v1/admin/network          that merged document
    /kme/<ID>/api/v1/admin/map     the map as KME <ID> sees it
    /kme/<ID>/api/v1/admin/network KME <ID>'s own document (as its admin route answers it)

Only loopback addresses are accepted for listening, and requests must name this server in their ``Host``
header (a web page elsewhere cannot read it through DNS rebinding). The documents hold no key material
(stock counts, paths, byte counts), but anyone on this machine can read them. KMEs are asked at most once
per ``CACHE_SECONDS`` whatever the number of browsers polling; every upstream call is bounded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from qkdtls.http11.client import HttpClient, HttpClientError
from qkdtls.kme.admin_map import DOCUMENT_PATH, PAGE_PATH, render_page
from qkdtls.kme.auth import client_context
from qkdtls.network.map_view import merge_documents
from qkdtls.web_thread import ThreadedWebApp

LOOPBACK = "127.0.0.1"
UPSTREAM_TIMEOUT = 2.5
CACHE_SECONDS = 0.5


@dataclass(frozen=True)
class Upstream:
    """One KME's SAE interface and the administrator credentials to call it with."""

    kme_id: int
    name: str
    saes: tuple[int, ...]
    host: str
    port: int
    cert: Path
    key: Path
    ca: Path


class MapProxyError(RuntimeError):
    """The proxy could not start (address not loopback, port taken)."""


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise MapProxyError(f"the map proxy listens on loopback addresses only, not {host!r}")


class MapProxy(ThreadedWebApp):
    what = "the map proxy"
    thread_name = "network-map"
    access_log = False

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        links: Sequence[tuple[int, int]],
        *,
        title: str = "QKD network",
        host: str = LOOPBACK,
        port: int = 0,
        timeout: float = UPSTREAM_TIMEOUT,
    ) -> None:
        _check_loopback(host)
        super().__init__(host, port)
        self.upstreams = {u.kme_id: u for u in upstreams}
        self.links = list(links)
        self.title = title
        self.timeout = timeout
        self._clients: dict[int, HttpClient] = {}
        self._cache: dict[object, tuple[float, Any]] = {}
        self._inflight: dict[object, asyncio.Task[Any]] = {}

    @property
    def map_url(self) -> str:
        return f"http://{self.host}:{self.port}{PAGE_PATH}"

    def kme_map_url(self, kme_id: int) -> str:
        return f"http://{self.host}:{self.port}/kme/{kme_id}{PAGE_PATH}"

    def error(self, message: str) -> Exception:
        return MapProxyError(message)

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._only_this_host])
        app.router.add_get("/", self._index)
        app.router.add_get(PAGE_PATH, self._network_page)
        app.router.add_get(DOCUMENT_PATH, self._network_document)
        app.router.add_get("/kme/{kme_id}" + PAGE_PATH, self._kme_page)
        app.router.add_get("/kme/{kme_id}" + DOCUMENT_PATH, self._kme_document)
        return app

    async def on_close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    # --- upstream -----------------------------------------------------------------------------------------

    def _client(self, kme_id: int) -> HttpClient:
        client = self._clients.get(kme_id)
        if client is None:
            u = self.upstreams[kme_id]
            client = HttpClient(
                u.host, u.port, ssl=client_context(u.cert, u.key, u.ca), max_connections=2,
                timeout=self.timeout, max_body_bytes=4 << 20,
            )  # fmt: skip
            self._clients[kme_id] = client
        return client

    async def fetch(self, kme_id: int) -> dict[str, Any] | str:
        """KME ``kme_id``'s document, or why it could not be had (a short reason for the map)."""
        try:
            answer = await self._client(kme_id).request("GET", DOCUMENT_PATH, timeout=self.timeout)
        except (HttpClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            return f"unreachable ({type(exc).__name__})"
        if answer.status != 200:
            try:
                message = str(json.loads(answer.body).get("message", ""))[:200]
            except (ValueError, AttributeError):
                message = ""
            return f"HTTP {answer.status}" + (f": {message}" if message else "")
        try:
            doc = json.loads(answer.body)
        except ValueError:
            return "the answer is not JSON"
        return doc if isinstance(doc, dict) else "the answer is not a JSON object"

    async def network_document(self) -> dict[str, Any]:
        """The merged document of every KME."""
        return await self._cached("network", self._merge)

    async def kme_document(self, kme_id: int) -> dict[str, Any] | str:
        """KME ``kme_id``'s own document (or why it could not be had)."""
        return await self._cached(kme_id, lambda: self.fetch(kme_id))

    async def _cached(self, key: object, make: Callable[[], Awaitable[Any]]) -> Any:
        """At most one upstream fetch per ``key`` every CACHE_SECONDS: callers in between share its answer."""
        loop = asyncio.get_running_loop()
        cached = self._cache.get(key)
        if cached is not None and loop.time() - cached[0] < CACHE_SECONDS:
            return cached[1]
        task = self._inflight.get(key)
        if task is None:
            task = loop.create_task(make())
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        value = await asyncio.shield(task)
        self._cache[key] = (loop.time(), value)
        return value

    async def _merge(self) -> dict[str, Any]:
        ids = sorted(self.upstreams)
        answers = await asyncio.gather(*(self.kme_document(k) for k in ids))
        return merge_documents(
            dict(zip(ids, answers, strict=True)),
            sites=[(u.kme_id, u.name, u.saes) for u in (self.upstreams[k] for k in ids)],
            links=self.links,
            title=self.title,
        )

    # --- routes -------------------------------------------------------------------------------------------

    @web.middleware
    async def _only_this_host(self, request: web.Request, handler: Any) -> web.StreamResponse:
        allowed = {f"{self.host}:{self.port}", f"localhost:{self.port}", f"[{self.host}]:{self.port}"}
        if request.host not in allowed:
            raise web.HTTPForbidden(text="this server answers requests for its own address only\n")
        response: web.StreamResponse = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _index(self, request: web.Request) -> web.Response:
        if len(self.upstreams) == 1 and not self.links:  # one KME: its own view
            raise web.HTTPFound(f"/kme/{next(iter(self.upstreams))}{PAGE_PATH}")
        raise web.HTTPFound(PAGE_PATH)

    async def _network_page(self, request: web.Request) -> web.Response:
        doc = await self.network_document()
        return web.Response(
            body=render_page(doc, title=self.title), content_type="text/html", charset="utf-8"
        )

    async def _network_document(self, request: web.Request) -> web.Response:
        return web.json_response(await self.network_document())

    def _kme_id(self, request: web.Request) -> int:
        try:
            kme_id = int(request.match_info["kme_id"])
        except ValueError:
            raise web.HTTPNotFound(text="no such KME\n") from None
        if kme_id not in self.upstreams:
            raise web.HTTPNotFound(text="no such KME in this network\n")
        return kme_id

    async def _kme_doc(self, kme_id: int) -> dict[str, Any]:
        doc = await self.kme_document(kme_id)
        if isinstance(doc, str):
            raise web.HTTPBadGateway(
                text=json.dumps({"message": f"KME {kme_id}: {doc}"}), content_type="application/json"
            )
        return {**doc, "names": {str(u.kme_id): u.name for u in self.upstreams.values()}}

    async def _kme_page(self, request: web.Request) -> web.Response:
        kme_id = self._kme_id(request)
        doc = await self.kme_document(kme_id)
        initial = None
        if not isinstance(doc, str):
            initial = {**doc, "names": {str(u.kme_id): u.name for u in self.upstreams.values()}}
        title = f"{self.title}: seen from KME {kme_id} ({self.upstreams[kme_id].name})"
        return web.Response(body=render_page(initial, title=title), content_type="text/html", charset="utf-8")

    async def _kme_document(self, request: web.Request) -> web.Response:
        return web.json_response(await self._kme_doc(self._kme_id(request)))
