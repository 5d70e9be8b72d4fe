"""Prometheus metrics of routing, computed from the Router and the exchange when /metrics is scraped.

Gauges:
- ``qkdtls_kme_routing_neighbours_up``: peers heard from within dead_interval;
- ``qkdtls_kme_routing_node_up{kme}``: 1 when that KME is reachable over usable links;
- ``qkdtls_kme_routing_node_saes{kme}``: SAEs it advertises;
- ``qkdtls_kme_routing_link_up{a,b}`` (a < b): 1 when both ends advertise the link up;
- ``qkdtls_kme_routing_link_stock_blocks{from,to}``: free blocks ``from`` draws towards ``to``;
- ``qkdtls_kme_routing_path_hops{destination,path}``: the path ``Router.path`` picks now (KME IDs joined
  by commas), per reachable KME.

Counters: ``qkdtls_kme_routing_adverts_received_total{outcome}`` (installed, known, ignored),
``qkdtls_kme_routing_requests_refused_total{reason}``, ``qkdtls_kme_routing_requests_sent_total``,
``qkdtls_kme_routing_requests_failed_total``, ``qkdtls_kme_routing_adverts_originated_total``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qkdtls.kme.routing import paths
from qkdtls.kme.routing.exchange import LinkStateExchange
from qkdtls.kme.routing.router import Router


class RoutingStats(Collector):
    def __init__(self, router: Router, exchange: LinkStateExchange | None) -> None:
        self._router = router
        self._exchange = exchange

    def collect(self) -> Iterator[Metric]:
        router = self._router
        snapshot = router.snapshot()
        now = router.clock()
        neighbours = GaugeMetricFamily(
            "qkdtls_kme_routing_neighbours_up", "Peer KMEs heard from within dead_interval"
        )
        db = router.db
        neighbours.add_metric((), sum(db.neighbour_up(n, now) for n in db.neighbours) if db else 0)
        yield neighbours

        node_up = GaugeMetricFamily(
            "qkdtls_kme_routing_node_up", "1 when the KME is reachable over usable links", labels=("kme",)
        )
        node_saes = GaugeMetricFamily(
            "qkdtls_kme_routing_node_saes", "SAEs the KME advertises", labels=("kme",)
        )
        for node in snapshot["nodes"]:
            node_up.add_metric((str(node["kme_id"]),), 1 if node["up"] else 0)
            node_saes.add_metric((str(node["kme_id"]),), len(node["saes"]))
        yield node_up
        yield node_saes

        link_up = GaugeMetricFamily(
            "qkdtls_kme_routing_link_up", "1 when both ends advertise the link up", labels=("a", "b")
        )
        stock = GaugeMetricFamily(
            "qkdtls_kme_routing_link_stock_blocks",
            "Free blocks `from` draws towards `to`, as advertised (the lower of both ends' views)",
            labels=("from", "to"),
        )
        for link in snapshot["links"]:
            a, b = str(link["a"]), str(link["b"])
            link_up.add_metric((a, b), 1 if link["up"] else 0)
            for pair, (src, dst) in ((f"{a}->{b}", (a, b)), (f"{b}->{a}", (b, a))):
                value = link["stock_blocks"].get(pair)
                if value is not None:
                    stock.add_metric((src, dst), value)
        yield link_up
        yield stock

        hops = GaugeMetricFamily(
            "qkdtls_kme_routing_path_hops",
            "Links of the path this KME would relay along now, per destination KME",
            labels=("destination", "path"),
        )
        reach = paths.reachable(router.graph(), router.kme_id) - {router.kme_id}
        for destination in sorted(reach):
            path = router.path(destination)
            if path is not None:
                hops.add_metric((str(destination), ",".join(map(str, path))), len(path) - 1)
        yield hops

        exchange = self._exchange
        if exchange is None:
            return
        stats = exchange.stats
        received = CounterMetricFamily(
            "qkdtls_kme_routing_adverts_received",
            "Adverts in accepted link-state requests: installed (new), known (copies), ignored (older)",
            labels=("outcome",),
        )
        for outcome in ("installed", "known", "ignored"):
            received.add_metric((outcome,), stats.received.get(outcome, 0))
        yield received
        refused = CounterMetricFamily(
            "qkdtls_kme_routing_requests_refused",
            "Link-state requests refused, by reason",
            labels=("reason",),
        )
        for reason, count in sorted(stats.refused.items()):
            refused.add_metric((reason,), count)
        yield refused
        yield CounterMetricFamily(
            "qkdtls_kme_routing_requests_sent", "Link-state requests sent to peers", value=stats.sent_requests
        )
        yield CounterMetricFamily(
            "qkdtls_kme_routing_requests_failed",
            "Link-state requests to peers that failed or were refused",
            value=stats.failed_requests,
        )
        yield CounterMetricFamily(
            "qkdtls_kme_routing_adverts_originated",
            "Adverts of this KME with a new seq",
            value=stats.originated,
        )
