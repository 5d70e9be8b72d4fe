"""Prometheus metrics of the KME's listeners: open and unauthenticated connections, and those closed by the
connection caps and timeouts (``http11.server.ServerLimits``), read from the servers at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qkdtls.http11.server import (
    CLOSED_EVICTED,
    CLOSED_EVICTED_ADDRESS,
    CLOSED_FULL,
    CLOSED_HANDSHAKE,
    CLOSED_UNAUTHENTICATED_TIMEOUT,
    HttpServer,
)

REASONS = (
    CLOSED_FULL,
    CLOSED_EVICTED,
    CLOSED_EVICTED_ADDRESS,
    CLOSED_UNAUTHENTICATED_TIMEOUT,
    CLOSED_HANDSHAKE,
)


class ListenerStats(Collector):
    """``servers``: listener name ("sae", "inter_kme") → its server; read when /metrics is scraped."""

    def __init__(self, servers: Mapping[str, HttpServer]) -> None:
        self._servers = servers

    def collect(self) -> Iterator[Metric]:
        opened = GaugeMetricFamily(
            "qkdtls_kme_connections",
            "Open connections per listener, TLS handshakes in progress included",
            labels=("listener",),
        )
        unauthenticated = GaugeMetricFamily(
            "qkdtls_kme_connections_unauthenticated",
            "Open connections not authenticated yet (no client certificate, or no request answered)",
            labels=("listener",),
        )
        closed = CounterMetricFamily(
            "qkdtls_kme_connections_closed",
            "Connections closed by the connection caps and timeouts, by reason",
            labels=("listener", "reason"),
        )
        for name, server in sorted(self._servers.items()):
            opened.add_metric((name,), server.open_connections)
            unauthenticated.add_metric((name,), server.unauthenticated_connections)
            for reason in REASONS:
                closed.add_metric((name, reason), server.closed.get(reason, 0))
        yield opened
        yield unauthenticated
        yield closed
