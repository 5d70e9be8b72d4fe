"""The admin routes of the map on a running KME: `GET /api/v1/admin/network` (JSON) and `GET
/api/v1/admin/map` (the page with the current document inside) answer the administrator certificate only, and
the map proxy serves both to a browser on loopback without a certificate, for this machine's names only."""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path

import pytest

from qkdtls.kme.admin_map import DOCUMENT_PATH, PAGE_PATH
from qkdtls.kme.auth import client_context
from qkdtls.network.map_proxy import MapProxy, MapProxyError, Upstream
from qkdtls.testbed import Testbed


def _get(tb: Testbed, kme: int, path: str, cert: Path, key: Path) -> tuple[int, str, bytes]:
    ctx = client_context(cert, key, tb.pki.zones[kme].ca)
    conn = http.client.HTTPSConnection("127.0.0.1", tb.kmes[kme].sae_port, context=ctx, timeout=10)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    finally:
        conn.close()


def test_the_network_routes_answer_administrators_only(tmp_path: Path) -> None:
    with Testbed.create(tmp_path / "bed", initial_key_bytes=64 * 1024, local_key_bytes=0) as tb:
        admin = tb.admin_credentials(1)[:2]
        status, ctype, body = _get(tb, 1, DOCUMENT_PATH, *admin)
        assert status == 200 and ctype.startswith("application/json")
        doc = json.loads(body)
        assert doc["kme_id"] == 1 and isinstance(doc["at"], float)
        _, _, links = _get(tb, 1, "/api/v1/admin/links", *admin)
        assert doc["links"] == json.loads(links)["links"]  # the same link reports
        peer = next(link for link in doc["links"] if link["peer_KME_ID"] == 2)
        assert peer["stock_blocks"] == {"0": 1024, "1": 1024}
        # The KME's router (or none): the JSON is built from what the service has.
        assert doc["routing"] is None or doc["routing"]["kme_id"] == 1
        assert set(doc) == {"kme_id", "at", "routing", "relay", "links"}

        status, ctype, page = _get(tb, 1, PAGE_PATH, *admin)
        assert status == 200 and ctype.startswith("text/html")
        assert b"const INITIAL = {" in page and b"QKD network seen from KME 1" in page
        assert b"http://" not in page.replace(b'xmlns="http://www.w3.org/2000/svg"', b"").replace(
            b'"http://www.w3.org/2000/svg"', b""
        )  # self-contained: nothing fetched from elsewhere

        sae = tb.sae_credentials(1001)[:2]
        for path in (DOCUMENT_PATH, PAGE_PATH):
            status, _, body = _get(tb, 1, path, *sae)
            assert status == 401 and "administrators" in json.loads(body)["message"]
        other_admin = tb.admin_credentials(2)[:2]  # another zone's administrator is not this KME's
        try:
            status = _get(tb, 1, DOCUMENT_PATH, *other_admin)[0]
        except (ssl.SSLError, ConnectionError):
            status = 0  # refused in the TLS handshake
        assert status in (0, 401)

        zone = tb.pki.zones
        upstreams = [
            Upstream(k, f"site {k}", tuple(s for s, kme in tb.sae_kme.items() if kme == k), "127.0.0.1",
                     tb.kmes[k].sae_port, zone[k].admin.cert, zone[k].admin.key, zone[k].ca)
            for k in (1, 2)
        ]  # fmt: skip
        with MapProxy(upstreams, [(1, 2)], title="two sites") as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", "/")
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 302 and answer.headers["Location"] == PAGE_PATH
            conn.request("GET", DOCUMENT_PATH)
            merged = json.loads(conn.getresponse().read())
            assert merged["sources"] == {"1": {"ok": True}, "2": {"ok": True}}
            assert merged["names"] == {"1": "site 1", "2": "site 2"} and merged["title"] == "two sites"
            assert {n["kme_id"] for n in merged["routing"]["nodes"]} == {1, 2}
            conn.request("GET", f"/kme/2{DOCUMENT_PATH}")
            assert json.loads(conn.getresponse().read())["kme_id"] == 2
            conn.request("GET", f"/kme/9{PAGE_PATH}")
            answer = conn.getresponse()
            assert answer.status == 404 and b"no such KME" in answer.read()
            # A page elsewhere reaching this port through a name it controls (DNS rebinding) is refused.
            conn.request("GET", DOCUMENT_PATH, headers={"Host": f"evil.example:{proxy.port}"})
            answer = conn.getresponse()
            assert answer.status == 403 and b"own address" in answer.read()
            conn.close()
    with pytest.raises(MapProxyError, match="loopback addresses only"):
        MapProxy([], [], host="0.0.0.0")
