"""Keys relayed ahead on a chain of three real KME processes (1-2-3, ``[relay] prefetch = 16`` at KME 1;
SAE 1001 at KME 1 asks for keys with SAE 3001 at KME 3), and kill -9 of the origin KME:

1. while a refill is stored at KME 3 and not yet in KME 1's buffer (``relay-kill-before-answer`` at the
   refill): the refill's keys wait at KME 3, handed to nobody;
2. with keys ready in KME 1's memory: after the restart none of them is handed out; they too wait at KME 3.

Across both: every key the master SAE received is collected by the slave with the same bytes, and no key
(ID or bytes) is handed out twice.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest

from qkdtls.kme.faults import FAULT_ENV
from qkdtls.testbed import Testbed, chain, sites_saes

from ..conftest import Caller
from .network import CONVERGE, Tally, admin, caller, ids, make_bed, relay_until_ok, reserved_keys, routed

TARGET = 16


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    root = tmp_path_factory.mktemp("prefetch")
    testbed = make_bed(
        root / "bed",
        sites_saes(3),
        chain(3),
        key_bytes=1 << 20,
        site_config={1: {"relay": {"prefetch": TARGET}}},
    )
    testbed.start()
    try:
        yield testbed
    finally:
        testbed.stop()


async def _metric(bed: Testbed, kme: int, outcome: str) -> int:
    who = admin(bed, kme)
    try:
        text = (await who.get("/metrics")).body.decode()
    finally:
        await who.close()
    line = f'qkdtls_kme_relay_prefetch_keys_total{{outcome="{outcome}"}} '
    return sum(int(float(row.removeprefix(line))) for row in text.splitlines() if row.startswith(line))


async def _ready(bed: Testbed) -> int:
    """Keys ready at KME 1 once no refill runs (relayed - handed out - expired, stable for 0.3 s)."""
    deadline = time.monotonic() + CONVERGE
    last = -1
    while True:
        counts = [await _metric(bed, 1, o) for o in ("relayed", "hit", "expired")]
        ready = counts[0] - counts[1] - counts[2]
        if ready == last and ready >= TARGET * 3 // 4:
            return ready
        assert time.monotonic() < deadline, f"KME 1 has {ready} keys ready"
        last = ready
        await asyncio.sleep(0.3)


async def _use(master: Caller, slave: Caller, tally: Tally, requests: int) -> None:
    for _ in range(requests):
        sent = await relay_until_ok(master, 3001, {"number": 1})
        tally.deliver(sent)
        got = await slave.post("/api/v1/keys/1001/dec_keys", ids(sent))
        assert got.status == 200, got.body
        tally.collect(got.json["keys"])


async def _start(bed: Testbed, fault: str | None = None) -> None:
    if fault is not None:
        os.environ[FAULT_ENV] = fault
    try:
        await asyncio.to_thread(bed.start_kme, 1)
    finally:
        os.environ.pop(FAULT_ENV, None)


@pytest.mark.timeout(180)
async def test_kill_9_of_the_origin_during_a_refill_and_with_keys_ready(bed: Testbed) -> None:
    tally = Tally()
    master, slave = caller(bed, 1001), caller(bed, 3001)
    try:
        await routed(master, 3001)
        # 1. Relay 1 is the first request (on demand), relay 2 the first refill: KME 1 dies once the refill's
        # keys are stored at KME 3, before they reach its buffer.
        await asyncio.to_thread(bed.kill, 1)
        await _start(bed, "relay-kill-before-answer@2")
        proc = bed.kmes[1].proc
        assert proc is not None
        await _use(master, slave, tally, 1)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == -9
        assert await reserved_keys(bed, 3) == TARGET  # the refill's keys: stored, handed to nobody
        await _start(bed)
        await routed(master, 3001)
        # 2. Served from the buffer, then killed with keys ready.
        await _use(master, slave, tally, 1)
        await _ready(bed)
        await _use(master, slave, tally, 12)
        assert await _metric(bed, 1, "hit") >= 8
        ready = await _ready(bed)
        orphans = await reserved_keys(bed, 3)
        assert orphans == TARGET + ready
        await asyncio.to_thread(bed.kill, 1)
        await _start(bed)
        await routed(master, 3001)
        await _use(master, slave, tally, 12)
        again = await _ready(bed)
        # What was ready at the kill is still waiting at KME 3, next to what the new process has ready.
        assert await reserved_keys(bed, 3) == orphans + again
    finally:
        await master.close()
        await slave.close()
    assert (tally.duplicated, tally.mismatched) == (0, 0)
    assert len(tally.collected) == len(tally.delivered) == 26
