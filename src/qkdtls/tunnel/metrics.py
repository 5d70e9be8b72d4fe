"""Prometheus metrics of a tunnel process, computed when /metrics is read.

Per connection the tunnel only adds to plain integers when the connection ends; bytes of connections still
open are read from their relays at scrape time, so a long transfer shows up while it runs and the relay's
hot path has no metric call.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from qkdtls.tunnel.relay import Relay

CONTENT_TYPE = CONTENT_TYPE_LATEST
# A handshake with prefetch and announcement takes ~2 ms, with KME requests a few ms; a timeout is seconds.
_HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TunnelMetrics(Collector):
    """Counters per service; ``open_relays()`` gives the connections running now (name → relays)."""

    def __init__(self, open_relays: Callable[[], Iterable[tuple[str, Iterable[Relay]]]]) -> None:
        self._open_relays = open_relays
        self.connections: Counter[tuple[str, str, str]] = Counter()  # (service, mode, reason) → closed
        self.bytes: Counter[tuple[str, str]] = Counter()  # (service, direction) of closed connections
        self.rekeys: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # at the connection limit, per service
        self.reloads: Counter[str] = Counter()  # "ok" / "failed"
        self._handshakes: dict[str, list[float]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def record(self, relay: Relay) -> None:
        info = relay.info
        mode = info.mode if info is not None else "none"
        self.connections[(relay.service, mode, relay.reason or "closed")] += 1
        self.bytes[(relay.service, "upstream")] += relay.bytes[0]
        self.bytes[(relay.service, "downstream")] += relay.bytes[1]
        if relay.tls is not None:
            self.rekeys[relay.service] += len(relay.tls.rekeyed_key_ids)
        if relay.handshake_seconds is not None and info is not None:
            entry = self._handshakes.get(relay.service)
            if entry is None:
                entry = self._handshakes[relay.service] = [0.0] * (len(_HANDSHAKE_BUCKETS) + 2)
            entry[bisect_left(_HANDSHAKE_BUCKETS, relay.handshake_seconds)] += 1
            entry[-1] += relay.handshake_seconds

    def collect(self) -> Iterator[Metric]:
        open_now = GaugeMetricFamily(
            "qkdtls_tunnel_connections_open",
            "connections open now (set-ups waiting for a KME or a handshake included)",
            labels=("service",),
        )
        bytes_total = Counter(self.bytes)
        for service, relays in self._open_relays():
            count = 0
            for relay in relays:
                count += 1
                bytes_total[(service, "upstream")] += relay.bytes[0]
                bytes_total[(service, "downstream")] += relay.bytes[1]
            open_now.add_metric((service,), count)
        yield open_now
        closed = CounterMetricFamily(
            "qkdtls_tunnel_connections",
            "connections ended, by TLS mode (qkd, classic, none: no handshake) and reason",
            labels=("service", "mode", "reason"),
        )
        for (service, mode, reason), n in sorted(self.connections.items()):
            closed.add_metric((service, mode, reason), n)
        yield closed
        moved = CounterMetricFamily(
            "qkdtls_tunnel_bytes",
            "plaintext bytes relayed: upstream = from the accepted side to the target, downstream = back",
            labels=("service", "direction"),
        )
        for (service, direction), n in sorted(bytes_total.items()):
            moved.add_metric((service, direction), n)
        yield moved
        refused = CounterMetricFamily(
            "qkdtls_tunnel_refused",
            "connections closed at accept: the service's max_connections",
            labels=("service",),
        )
        for service, n in sorted(self.refused.items()):
            refused.add_metric((service,), n)
        yield refused
        rekeys = CounterMetricFamily(
            "qkdtls_tunnel_rekeys", "in-connection QKD rekeys of ended connections", labels=("service",)
        )
        for service, n in sorted(self.rekeys.items()):
            rekeys.add_metric((service,), n)
        yield rekeys
        handshakes = HistogramMetricFamily(
            "qkdtls_tunnel_handshake_seconds",
            "set-up of the TLS side: KME requests, TCP connect (client mode) and the handshake",
            labels=("service",),
        )
        for service, entry in sorted(self._handshakes.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*map(str, _HANDSHAKE_BUCKETS), "+Inf"), entry[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            handshakes.add_metric((service,), buckets, entry[-1])
        yield handshakes
        reloads = CounterMetricFamily(
            "qkdtls_tunnel_reloads", "configuration reloads (SIGHUP)", labels=("result",)
        )
        for result in ("ok", "failed"):
            reloads.add_metric((result,), self.reloads[result])
        yield reloads

    def render(self) -> bytes:
        return generate_latest(self.registry)
