"""The network-wide map document merged from the KMEs' documents (pure)."""

from __future__ import annotations

from qkdtls.kme.admin_map import routing_from_links
from qkdtls.network.map_view import merge_documents

SITES = [(1, "A", [1001]), (2, "B", [2001]), (3, "C", [3001])]
LINKS = [(1, 2), (2, 3)]


def _report(peer: int, low: int, high: int) -> dict[str, object]:
    return {"peer_KME_ID": peer, "stock_blocks": {"0": low, "1": high}}


def test_without_routers_the_view_comes_from_the_link_reports() -> None:
    docs = {
        1: {"kme_id": 1, "routing": None, "relay": None, "links": [_report(1, 5, 0), _report(2, 100, 90)]},
        2: {"kme_id": 2, "routing": None, "relay": None, "links": [_report(1, 99, 91), _report(3, 7, 8)]},
        3: "unreachable (HttpClientError)",
    }
    merged = merge_documents(docs, sites=SITES, links=LINKS, title="t")
    routing = merged["routing"]
    assert [(n["kme_id"], n["up"], n["saes"]) for n in routing["nodes"]] == [
        (1, True, [1001]), (2, True, [2001]), (3, False, [3001]),
    ]  # fmt: skip
    assert routing["links"] == [
        {"a": 1, "b": 2, "up": True, "stock_blocks": {"1->2": 100, "2->1": 90}},  # the lower end's counts
        {"a": 2, "b": 3, "up": False, "stock_blocks": {"2->3": 7, "3->2": 8}},
    ]
    assert merged["relay"] is None and merged["names"] == {"1": "A", "2": "B", "3": "C"}
    assert merged["sources"]["3"] == {"ok": False, "error": "unreachable (HttpClientError)"}


def test_a_router_view_is_completed_and_relay_statistics_are_merged() -> None:
    snapshot = {"kme_id": 2, "nodes": [{"kme_id": 1, "up": True, "saes": [], "age_s": 0.1}], "links": []}
    relay_1 = {
        "relays": {"trusted": 2, "failed": 1},
        "last_paths": [{"at": 10.0, "mode": "trusted", "paths": [[1, 2, 3]], "keys": 1}],
        "consumed_bytes": [{"link": [1, 2], "purpose": "key", "mode": "trusted", "bytes": 64}],
        "hops": {"accepted": 3},
    }
    relay_2 = {
        "relays": {"trusted": 1},
        "last_paths": [
            {"at": 10.0, "mode": "trusted", "paths": [[1, 2, 3]], "keys": 1},  # the same relay, seen at 2
            {"at": 12.0, "mode": "spread", "paths": [[3, 2, 1]], "keys": 2},
        ],
        "consumed_bytes": [
            {"link": [2, 1], "purpose": "key", "mode": "trusted", "bytes": 32},  # sent the other way
            {"link": [2, 3], "purpose": "pad", "mode": "trusted", "bytes": 64},
            {"link": "bad", "bytes": 1},
        ],
        "hops": {"accepted": 2, "replay": 1},
    }
    docs = {1: {"routing": None, "relay": relay_1}, 2: {"routing": snapshot, "relay": relay_2}, 3: "HTTP 503"}
    merged = merge_documents(docs, sites=SITES, links=LINKS, title="t")
    nodes = {n["kme_id"]: n for n in merged["routing"]["nodes"]}
    assert nodes[1]["saes"] == [1001]  # filled in from the network's own list
    assert nodes[2]["up"] is None and nodes[3]["up"] is False  # not in the view: unknown / unreachable
    relay = merged["relay"]
    assert relay["relays"] == {"trusted": 3, "failed": 1}
    assert [p["at"] for p in relay["last_paths"]] == [12.0, 10.0]
    assert relay["consumed_bytes"] == [  # each KME counts what it sent: the link's total is the sum
        {"link": [1, 2], "purpose": "key", "mode": "trusted", "bytes": 96},
        {"link": [2, 3], "purpose": "pad", "mode": "trusted", "bytes": 64},
    ]
    assert relay["hops"] == {"accepted": 5, "replay": 1}


def test_one_kme_alone_shows_itself_and_its_peers() -> None:
    view = routing_from_links(4, [_report(4, 9, 9), _report(7, 3, 2), {"peer_KME_ID": "x"}])
    assert view == {
        "kme_id": 4,
        "nodes": [
            {"kme_id": 4, "up": True, "saes": [], "age_s": 0.0},
            {"kme_id": 7, "up": None, "saes": [], "age_s": None},
        ],
        "links": [{"a": 4, "b": 7, "up": None, "stock_blocks": {"4->7": 3, "7->4": 2}}],
    }
