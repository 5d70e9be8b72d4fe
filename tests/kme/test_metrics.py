"""Request statistics exported in the Prometheus text format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from qkdtls.kme.metrics import KmeMetrics


def _samples(metrics: KmeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_latency_buckets_are_cumulative_and_inclusive() -> None:
    m = KmeMetrics(1)
    route = "/api/v1/keys/{slave}/enc_keys"
    for seconds in (0.0005, 0.0004, 0.003, 11.0):
        m.observe(route, "POST", 200, seconds)
    m.observe(route, "POST", 503, 0.02)
    s = _samples(m)

    def bucket(le: str) -> float:
        return s[("qkdtls_kme_request_seconds_bucket", (("le", le), ("method", "POST"), ("route", route)))]

    assert bucket("0.0005") == 2  # le is inclusive
    assert bucket("0.005") == 3
    assert bucket("10.0") == 4
    assert bucket("+Inf") == 5
    assert s[("qkdtls_kme_request_seconds_count", (("method", "POST"), ("route", route)))] == 5
    total = s[("qkdtls_kme_request_seconds_sum", (("method", "POST"), ("route", route)))]
    assert abs(total - 11.0239) < 1e-9
    assert s[("qkdtls_kme_responses_total", (("route", route), ("status", "200")))] == 4
    assert s[("qkdtls_kme_responses_total", (("route", route), ("status", "503")))] == 1


def test_methods_from_clients_do_not_create_series() -> None:
    m = KmeMetrics(1)
    for i in range(100):
        m.observe("unmatched", f"X{i}", 400, 0.001)
    s = _samples(m)
    methods = {dict(labels).get("method") for name, labels in s if name == "qkdtls_kme_request_seconds_count"}
    assert methods == {"other"}
