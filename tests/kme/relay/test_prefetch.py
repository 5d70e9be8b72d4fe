"""Keys relayed ahead (``[relay] prefetch``, kme/relay/prefetch.py): the buffer on its own (a fake relay and
clock), then across KME services wired in-process with real SQLite stores."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qkdtls.etsi014.models import KeyRequest
from qkdtls.kme.relay.messages import decode_message
from qkdtls.kme.relay.node import RelayFailed
from qkdtls.kme.relay.policy import RelayChoice, RelayPolicy, RelaySettings
from qkdtls.kme.relay.prefetch import (
    MAX_PER_MASTER,
    MAX_REFILL,
    RETRY_AFTER,
    BufferKey,
    KeyBuffer,
    Prefetcher,
)

from .inprocess import Net, chain, network

KEY = BufferKey(1001, 4001, 256, RelayChoice("trusted"))


class FakeRelay:
    """Relays ``number`` fresh keys per call, after ``delay`` seconds; can fail on demand."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[int] = []
        self.fail = False
        self.made: dict[str, bytes] = {}

    async def __call__(self, key: BufferKey, number: int) -> list[tuple[str, bytes]]:
        self.calls.append(number)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("no path")
        out = [(str(uuid.uuid4()), uuid.uuid4().bytes * 2) for _ in range(number)]
        self.made.update(out)
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def filled(relay: FakeRelay, max_age: float = 60.0, clock: Clock | None = None) -> Prefetcher:
    """A prefetcher whose buffer for KEY holds 8 keys (one refill: the first request went on demand)."""
    pre = Prefetcher(relay, max_age=max_age, idle=30.0, clock=clock or time.monotonic)
    assert pre.take(KEY, 8, 1) is None
    await settle()
    assert pre.ready(KEY) == 8 and relay.calls == [8]
    return pre


async def test_each_ready_key_is_handed_out_once_and_refills_come_in_batches() -> None:
    relay = FakeRelay()
    pre = Prefetcher(relay, max_age=60.0, idle=30.0)
    assert pre.take(KEY, 16, 1) is None  # nothing ready yet: on demand, and a refill starts
    await settle()
    assert relay.calls == [16]
    handed: list[str] = []
    for _ in range(200):
        got = pre.take(KEY, 16, 2)
        if got is None:
            await settle()
            continue
        handed.extend(key_id for key_id, _ in got)
        assert all(relay.made[key_id] == data for key_id, data in got)
    assert len(handed) == len(set(handed)) > 100
    # A refill waits until at least a quarter of the target is missing, and asks for what is missing.
    assert all(4 <= n <= 16 for n in relay.calls)
    assert pre.counts["hit"] == len(handed) and pre.counts["relayed"] == sum(relay.calls)
    await pre.close()


async def test_more_than_the_target_or_a_closed_prefetcher_goes_on_demand() -> None:
    pre = await filled(FakeRelay())
    assert pre.take(KEY, 8, 9) is None  # more than the buffer can ever hold
    assert pre.take(KEY, 0, 1) is None  # prefetch off for this destination
    assert pre.take(BufferKey(1001, 4001, 512, KEY.choice), 8, 1) is None  # another size: its own buffer
    assert pre.take(BufferKey(1001, 4001, 256, RelayChoice("spread", 2, 2)), 8, 1) is None  # another mode
    assert pre.ready(KEY) == 8
    await pre.close()
    assert pre.ready(KEY) == 0 and pre.take(KEY, 8, 1) is None


async def test_ready_keys_expire_and_an_idle_pair_is_not_refilled() -> None:
    relay, clock = FakeRelay(), Clock()
    pre = await filled(relay, clock=clock)
    clock.now += 60.0  # max_age: the ready keys are dropped from memory, never handed out
    assert pre.take(KEY, 8, 1) is None
    assert pre.counts["expired"] == 8
    await settle()
    assert relay.calls == [8, 8]  # used just now: refilled
    await pre.close()
    buffer = KeyBuffer(8, 60.0, 30.0, clock.now)
    assert buffer.wanted(clock.now) == 8
    clock.now += 30.5  # nobody asked for this pair in prefetch_idle seconds: no refill
    assert buffer.wanted(clock.now) == 0
    assert buffer.take(1, clock.now) is None  # a request marks it used again
    assert buffer.wanted(clock.now) == 8


async def test_ready_keys_leave_memory_after_max_age_even_if_nobody_asks() -> None:
    pre = await filled(FakeRelay(), max_age=0.05)
    async with asyncio.timeout(5):
        while pre.ready(KEY):
            await asyncio.sleep(0.01)
    assert pre.counts["expired"] == 8 and pre.counts.get("hit", 0) == 0
    await pre.close()


async def test_a_master_cycling_through_sizes_or_slaves_gets_a_bounded_number_of_buffers() -> None:
    relay, clock = FakeRelay(), Clock()
    pre = Prefetcher(relay, max_age=600.0, idle=30.0, clock=clock)
    for i in range(1, 40):  # each request asks for another size, then another slave
        key = BufferKey(1001, 4001 + i // 20, 8 * (i % 20 + 1), KEY.choice)
        assert pre.take(key, 64, 1) is None
        await settle()
    # One refill per buffer, and no more than MAX_PER_MASTER buffers: not 64 keys relayed per request.
    assert len(relay.calls) == MAX_PER_MASTER
    other = BufferKey(2002, 4001, 256, KEY.choice)  # another master SAE is not affected
    pre.take(other, 64, 1)
    await settle()
    assert len(relay.calls) == MAX_PER_MASTER + 1
    clock.now += 31.0  # its buffers idle: a new one may replace the oldest (whose keys are dropped)
    pre.take(BufferKey(1001, 4001, 4096, KEY.choice), 64, 1)
    await settle()
    assert len(relay.calls) == MAX_PER_MASTER + 2 and pre.counts["expired"] == 64
    await pre.close()


async def test_a_failed_refill_is_retried_after_a_pause() -> None:
    relay, clock = FakeRelay(), Clock()
    relay.fail = True
    pre = Prefetcher(relay, max_age=60.0, idle=30.0, clock=clock)
    assert pre.take(KEY, 8, 1) is None
    await settle()
    assert relay.calls == [8]
    assert pre.take(KEY, 8, 1) is None
    await settle()
    assert relay.calls == [8]  # within RETRY_AFTER: no second try
    relay.fail = False
    clock.now += RETRY_AFTER
    pre.take(KEY, 8, 1)
    await settle()
    assert relay.calls == [8, 8] and pre.ready(KEY) == 8
    await pre.close()


async def test_a_refill_never_asks_for_more_than_max_refill() -> None:
    relay = FakeRelay()
    pre = Prefetcher(relay, max_age=60.0, idle=30.0)
    pre.take(KEY, MAX_REFILL * 2, 1)
    await settle()
    assert relay.calls[0] == MAX_REFILL
    await settle()
    assert relay.calls[:2] == [MAX_REFILL, MAX_REFILL]
    await pre.close()


async def test_close_cancels_a_refill_in_flight() -> None:
    relay = FakeRelay(delay=30.0)
    pre = Prefetcher(relay, max_age=60.0, idle=30.0)
    pre.take(KEY, 8, 1)
    await settle()
    assert relay.calls == [8]
    async with asyncio.timeout(5):
        await pre.close()
    assert pre.ready(KEY) == 0


# -- across in-process KMEs ------------------------------------------------------------------------------


@pytest.fixture
async def four(tmp_path: Path) -> AsyncIterator[Net]:
    net = await chain(tmp_path, [1, 2, 3, 4], relay=RelaySettings(default=RelayPolicy(prefetch=8)))
    try:
        yield net
    finally:
        await net.close()


async def _wait_ready(net: Net, count: int) -> None:
    async with asyncio.timeout(10):
        while net.services[1].prefetch.ready(KEY) < count:
            await asyncio.sleep(0.01)


async def test_keys_relayed_ahead_are_the_slaves_keys_and_travel_in_batches(four: Net) -> None:
    one, four_ = four.services[1], four.services[4]
    first = await one.enc_keys(1001, "4001", KeyRequest(number=1))  # on demand; the buffer starts filling
    await _wait_ready(four, 8)
    relayed_before = {k for s in four.sent for item in decode_message(s.body).items for k in item.key_ids}
    handed = list(first.keys)
    for _ in range(6):
        handed.extend((await one.enc_keys(1001, "4001", KeyRequest(number=1))).keys)
    # Six keys from the buffer: every one crossed the links before it was asked for.
    assert {k.key_ID for k in handed[1:]} <= relayed_before
    assert first.keys[0].key_ID in relayed_before
    await _wait_ready(four, 8)  # a refill of the six (at least a quarter of the target was missing)
    got = await four_.dec_keys(4001, "1001", [k.key_ID for k in handed])
    assert [k.key for k in got.keys] == [k.key for k in handed]
    assert all(k.key_extension == {"master_SAE_ID": 1001, "slave_SAE_IDs": [4001]} for k in handed)
    assert len({k.key_ID for k in handed}) == 7
    # Every refill crossed each link as one hop message whose single item carries the whole batch.
    refills = [decode_message(s.body) for s in four.sent[1:] if s.sender == 1]
    assert refills and all(len(m.items) == 1 and len(m.items[0].key_ids) >= 2 for m in refills)
    counts = one.relay_stats()["prefetch"]
    assert counts["hit"] == 6 and counts["miss"] == 1 and counts["relayed"] >= 14


async def test_requests_the_buffer_cannot_serve_are_relayed_on_demand(four: Net) -> None:
    one = four.services[1]
    await one.enc_keys(1001, "4001", KeyRequest(number=1))
    await _wait_ready(four, 8)
    sent = len(four.sent)
    # More keys than the target can ever hold, and another size (its own buffer, empty so far).
    await one.enc_keys(1001, "4001", KeyRequest(number=9))
    await one.enc_keys(1001, "4001", KeyRequest(number=1, size=512))
    assert len(four.sent) > sent
    assert one.prefetch.ready(KEY) == 8
    counts = one.relay_stats()["prefetch"]
    assert counts.get("hit", 0) == 0 and counts["miss"] == 1 + 9 + 1


async def test_a_restarted_origin_hands_out_none_of_the_keys_it_had_ready(four: Net) -> None:
    one, four_ = four.services[1], four.services[4]
    await one.enc_keys(1001, "4001", KeyRequest(number=1))
    await _wait_ready(four, 8)
    ready = {key_id for _, key_id, _ in one.prefetch._buffers[KEY]._keys}
    assert len(ready) == 8
    # A crash: the process and its memory are gone (no close); a new service opens the same store.
    four.services.pop(1)
    store = one.store
    one.prefetch._closed = True
    await one.relay.close()
    await store.close()
    again = four.open(1, RelaySettings(default=RelayPolicy(prefetch=8)))
    handed = []
    for _ in range(10):
        handed.extend((await again.enc_keys(1001, "4001", KeyRequest(number=1))).keys)
        await asyncio.sleep(0.01)
    assert not ready & {k.key_ID for k in handed}
    got = await four_.dec_keys(4001, "1001", [k.key_ID for k in handed])
    assert [k.key for k in got.keys] == [k.key for k in handed]
    # The keys that were ready still wait at KME 4 (until reservation_ttl), handed to nobody.
    orphans = await four_.dec_keys(4001, "1001", sorted(ready))
    assert len(orphans.keys) == 8


async def test_status_counts_the_keys_ready_for_the_pair(four: Net) -> None:
    one = four.services[1]
    await one.enc_keys(1001, "4001", KeyRequest(number=1))
    await _wait_ready(four, 8)
    relayable = await one._relay_capacity(4, 256)  # what the links can pay for, nothing ready counted
    assert (await one.status(1001, "4001")).stored_key_count == relayable + 8


async def test_a_spread_buffer_is_never_refilled_with_keys_that_fell_back_to_trusted(tmp_path: Path) -> None:
    # A square: two node-disjoint paths from KME 1 to KME 4, spread allowed to fall back to trusted.
    relay = RelaySettings(default=RelayPolicy(mode="spread", fallback=True, prefetch=8))
    net = await network(tmp_path, [(1, 2), (2, 4), (1, 3), (3, 4)], relay=relay)
    try:
        one = net.services[1]
        await one.enc_keys(1001, "4001", KeyRequest(number=1))
        spread_key = BufferKey(1001, 4001, 256, RelayChoice("spread", 2, 2, fallback=True))
        async with asyncio.timeout(10):
            while one.prefetch.ready(spread_key) < 8:
                await asyncio.sleep(0.01)
        net.routers[1].down.add(frozenset((3, 4)))  # one path left: a spread would go trusted now
        with pytest.raises(RelayFailed, match="spread relay to KME 4 is not possible now"):
            await one._relay_ahead(spread_key, 4)
        # Requests now plan trusted: they use (and fill) a trusted buffer, never the spread one.
        await one.enc_keys(1001, "4001", KeyRequest(number=1))
        assert one.prefetch.ready(spread_key) == 8
    finally:
        await net.close()
