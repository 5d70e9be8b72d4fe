"""Prometheus metrics of one KME: a registry per server so several KMEs can live in one process (tests)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from qkdtls.kme.relay.stats import RelayStats
from qkdtls.kme.service import LinkReport

CONTENT_TYPE = CONTENT_TYPE_LATEST

# SAE requests take ~0.3 ms kept alive, a cross-KME enc_keys a few ms; a peer timeout is seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
_MAX_SERIES = 4096  # routes are fixed, but methods and statuses come from clients


class RequestStats(Collector):
    """Latency histogram and response counts per route, collected at scrape time.

    Every request is observed; prometheus_client's Histogram and Counter children lock and walk their
    buckets in Python on each call, which cost several µs per request. Plain integers do the same job and
    are turned into metric families only when /metrics is read.
    """

    def __init__(self) -> None:
        self._latency: dict[tuple[str, str], list[float]] = {}  # bucket counts..., +Inf count, sum
        self._responses: dict[tuple[str, str], int] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "other"
        entry = self._latency.get((route, method))
        if entry is None:
            if len(self._latency) >= _MAX_SERIES:
                return
            entry = self._latency[(route, method)] = [0.0] * (len(_LATENCY_BUCKETS) + 2)
        entry[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        entry[-1] += seconds
        key = (route, str(status))
        if key in self._responses or len(self._responses) < _MAX_SERIES:
            self._responses[key] = self._responses.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        latency = HistogramMetricFamily(
            "qkdtls_kme_request_seconds", "SAE and inter-KME request latency", labels=("route", "method")
        )
        for (route, method), entry in sorted(self._latency.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), entry[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric((route, method), buckets, entry[-1])
        yield latency
        responses = CounterMetricFamily(
            "qkdtls_kme_responses", "Responses by route and status", labels=("route", "status")
        )
        for (route, status), count in sorted(self._responses.items()):
            responses.add_metric((route, status), count)
        yield responses


class PolicyStats(Collector):
    """Refusals by reason and uncollected keys per master SAE, as the service last reported them."""

    def __init__(self) -> None:
        self.refusals: Mapping[str, int] = {}
        self.uncollected: Mapping[int, int] = {}

    def collect(self) -> Iterator[Metric]:
        refusals = CounterMetricFamily(
            "qkdtls_kme_refusals",
            "enc_keys requests (and peer reservations) refused: master_rate, pair_rate, uncollected, "
            "reservation_uncollected, stock",
            labels=("reason",),
        )
        for reason, count in sorted(self.refusals.items()):
            refusals.add_metric((reason,), count)
        yield refusals
        uncollected = GaugeMetricFamily(
            "qkdtls_kme_uncollected_keys",
            "Keys stored at this KME and not yet collected by every slave, per master SAE",
            labels=("master_sae",),
        )
        for master, count in sorted(self.uncollected.items()):
            uncollected.add_metric((str(master),), count)
        yield uncollected


class RelayMetrics(Collector):
    """The relay node's counters (kme/relay/stats.py), read at scrape time."""

    def __init__(self) -> None:
        self.stats: RelayStats | None = None

    def collect(self) -> Iterator[Metric]:
        consumed = CounterMetricFamily(
            "qkdtls_kme_relay_bytes",
            "Link key material this KME consumed as the sender of relay messages, per link, purpose (key: "
            "blocks that became a key or share, pad: one-time pads, mac: one-time MAC keys) and mode",
            labels=("peer_kme", "purpose", "mode"),
        )
        relays = CounterMetricFamily(
            "qkdtls_kme_relays",
            "Relays this KME originated (enc_keys for SAEs behind other KMEs), per mode and outcome",
            labels=("mode", "outcome"),
        )
        hops = CounterMetricFamily(
            "qkdtls_kme_relay_hops",
            "Relay hop messages received: accepted, malformed, replay, tampered, unavailable",
            labels=("outcome",),
        )
        prefetch = CounterMetricFamily(
            "qkdtls_kme_relay_prefetch_keys",
            "Keys for SAEs behind other KMEs with [relay] prefetch on: hit (handed out relayed ahead), miss "
            "(relayed on demand), relayed (relayed ahead), expired (dropped unused after prefetch_max_age)",
            labels=("outcome",),
        )
        stats = self.stats
        if stats is not None:
            for outcome, count in sorted(stats.prefetch.items()):
                prefetch.add_metric((outcome,), count)
            for (peer, purpose, mode), nbytes in sorted(stats.consumed.items()):
                consumed.add_metric((str(peer), purpose, mode), nbytes)
            for (mode, outcome), count in sorted(stats.relays.items()):
                relays.add_metric((mode, outcome), count)
            for outcome, count in sorted(stats.hops.items()):
                hops.add_metric((outcome,), count)
        yield consumed
        yield relays
        yield hops
        yield prefetch


class KmeMetrics:
    def __init__(self, kme_id: int) -> None:
        self.kme_id = kme_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.keys_delivered = Counter(
            "qkdtls_kme_keys_delivered", "Keys handed to master SAEs (enc_keys)", registry=r
        )
        self.keys_collected = Counter(
            "qkdtls_kme_keys_collected", "Keys handed to slave SAEs (dec_keys)", registry=r
        )
        self.keys_expired = Counter(
            "qkdtls_kme_keys_expired", "Reservations erased uncollected after the TTL", registry=r
        )
        self.reservations_accepted = Counter(
            "qkdtls_kme_reservations_accepted", "Keys reserved on request of a peer KME", registry=r
        )
        self.requests = RequestStats()
        r.register(self.requests)
        self.policy = PolicyStats()
        r.register(self.policy)
        self.relay = RelayMetrics()
        r.register(self.relay)
        self.stock_blocks = Gauge(
            "qkdtls_kme_stock_blocks",
            "Free key blocks per link and direction",
            ("peer_kme", "direction"),
            registry=r,
        )
        self.stock_bytes = Gauge(
            "qkdtls_kme_stock_bytes", "Free key bytes per link", ("peer_kme",), registry=r
        )
        self.reserved_keys = Gauge(
            "qkdtls_kme_reserved_keys",
            "Keys reserved and not yet collected per link",
            ("peer_kme",),
            registry=r,
        )
        self.recollectable_keys = Gauge(
            "qkdtls_kme_recollectable_keys",
            "Keys collected by every slave and kept for their re-collection window, per link",
            ("peer_kme",),
            registry=r,
        )
        self.entropy = Gauge(
            "qkdtls_kme_link_entropy_bits_per_byte",
            "Shannon entropy of the imported key bytes per link",
            ("peer_kme",),
            registry=r,
        )
        self.imported_bytes = Gauge(
            "qkdtls_kme_imported_bytes", "Key bytes imported per link", ("peer_kme",), registry=r
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.observe(route, method, status, seconds)

    def update_links(self, reports: Sequence[LinkReport]) -> None:
        for rep in reports:
            peer = str(rep.peer_kme_id)
            for direction, blocks in rep.direction_blocks.items():
                self.stock_blocks.labels(peer, str(direction)).set(blocks)
            self.stock_bytes.labels(peer).set(rep.stock_bytes)
            self.reserved_keys.labels(peer).set(rep.reserved_keys)
            self.recollectable_keys.labels(peer).set(rep.recollectable_keys)
            self.entropy.labels(peer).set(rep.entropy_bits_per_byte)
            self.imported_bytes.labels(peer).set(rep.imported_bytes)

    def update_policy(self, refusals: Mapping[str, int], uncollected: Mapping[int, int]) -> None:
        self.policy.refusals = dict(refusals)
        self.policy.uncollected = dict(uncollected)

    def watch_relay(self, stats: RelayStats) -> None:
        """Export a relay node's counters (read at each scrape)."""
        self.relay.stats = stats

    def render(self) -> bytes:
        return generate_latest(self.registry)
