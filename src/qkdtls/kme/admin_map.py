"""The network as the administrator sees it: ``GET /api/v1/admin/network`` (JSON) and ``GET
/api/v1/admin/map`` (a self-contained HTML page that draws it as SVG and polls the JSON), on the SAE listener,
for the administrator certificates of ``[[admins]]`` only.

The JSON document (``network_document``)::

    {"kme_id": 1, "at": 1733300000.5,
     "routing": router.snapshot() or null,      # nodes, links (up, stock per direction): the link-state view
     "relay": service.relay_stats() or null,    # relay counts, last paths, bytes consumed per link
     "links": [...]}                            # this KME's link reports, as GET /api/v1/admin/links

Without a router (a KME of plain point-to-point links) the page draws this KME and its peers from ``links``.
The pure helpers (``links_json``, ``routing_from_links``) are shared with the loopback map proxy of
``qkdtls network up``, which merges the documents of every KME of a network.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

from qkdtls.http11.server import Handler, Request, Response

PAGE_PATH = "/api/v1/admin/map"
DOCUMENT_PATH = "/api/v1/admin/network"
HTML = "text/html; charset=utf-8"
_INITIAL = "/*INITIAL_DOCUMENT*/null"


def links_json(reports: Iterable[Any]) -> list[dict[str, Any]]:
    """Link reports (``KmeService.link_reports()``) as ``GET /api/v1/admin/links`` shows them."""
    return [
        {
            "peer_KME_ID": rep.peer_kme_id,
            "stock_blocks": {str(d): n for d, n in sorted(rep.direction_blocks.items())},
            "stock_bytes": rep.stock_bytes,
            "reserved_keys": rep.reserved_keys,
            "recollectable_keys": rep.recollectable_keys,
            "entropy_bits_per_byte": rep.entropy_bits_per_byte,
            "imported_bytes": rep.imported_bytes,
        }
        for rep in reports
    ]


def link_stock(kme_id: int, report: Mapping[str, Any]) -> tuple[tuple[int, int], dict[str, int]] | None:
    """(link, {"a->b": blocks, "b->a": blocks}) from one KME's report on its link to a peer; None for the
    local link or a malformed report. Direction 0 is drawn by the lower KME ID (docs/design.md)."""
    peer = report.get("peer_KME_ID")
    stock = report.get("stock_blocks")
    if not isinstance(peer, int) or isinstance(peer, bool) or peer == kme_id or not isinstance(stock, dict):
        return None
    a, b = min(kme_id, peer), max(kme_id, peer)
    low, high = stock.get("0"), stock.get("1")
    out = {}
    if isinstance(low, int):
        out[f"{a}->{b}"] = low
    if isinstance(high, int):
        out[f"{b}->{a}"] = high
    return (a, b), out


def routing_from_links(
    kme_id: int, reports: Iterable[Mapping[str, Any]], *, peers_up: bool | None = None
) -> dict[str, Any]:
    """A routing snapshot built from one KME's link reports alone: itself (up) and its peers (``up`` unknown
    unless given), the links with their stock. What the map draws when a KME has no router."""
    nodes = {kme_id: {"kme_id": kme_id, "up": True, "saes": [], "age_s": 0.0}}
    links = []
    for report in reports:
        found = link_stock(kme_id, report)
        if found is None:
            continue
        (a, b), stock = found
        peer = b if a == kme_id else a
        nodes.setdefault(peer, {"kme_id": peer, "up": peers_up, "saes": [], "age_s": None})
        links.append({"a": a, "b": b, "up": peers_up, "stock_blocks": stock})
    return {"kme_id": kme_id, "nodes": [nodes[k] for k in sorted(nodes)], "links": links}


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def network_document(kme_id: int, service: Any) -> dict[str, Any]:
    """The JSON document of ``GET /api/v1/admin/network`` for one KME.

    ``service.router`` (a :class:`qkdtls.kme.routing.Router`, or None) and ``service.relay_stats()`` are
    used when the service has them; a KME without them still answers, with ``null`` in their place."""
    router = getattr(service, "router", None)
    relay_stats = getattr(service, "relay_stats", None)
    return {
        "kme_id": kme_id,
        "at": round(time.time(), 3),
        "routing": router.snapshot() if router is not None else None,
        "relay": await _maybe_await(relay_stats()) if callable(relay_stats) else None,
        "links": links_json(await service.link_reports()),
    }


@cache
def page_template() -> str:
    return resources.files("qkdtls.kme").joinpath("admin_map.html").read_text(encoding="utf-8")


def render_page(initial: Mapping[str, Any] | None = None, *, title: str = "QKD network") -> bytes:
    """The map page; ``initial`` (a network document) is drawn at once, before the first poll answers."""
    text = page_template().replace("<!--TITLE-->", _html_text(title))
    if initial is not None:
        # JSON inside <script>: "<" escaped so no "</script>" or "<!--" can end or change the script.
        data = json.dumps(initial, separators=(",", ":"), allow_nan=False)
        data = data.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        text = text.replace(_INITIAL, data)
    return text.encode("utf-8")


def _html_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class NetworkAdmin:
    """The two admin routes; ``authorize(request)`` raises unless an administrator calls."""

    def __init__(self, kme_id: int, service: Any, authorize: Callable[[Request], object]) -> None:
        self.kme_id = kme_id
        self.service = service
        self.authorize = authorize

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("GET", DOCUMENT_PATH, self.document), ("GET", PAGE_PATH, self.page)]

    async def document(self, request: Request) -> Response:
        self.authorize(request)
        doc = await network_document(self.kme_id, self.service)
        return Response(200, json.dumps(doc, separators=(",", ":")).encode())

    async def page(self, request: Request) -> Response:
        self.authorize(request)
        doc = await network_document(self.kme_id, self.service)
        return Response(200, render_page(doc, title=f"QKD network seen from KME {self.kme_id}"), HTML)
