"""The two stores of announced keys, without a KME: the client's queues and the server's cache.

Bounds (size, age), single use, the master SAE check, and a collection still running being awaited within
its bound.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from qkdtls.net.qkd_keys import AnnouncedKeys, CollectedKeys
from qkdtls.tls.config import QkdOffer

MASTER = 1001


def _offer() -> QkdOffer:
    return QkdOffer(str(uuid.uuid4()), os.urandom(32), MASTER, announced=True)


def test_client_queue_is_per_server_in_order_and_single_use() -> None:
    queue = AnnouncedKeys()
    first, second = _offer(), _offer()
    queue.add("Server.example", 443, 2001, [first, second])
    assert queue.take("server.example", 8443, 2001) is None  # another port, another server
    assert queue.count("server.example", 443) == 2
    assert queue.take("server.example", 443, 2001) is first
    assert queue.take("server.example", 443, 2001) is second
    assert queue.take("server.example", 443, 2001) is None


def test_client_queue_drops_expired_keys_and_keys_for_another_sae() -> None:
    queue = AnnouncedKeys(ttl=0.05)
    queue.add("h", 1, 2001, [_offer()])
    time.sleep(0.06)
    assert queue.count("h", 1) == 0 and queue.take("h", 1, 2001) is None
    queue = AnnouncedKeys()
    queue.add("h", 1, 2001, [_offer(), _offer()])
    assert queue.take("h", 1, 2002) is None  # the directory now says another SAE: the keys are useless
    assert queue.count("h", 1) == 0
    queue.add("h", 1, 2001, [_offer()])
    assert queue.drop("h", 1) == 1 and queue.count("h", 1) == 0


def test_server_cache_single_use_and_master_checked() -> None:
    cache = CollectedKeys()
    ids = [str(uuid.uuid4()) for _ in range(2)]
    assert cache.reserve(MASTER, ids) == ids
    assert cache.reserve(MASTER, ids) == []  # already known: collected once only
    assert cache.collecting == 2
    key = os.urandom(32)
    cache.fill({ids[0]: key, ids[1]: None})  # the KME gave only the first
    assert cache.collecting == 0 and len(cache) == 1
    assert cache.take(MASTER + 1, ids[0]) is None  # another master cannot use it ...
    assert cache.take(MASTER, ids[1]) is None
    assert cache.take(MASTER, ids[0]) == key  # ... its master can, once
    assert cache.take(MASTER, ids[0]) is None
    assert key.hex() not in repr(cache) and key.hex() not in repr(cache._entries)


def test_server_cache_bounds_size_and_age() -> None:
    cache = CollectedKeys(ttl=0.05, limit=3)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    assert cache.reserve(MASTER, ids) == ids[:3]
    cache.fill({i: os.urandom(32) for i in ids[:3]})
    time.sleep(0.06)
    assert cache.take(MASTER, ids[0]) is None
    assert len(cache) == 0
    assert cache.reserve(MASTER, ids[3:]) == ids[3:]  # room again once the old ones expired


def test_server_cache_awaits_a_running_collection_within_its_bound() -> None:
    cache = CollectedKeys()
    key_id, key = str(uuid.uuid4()), os.urandom(32)
    cache.reserve(MASTER, [key_id])
    assert cache.take(MASTER, key_id) is None  # without waiting: not there yet
    started = time.monotonic()
    assert cache.take(MASTER, key_id, wait=0.05) is None  # bounded wait, still not there
    assert 0.04 <= time.monotonic() - started < 1.0
    timer = threading.Timer(0.05, cache.fill, args=({key_id: key},))
    timer.start()
    try:
        assert cache.take(MASTER, key_id, wait=5.0) == key
    finally:
        timer.join(1.0)


@pytest.mark.parametrize("limit", [0, 1])
def test_server_cache_limit_is_respected(limit: int) -> None:
    cache = CollectedKeys(limit=limit)
    assert len(cache.reserve(MASTER, [str(uuid.uuid4()) for _ in range(3)])) == limit
