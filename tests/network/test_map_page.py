"""The map page in headless Chromium, fed a recorded network document (the eight-KME paper network with KME 4
down, the link 7-8 cut, and a spread relay over two paths): every site is drawn with its KME ID and SAEs, the
down links and node are marked, the newest relay's paths are highlighted and listed, and the picture has the
legend's colours. Then documents with parts missing, failing answers and hostile names."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from tests.network.conftest import Route, browse, colour_count, distinct_colours

from qkdtls.kme.admin_map import DOCUMENT_PATH, PAGE_PATH, render_page

RECORDED = Path(__file__).parent / "data" / "spread-8.network.json"
HTML = "text/html; charset=utf-8"
JSON = "application/json"
RED, GREEN, BROWN, BLUE, OLIVE = (214, 39, 40), (44, 160, 44), (140, 86, 75), (31, 119, 180), (188, 189, 34)


def _attr(dom: str, tag: str, key: str, value: str) -> list[str]:
    """Opening tags ``<tag ...>`` of the DOM dump carrying ``key="value"``."""
    return [t for t in re.findall(rf"<{tag}\b[^>]*>", dom) if f'{key}="{value}"' in t]


def _state(dom: str, tag: str, key: str, value: str) -> str:
    tags = _attr(dom, tag, key, value)
    assert len(tags) == 1, (tag, key, value, tags)
    found = re.search(r'data-state="([a-z]+)"', tags[0])
    assert found is not None
    return found.group(1)


def test_the_map_draws_a_recorded_network(
    static_server: Callable[[dict[str, Route]], str], tmp_path: Path
) -> None:
    base = static_server({
        PAGE_PATH: (200, HTML, render_page(None, title="recorded network")),
        DOCUMENT_PATH: (200, JSON, RECORDED.read_bytes()),
    })  # fmt: skip
    shot, dom = browse(base + PAGE_PATH, tmp_path)
    assert "live · updated" in dom  # the poll answered and was drawn
    for kme in range(1, 9):
        assert f">KME {kme}</text>" in dom and f">SAE {kme * 1000 + 1}</text>" in dom
    assert _state(dom, "g", "data-kme", "4") == "down" and ">DOWN</text>" in dom
    assert _state(dom, "g", "data-kme", "8") == "up"
    assert _state(dom, "line", "data-link", "7-8") == "down"  # the cut link
    assert _state(dom, "line", "data-link", "1-4") == "down"  # a link of the node that is down
    assert _state(dom, "line", "data-link", "1-2") == "plenty"
    assert _state(dom, "line", "data-link", "3-7") == "some"
    assert _state(dom, "line", "data-link", "2-6") == "empty"  # no stock 2->6
    assert 'stroke-dasharray="14 10"' in _attr(dom, "line", "data-link", "7-8")[0]
    assert re.findall(r'<polyline\b[^>]*data-path="([-0-9]+)"', dom) == ["1-2-5-8", "1-3-6-8"]
    # The newest relay failed: listed (marked), while the newest delivered one is drawn.
    rows = re.findall(r'<tr data-newest="(yes|no)" data-ok="(yes|no)"[^>]*>(.*?)</tr>', dom)
    assert [(newest, ok) for newest, ok, _ in rows] == [("yes", "no"), ("no", "yes"), ("no", "yes")]
    assert "trusted (failed)" in rows[0][2] and "1 → 4 → 7 → 8" in rows[0][2]
    assert "1 → 2 → 5 → 8 | 1 → 3 → 6 → 8" in rows[1][2] and "1 → 3 → 7 → 8" in rows[2][2]
    assert "trusted 12 · spread 3 · failed 1" in dom and "hop messages received: accepted 9 · replay 1" in dom
    assert "relayed 128 B" in dom and "2→5 5000 · 5→2 5000" in dom

    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 900)
    assert distinct_colours(image) > 200  # not a blank page
    colours = {"red": RED, "green": GREEN, "brown": BROWN, "blue": BLUE, "olive": OLIVE}
    counts = {name: colour_count(image, rgb) for name, rgb in colours.items()}
    # Thresholds well above the legend's swatches alone (about 200 pixels each): the links themselves.
    assert counts["red"] > 2000 and counts["green"] > 2000 and counts["blue"] > 800, counts
    assert counts["brown"] > 600 and counts["olive"] > 600, counts


def test_the_map_degrades_gracefully(
    static_server: Callable[[dict[str, Route]], str], tmp_path: Path
) -> None:
    plain = {  # a KME without router or relay: itself and its peers from its link reports
        "kme_id": 5,
        "routing": None,
        "relay": None,
        "names": {"5": "</script><b>five</b>"},
        "links": [{"peer_KME_ID": 6, "stock_blocks": {"0": 3000, "1": 2900}},
                  {"peer_KME_ID": 5, "stock_blocks": {"0": 10}},
                  {"peer_KME_ID": 2, "stock_blocks": {"0": 100}}],
    }  # fmt: skip
    page = render_page(plain, title="<i>t</i>")
    assert b"</script><b>" not in page and b"<i>t</i>" not in page
    base = static_server({
        "/a" + PAGE_PATH: (200, HTML, page),
        "/a" + DOCUMENT_PATH: (200, JSON, json.dumps(plain).encode()),
        "/b" + PAGE_PATH: (200, HTML, render_page(None)),
        "/b" + DOCUMENT_PATH: (503, JSON, b'{"message": "the KME is draining"}'),
        "/c" + PAGE_PATH: (200, HTML, render_page(None)),
        "/c" + DOCUMENT_PATH: (200, JSON, b"[1, 2, 3]"),
        "/d" + PAGE_PATH: (200, HTML, render_page(json.loads(RECORDED.read_text()))),
        "/d" + DOCUMENT_PATH: (200, JSON, b"{not json"),
    })  # fmt: skip
    _, dom = browse(base + "/a" + PAGE_PATH, tmp_path, png=False)
    assert "&lt;/script&gt;&lt;b&gt;five&lt;/b&gt;" in dom  # a hostile name stays text
    assert _state(dom, "g", "data-kme", "5") == "up" and _state(dom, "g", "data-kme", "6") == "unknown"
    assert _state(dom, "line", "data-link", "5-6") == "plenty"  # up or not unknown: drawn by its stock
    assert _state(dom, "line", "data-link", "2-5") == "unknown"  # one direction's stock unknown
    assert "5→6 3000 · 6→5 2900" in dom and "no relay statistics" in dom and "no relay yet" in dom

    _, dom = browse(base + "/b" + PAGE_PATH, tmp_path, png=False)
    assert "no data: HTTP 503: the KME is draining" in dom and "no network data yet" not in dom

    _, dom = browse(base + "/c" + PAGE_PATH, tmp_path, png=False)
    assert "no network data yet" in dom and "live · updated" in dom

    # The first document came with the page; the polls then fail: the last map stays, marked stale.
    _, dom = browse(base + "/d" + PAGE_PATH, tmp_path, png=False)
    assert "no fresh data since" in dom and "the answer is not JSON" in dom
    assert 'id="map-wrap" class="stale"' in dom and _state(dom, "line", "data-link", "7-8") == "down"
