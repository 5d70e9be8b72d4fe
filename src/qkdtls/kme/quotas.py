"""Quotas on key delivery: token buckets per master SAE and per SAE pair, and a cap on uncollected keys.

Without them one SAE can drain a link: it asks for keys as fast as the KME answers, and whatever its slaves
never collect stays reserved at the slave KME until ``reservation_ttl``. Rates are counted in keys (not
requests) and checked by the master's KME before it touches the store; the cap on uncollected keys is
checked by the KME that stores them (the slave's KME, or this KME for a local pair) in the same transaction
that records the keys, from a counter kept in the store, so it holds across restarts.

Pure bookkeeping: no I/O, no clock of its own (callers pass ``now``, monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BURST = 128  # keys: one request of the default max_key_per_request
DEFAULT_MAX_UNCOLLECTED = 4096  # keys per master SAE at one KME (128 KiB of 256-bit keys)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``rate`` keys per second on average, at most ``burst`` keys at once after a pause."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")


@dataclass(frozen=True, slots=True)
class SaeQuota:
    """The limits that apply to one master SAE (None / 0: no limit)."""

    master_rate: RateLimit | None = None  # all its enc_keys at this KME together
    pair_rate: RateLimit | None = None  # each (master, slave) pair, unless QuotaSettings.pairs says otherwise
    max_uncollected: int = DEFAULT_MAX_UNCOLLECTED  # keys stored here and not yet collected by every slave


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    default: SaeQuota = SaeQuota()
    saes: Mapping[int, SaeQuota] = field(default_factory=dict)  # per master SAE, complete (defaults merged)
    pairs: Mapping[tuple[int, int], RateLimit] = field(default_factory=dict)  # (master, slave) overrides

    def of(self, master: int) -> SaeQuota:
        return self.saes.get(master, self.default)


class QuotaRefused(Exception):
    """A request exceeds a quota; ``reason`` is a metric label, the message is safe to show the caller."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TokenBucket:
    __slots__ = ("limit", "stamp", "tokens")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.tokens = float(limit.burst)
        self.stamp = now

    def wait_for(self, n: int, now: float) -> float:
        """0.0 and the ``n`` tokens are taken, or the seconds until they would be there (nothing taken)."""
        limit = self.limit
        if now > self.stamp:
            self.tokens = min(float(limit.burst), self.tokens + (now - self.stamp) * limit.rate)
            self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / limit.rate

    def give_back(self, n: int) -> None:
        self.tokens = min(float(self.limit.burst), self.tokens + n)


class RateLimiter:
    """Token buckets of one KME; buckets exist only for configured SAEs (the service checks IDs first)."""

    def __init__(self, settings: QuotaSettings) -> None:
        self.settings = settings
        self._masters: dict[int, TokenBucket] = {}
        self._pairs: dict[tuple[int, int], TokenBucket] = {}

    @staticmethod
    def _bucket(table: dict[Any, TokenBucket], key: Any, limit: RateLimit, now: float) -> TokenBucket:
        bucket = table.get(key)
        if bucket is None or bucket.limit != limit:
            bucket = table[key] = TokenBucket(limit, now)
        return bucket

    def admit(self, master: int, slave: int, number: int, now: float) -> None:
        """Take ``number`` keys from the master's and the pair's buckets, or raise :class:`QuotaRefused`
        (then neither bucket changes)."""
        quota = self.settings.of(master)
        pair_limit = self.settings.pairs.get((master, slave), quota.pair_rate)
        master_bucket = pair_bucket = None
        if quota.master_rate is not None:
            master_bucket = self._bucket(self._masters, master, quota.master_rate, now)
            self._check(master_bucket, number, now, "master_rate", f"SAE {master}")
        if pair_limit is not None:
            pair_bucket = self._bucket(self._pairs, (master, slave), pair_limit, now)
            try:
                self._check(pair_bucket, number, now, "pair_rate", f"SAE pair {master} -> {slave}")
            except QuotaRefused:
                if master_bucket is not None:
                    master_bucket.give_back(number)
                raise

    @staticmethod
    def _check(bucket: TokenBucket, number: int, now: float, reason: str, who: str) -> None:
        limit = bucket.limit
        if number > limit.burst:
            raise QuotaRefused(
                reason, f"rate limit of {who}: at most {limit.burst} keys per request (burst); ask for fewer"
            )
        wait = bucket.wait_for(number, now)
        if wait > 0:
            raise QuotaRefused(
                reason,
                f"rate limit of {who}: {limit.rate:g} keys/s, burst {limit.burst}; retry in {wait:.2f} s",
            )
