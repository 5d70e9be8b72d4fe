"""Routing between real KME processes on loopback: convergence, routing around a dead KME, a KME killed with
kill -9 that rejoins on its own, hostile link-state requests, and a KME that stays responsive while flooded.

What each KME knows is read from its Prometheus metrics (administrator certificate), as an operator would.
Timings are printed (pytest -s) and bounded generously: they must hold on a loaded two-core machine.
"""

from __future__ import annotations

import http.client
import json
import ssl
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qkdtls.etsi014.client import KmeClient, KmeClientSettings
from qkdtls.kme.routing.lsa import MAX_BODY_BYTES, LinkState, encode_batch, make_advert
from qkdtls.testbed import Testbed, chain, ring, sites_saes

from ..fibre import CuttableLink, route_through

# A start, a convergence or a reroute must happen within these bounds (they are far above the measured
# times: seconds on an idle machine) so that a loaded machine does not fail the tests.
BOUND = 30.0
DEAD_INTERVAL = 3.0  # the default [network] timers are used
HELLO_INTERVAL = 1.0


@dataclass
class View:
    """What one KME's routing metrics say."""

    nodes_up: dict[int, float] = field(default_factory=dict)
    node_saes: dict[int, float] = field(default_factory=dict)
    links_up: dict[tuple[int, int], float] = field(default_factory=dict)
    paths: dict[int, str] = field(default_factory=dict)
    refused: dict[str, float] = field(default_factory=dict)

    def complete(self, kmes: list[int], links: list[tuple[int, int]]) -> bool:
        """Every KME reachable with its one SAE, every link up, nothing else."""
        return (
            self.nodes_up == dict.fromkeys(kmes, 1.0)
            and self.node_saes == dict.fromkeys(kmes, 1.0)
            and self.links_up == dict.fromkeys(links, 1.0)
        )


def _https(bed: Testbed, url: str, cert: Path, key: Path, ca: Path) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(cert, key)
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)


def view(bed: Testbed, kme_id: int) -> View:
    conn = _https(bed, bed.sae_url(kme_id), *bed.admin_credentials(kme_id))
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = View()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == "qkdtls_kme_routing_node_up":
                out.nodes_up[int(labels["kme"])] = s.value
            elif s.name == "qkdtls_kme_routing_node_saes":
                out.node_saes[int(labels["kme"])] = s.value
            elif s.name == "qkdtls_kme_routing_link_up":
                out.links_up[(int(labels["a"]), int(labels["b"]))] = s.value
            elif s.name == "qkdtls_kme_routing_path_hops":
                out.paths[int(labels["destination"])] = labels["path"]
            elif s.name == "qkdtls_kme_routing_requests_refused_total":
                out.refused[labels["reason"]] = s.value
    return out


def wait_until(what: str, condition: Callable[[], bool], bound: float = BOUND) -> float:
    """Seconds until ``condition()`` held (polled every 50 ms); fails the test after ``bound``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > bound:
            pytest.fail(f"{what}: not within {bound} s")
        time.sleep(0.05)
    return time.monotonic() - start


def post_link_state(
    bed: Testbed, to_kme: int, body: bytes, *, as_kme: int | None = None, sae: int | None = None
) -> tuple[int, Any]:
    """POST to ``to_kme``'s link-state endpoint as its peer ``as_kme`` (its inter-KME client certificate),
    or with the certificate of ``sae`` (trusted by the listener, but no peer)."""
    zone = bed.pki.zones[to_kme]
    if as_kme is not None:
        issued = bed.pki.zones[as_kme].inter_kme_clients[to_kme]
    else:
        assert sae is not None
        issued = bed.pki.zones[bed.kme_of(sae)].saes[sae]
    conn = _https(bed, bed.inter_kme_url(to_kme), issued.cert, issued.key, zone.ca)
    try:
        conn.request("POST", "/kme/v1/link-state", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        status, raw = response.status, response.read()
    finally:
        conn.close()
    return status, json.loads(raw) if raw else None


def _client(bed: Testbed, sae: int) -> KmeClient:
    cert, key, ca = bed.sae_credentials(sae)
    return KmeClient(KmeClientSettings(bed.sae_url(bed.kme_of(sae)), cert, key, ca, timeout=10.0))


def test_a_chain_of_four_converges_refuses_bad_adverts_and_rejoins_after_kill_9(tmp_path: Path) -> None:
    kmes, links = [1, 2, 3, 4], chain(4)
    bed = Testbed.create(tmp_path, saes=sites_saes(4), links=links, initial_key_bytes=8192, local_key_bytes=0)
    ready: list[float] = []
    bed.start(on_ready=lambda _: ready.append(time.monotonic()))
    try:
        converged = wait_until(
            "every KME knows every link and SAE",
            lambda: all(view(bed, k).complete(kmes, links) for k in kmes),
        )
        first = time.monotonic() - ready[0]
        print(
            f"\nchain of 4: converged {converged:.2f} s after the last start ({first:.2f} s after the first)"
        )
        assert view(bed, 1).paths == {2: "1,2", 3: "1,2,3", 4: "1,2,3,4"}
        assert view(bed, 4).paths == {1: "4,3,2,1", 2: "4,3,2", 3: "4,3"}

        _hostile_link_state_requests(bed)
        time.sleep(2 * HELLO_INTERVAL)  # anything wrongly installed would have been flooded by now
        for k in kmes:
            seen = view(bed, k)
            assert seen.complete(kmes, links), f"KME {k}: {seen}"  # no KME 99, no SAE 9999, 1-2 up
        refused = view(bed, 2).refused
        for reason in ("stale", "MalformedAdvert", "OversizedAdvert", "LoopingAdvert", "not_a_peer"):
            assert refused.get(reason, 0) >= 1, refused

        # kill -9 the middle KME 3: 1 and 2 lose 3 and 4 within dead_interval and a hello or two.
        bed.kill(3)
        lost = wait_until(
            "KME 1 routes around nothing: 3 and 4 unreachable",
            lambda: (v := view(bed, 1)).nodes_up.get(3) == 0 and v.nodes_up.get(4) == 0 and 3 not in v.paths,
        )
        print(f"chain of 4: KME 3 killed, KME 1 saw 3 and 4 unreachable after {lost:.2f} s")
        assert lost >= DEAD_INTERVAL - 0.5  # not before its neighbours could know
        bed.start_kme(3)
        rejoined = wait_until(
            "KME 3 rejoins on its own", lambda: all(view(bed, k).complete(kmes, links) for k in kmes)
        )
        print(f"chain of 4: KME 3 restarted, every KME complete again {rejoined:.2f} s after it was ready")
        assert view(bed, 1).paths[4] == "1,2,3,4"

        _flood_stays_responsive(bed)
    finally:
        bed.stop()


def _hostile_link_state_requests(bed: Testbed) -> None:
    """At KME 2, as its peer KME 1 (or with a certificate that is no peer's): each refused with 400/401."""
    own_old = make_advert(1, 1, [LinkState(2, False, 0, 0)], [1001], path=(1,))  # seq 1: long replaced
    fake = make_advert(99, 2**62, [LinkState(2, True, 10**6, 10**6)], [9999], path=(99, 1))

    def body(*adverts: Any) -> bytes:
        return encode_batch(adverts)

    peer1 = {"as_kme": 1}
    cases: list[tuple[bytes, dict[str, Any], int, str]] = [
        (b"{", {"as_kme": 1}, 400, "not valid JSON"),
        (b'{"version": 1, "adverts": [{"origin": "1"}]}', {"as_kme": 1}, 400, "adverts[0].origin"),
        (body(*[make_advert(i, 1, [], [], path=(i, 1)) for i in range(1, 66)]), peer1, 400, "at most 64"),
        (b'{"pad": "' + b"x" * MAX_BODY_BYTES + b'"}', {"as_kme": 1}, 400, f"at most {MAX_BODY_BYTES} bytes"),
        (body(own_old, fake), {"as_kme": 1}, 400, "older than the one installed"),  # a replay
        (body(own_old, fake.sent_by(3)), {"as_kme": 1}, 400, "must end with the sender"),  # misrouted
        (body(make_advert(99, 5, [], [9999], path=(99, 2, 1)), own_old), peer1, 400, "passed through KME 2"),
        (body(make_advert(1, 1, [], [], path=(1, 1))), {"as_kme": 1}, 400, "passes through a KME twice"),
        (body(own_old.sent_by(1)), {"as_kme": 1}, 400, "passes through a KME twice"),
        (body(fake), {"sae": 1001}, 401, "does not identify a peer KME"),
    ]  # fmt: skip
    for raw, who, status, words in cases:
        got, doc = post_link_state(bed, 2, raw, **who)
        assert (got, words in doc["message"]) == (status, True), (who, raw[:80], got, doc)
    # The replay's answer names the seq KME 2 holds, so an honest KME 1 that restarted with a clock gone back
    # can continue above it.
    _, doc = post_link_state(bed, 2, body(own_old, fake), as_kme=1)
    (detail,) = doc["details"]
    assert detail["origin"] == 1 and detail["known_seq"] > 1


def _flood_stays_responsive(bed: Testbed) -> None:
    """KME 2 flooded with the largest link-state requests by its peer 3 while SAE 2001 asks for its status:
    answers stay prompt, and the link to KME 1 (another peer) stays up."""
    links = [LinkState(5000 + j, True, 1, 1) for j in range(100)]
    big = encode_batch(
        [make_advert(3, 1, [], [], path=(3,))]  # a replayed own advert: refused after a full decode
        + [make_advert(100 + i, 1, links, range(400), path=(100 + i, 3)) for i in range(20)]
    )
    assert len(big) <= MAX_BODY_BYTES

    def latencies(seconds: float) -> list[float]:
        out = []
        with _client(bed, 2001) as sae:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                start = time.monotonic()
                sae.status("1001")
                out.append(time.monotonic() - start)
                time.sleep(0.02)
        return out

    quiet = latencies(1.5)
    statuses: dict[int, int] = {}
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            status, _ = post_link_state(bed, 2, big, as_kme=3)
            statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=flood) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        loaded = latencies(3.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    (qm, qx), (fm, fx) = ((statistics.median(v) * 1000, max(v) * 1000) for v in (quiet, loaded))
    print(f"flood of {sum(statuses.values())} link-state requests of {len(big)} bytes, answers {statuses}")
    print(f"SAE status latency median/max: {fm:.1f}/{fx:.1f} ms flooded, {qm:.1f}/{qx:.1f} ms quiet")
    assert statuses.get(429, 0) > 0 and set(statuses) <= {400, 429}  # the byte budget held it back
    assert max(loaded) < 2.0
    assert view(bed, 2).links_up[(1, 2)] == 1.0


def test_a_ring_of_five_routes_around_a_cut_link_and_a_stopped_kme(tmp_path: Path) -> None:
    kmes, links = [1, 2, 3, 4, 5], sorted(ring(5))
    bed = Testbed.create(tmp_path, saes=sites_saes(5), links=links, initial_key_bytes=8192, local_key_bytes=0)
    fibre = [CuttableLink(bed.kmes[3].inter_kme_port), CuttableLink(bed.kmes[2].inter_kme_port)]
    route_through(bed, 2, 3, fibre[0])
    route_through(bed, 3, 2, fibre[1])
    ready: list[float] = []
    bed.start(on_ready=lambda _: ready.append(time.monotonic()), redraw_ports=False)
    try:
        converged = wait_until(
            "the ring converges", lambda: all(view(bed, k).complete(kmes, links) for k in kmes)
        )
        first = time.monotonic() - ready[0]
        print(
            f"\nring of 5: converged {converged:.2f} s after the last start ({first:.2f} s after the first)"
        )
        assert view(bed, 2).paths[4] == "2,3,4" and view(bed, 2).paths[3] == "2,3"

        for link in fibre:  # both KMEs run, but no longer reach each other
            link.cut()
        rerouted = wait_until(
            "KME 2 routes around the cut link",
            lambda: (v := view(bed, 2)).paths.get(3) == "2,1,5,4,3" and v.paths.get(4) == "2,1,5,4",
        )
        print(f"ring of 5: link 2-3 cut, KME 2 routes 2,1,5,4,3 after {rerouted:.2f} s")
        wait_until(
            "every KME sees the link down, and nothing else",
            lambda: all(
                (v := view(bed, k)).links_up == {**dict.fromkeys(links, 1.0), (2, 3): 0.0}
                and v.nodes_up == dict.fromkeys(kmes, 1.0)
                for k in kmes
            ),
        )
        assert view(bed, 3).paths[2] == "3,4,5,1,2"

        for link in fibre:
            link.cut(False)
        healed = wait_until("the link heals", lambda: view(bed, 2).paths.get(4) == "2,3,4")
        print(f"ring of 5: link 2-3 restored, KME 2 routes 2,3,4 again after {healed:.2f} s")

        bed.stop_kme(3)
        stopped = wait_until(
            "KME 2 routes to 4 the other way", lambda: view(bed, 2).paths.get(4) == "2,1,5,4"
        )
        print(f"ring of 5: KME 3 stopped, KME 2 routes 2,1,5,4 after {stopped:.2f} s")
        wait_until(
            "KME 4 too",
            lambda: (
                (v := view(bed, 4)).paths.get(2) == "4,5,1,2"
                and v.links_up.get((2, 3)) == 0
                and v.links_up.get((3, 4)) == 0
                and v.nodes_up.get(3) == 0
            ),
        )
    finally:
        bed.stop()
        for link in fibre:
            link.close()
