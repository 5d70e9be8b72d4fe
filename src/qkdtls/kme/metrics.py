"""Prometheus metrics of one KME: a registry per server so several KMEs can live in one process (tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from qkdtls.kme.service import LinkReport

CONTENT_TYPE = CONTENT_TYPE_LATEST

# SAE requests take ~0.3 ms kept alive, a cross-KME enc_keys a few ms; a peer timeout is seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.latency = Histogram(
            "qkdtls_kme_request_seconds",
            "SAE and inter-KME request latency",
            ("route", "method"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.responses = Counter(
            "qkdtls_kme_responses", "Responses by route and status", ("route", "status"), registry=r
        )
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
        self.entropy = Gauge(
            "qkdtls_kme_link_entropy_bits_per_byte",
            "Shannon entropy of the imported key bytes per link",
            ("peer_kme",),
            registry=r,
        )
        self.imported_bytes = Gauge(
            "qkdtls_kme_imported_bytes", "Key bytes imported per link", ("peer_kme",), registry=r
        )
        # labels() validates and locks on every call; a KME has a handful of (route, method, status).
        self._per_request: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        children = self._per_request.get((route, method, status))
        if children is None:
            children = (self.latency.labels(route, method), self.responses.labels(route, str(status)))
            if len(self._per_request) < 4096:  # bounded: routes are fixed, but methods come from clients
                self._per_request[(route, method, status)] = children
        children[0].observe(seconds)
        children[1].inc()

    def update_links(self, reports: Sequence[LinkReport]) -> None:
        for rep in reports:
            peer = str(rep.peer_kme_id)
            for direction, blocks in rep.direction_blocks.items():
                self.stock_blocks.labels(peer, str(direction)).set(blocks)
            self.stock_bytes.labels(peer).set(rep.stock_bytes)
            self.reserved_keys.labels(peer).set(rep.reserved_keys)
            self.entropy.labels(peer).set(rep.entropy_bits_per_byte)
            self.imported_bytes.labels(peer).set(rep.imported_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
