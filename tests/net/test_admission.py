"""The server's bookkeeping of QKD offers, without a KME: static refusals, single use, lookup bounds, logs."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest

from qkdtls.logs import LogLimiter
from qkdtls.net.admission import (
    NEGATIVE_TTL,
    SOURCE_FAILURE_BURST,
    OfferGate,
)
from qkdtls.net.qkd_keys import NonQkdPeers

OWN = 2001


def _gate(allowed: set[int] | None = None, **kwargs: object) -> OfferGate:
    return OfferGate(own_sae_id=lambda: OWN, allowed=lambda: allowed, **kwargs)  # type: ignore[arg-type]


def test_impossible_masters_and_strangers_are_refused_without_a_lookup() -> None:
    key = str(uuid.uuid4())
    gate = _gate()
    for master in (0, -1, -(2**63)):
        assert gate.refusal(master, key) == "master SAE ID out of range"
    assert gate.refusal(OWN, key) == "master SAE ID is this server's own"
    assert gate.refusal(1001, key) is None
    assert _gate({1001}).refusal(1002, key) == "peer SAE not allowed"
    assert _gate(set()).refusal(1001, key) == "peer SAE not allowed"  # client certificates, no list
    gate.refused_by_kme(9999, key, master_unknown=True)
    assert gate.refusal(9999, str(uuid.uuid4())) == "master SAE ID unknown to the KME"
    gate.refused_by_kme(1001, key, master_unknown=False)
    assert gate.refusal(1001, key) == "key recently refused by the KME"
    assert gate.refusal(1001, str(uuid.uuid4())) is None  # the master itself is fine
    assert NEGATIVE_TTL > 0


def test_a_key_is_held_by_one_handshake_and_used_once() -> None:
    gate = _gate()
    key = str(uuid.uuid4())
    assert gate.claim(key)
    assert not gate.claim(key)  # held: a second offer does not wait here
    # A second offer that waits gets the key once the first handshake's binder failed...
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(gate.claim(key, wait=5)))
    waiter.start()
    time.sleep(0.05)
    gate.release(key, used=False)
    waiter.join(5)
    assert got == [True]
    # ... and nothing once the key was used.
    gate.release(key, used=True)
    assert gate.is_used(key) and not gate.claim(key, wait=0.2)
    assert gate.refusal(1001, key) == "key already used"


def test_used_keys_are_bounded_and_expire() -> None:
    gate = _gate(used_key_memory=0.05)
    key = str(uuid.uuid4())
    assert gate.claim(key)
    gate.release(key, used=True)
    assert gate.is_used(key)
    time.sleep(0.1)
    assert not gate.is_used(key)


def test_lookups_are_bounded_in_all_per_address_and_by_failures() -> None:
    gate = _gate(max_lookups=3, max_lookups_per_source=2)
    assert gate.start_lookup("a") is None and gate.start_lookup("a") is None
    assert gate.start_lookup("a") == "too many KME lookups at once from this address"
    assert gate.start_lookup("b") is None
    assert gate.start_lookup("c") == "too many KME lookups at once"
    for source in ("a", "a", "b"):
        gate.end_lookup(source)
    for _ in range(SOURCE_FAILURE_BURST):
        gate.failed("a")
    assert gate.start_lookup("a") == "too many failed lookups from this address"
    assert gate.start_lookup("b") is None  # another address keeps its budget


def test_log_limiter_keeps_count_of_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("qkdtls.test.limiter")
    limited = LogLimiter(logger, burst=3, interval=0.2)
    with caplog.at_level(logging.WARNING, logger="qkdtls.test.limiter"):
        for _ in range(50):
            limited(logging.WARNING, "refused", {"event": "x.refused"})
        limited(logging.WARNING, "other", {"event": "x.other"})
        time.sleep(0.25)
        limited(logging.WARNING, "refused", {"event": "x.refused"})
    events = [(r.getMessage(), getattr(r, "suppressed", 0)) for r in caplog.records]
    assert events == [("refused", 0)] * 3 + [("other", 0), ("refused", 47)]


def test_only_authenticated_evidence_keeps_a_server_from_being_offered_keys() -> None:
    memory = NonQkdPeers()
    assert memory.classic_answer("Server.example", 443)  # a verified classic answer, nothing else known
    assert ("server.example", 443) in memory
    memory.qkd_answer("server.example", 443)  # a TLS-QKD handshake proves it
    assert ("server.example", 443) not in memory
    assert not memory.classic_answer("server.example", 443)  # one classic answer no longer counts
    assert ("server.example", 443) not in memory
