"""A ring of five real KME processes (1-2-3-4-5-1) under relay load when a link breaks: SAE 1001 (KME 1) takes
keys with SAE 3001 (KME 3), two hops away over 1-2-3 or three hops the other way round over 1-5-4-3. The
fibre of link 2-3 is cut while eight workers relay; both KMEs keep running. Traffic must move to 1-5-4-3 on
its own, every key the master SAE received must be collected by the slave SAE with the same bytes, none
twice, and no block of any link may be consumed twice (the test-only relay ledgers of every KME).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qkdtls.kme.admin_map import DOCUMENT_PATH
from qkdtls.testbed import Testbed, ring, sites_saes

from ..fibre import CuttableLink, route_through
from .network import CONVERGE, Ledgers, Tally, admin, caller, ids, ledger_env, make_bed, routed

WORKERS = 8
PER_REQUEST = 4
PHASE_KEYS = 200  # keys relayed on each side of the cut
PHASE_LIMIT = 90.0  # seconds a phase may take on a loaded machine before the test fails
SHORT, LONG = [1, 2, 3], [1, 5, 4, 3]


async def paths_used(bed: Testbed) -> list[tuple[list[int], bool]]:
    """The last paths KME 1 relayed over, oldest first, with whether that relay delivered."""
    who = admin(bed, 1)
    try:
        doc = (await who.get(DOCUMENT_PATH)).json
    finally:
        await who.close()
    return [(path, entry["ok"]) for entry in doc["relay"]["last_paths"] for path in entry["paths"]]


class Load:
    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.tally = Tally()
        self.refused: Counter[str] = Counter()  # enc_keys answers other than 200, by status
        self.stop = asyncio.Event()

    async def worker(self) -> None:
        master, slave = caller(self.bed, 1001), caller(self.bed, 3001)
        try:
            while not self.stop.is_set():
                try:
                    reply = await master.post("/api/v1/keys/3001/enc_keys", {"number": PER_REQUEST})
                except (TimeoutError, aiohttp.ClientError) as exc:
                    self.refused[type(exc).__name__] += 1
                    continue
                if reply.status != 200:
                    self.refused[str(reply.status)] += 1
                    await asyncio.sleep(0.05)
                    continue
                keys = reply.json["keys"]
                self.tally.deliver(keys)
                # enc_keys answered only after KME 3 stored the keys durably: they are there, now.
                got = await slave.post("/api/v1/keys/1001/dec_keys", ids(keys))
                assert got.status == 200, got.body[:300]
                self.tally.collect(got.json["keys"])
        finally:
            await master.close()
            await slave.close()

    async def until(self, what: str, keys: int, path: list[int]) -> float:
        """Wait until ``keys`` more keys were relayed and KME 1's last relay went over ``path``."""
        start, goal = time.monotonic(), len(self.tally.collected) + keys
        while True:
            used = await paths_used(self.bed)
            if len(self.tally.collected) >= goal and used and used[-1] == (path, True):
                return time.monotonic() - start
            assert time.monotonic() - start < PHASE_LIMIT, (
                f"{what}: {len(self.tally.collected)} keys, {used[-3:]}"
            )
            await asyncio.sleep(0.1)


@pytest.mark.timeout(300)
async def test_relayed_keys_go_the_other_way_round_when_a_link_is_cut(tmp_path: Path) -> None:
    bed = make_bed(tmp_path / "bed", sites_saes(5), sorted(ring(5)), key_bytes=1 << 20)
    fibre = [CuttableLink(bed.kmes[3].inter_kme_port), CuttableLink(bed.kmes[2].inter_kme_port)]
    route_through(bed, 2, 3, fibre[0])
    route_through(bed, 3, 2, fibre[1])
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ledger_env(tmp_path / "ledger").items():
            mp.setenv(name, value)
        await asyncio.to_thread(bed.start, redraw_ports=False)
    load = Load(bed)
    workers: list[asyncio.Task[None]] = []
    try:
        master = caller(bed, 1001)
        try:
            await routed(master, 3001, CONVERGE)
        finally:
            await master.close()
        workers = [asyncio.create_task(load.worker()) for _ in range(WORKERS)]
        before = await load.until("relays over 1-2-3", PHASE_KEYS, SHORT)
        keys_before = len(load.tally.collected)

        for link in fibre:  # both KMEs keep running; they no longer reach each other
            link.cut()
        moved = await load.until("relays move to 1-5-4-3", PHASE_KEYS, LONG)
        print(
            f"\nring of 5 under relay load: {keys_before} keys over 1-2-3 in {before:.1f} s; link 2-3 cut; "
            f"{len(load.tally.collected) - keys_before} more keys, the last over 1-5-4-3, {moved:.1f} s "
            f"after the cut; enc_keys refused meanwhile: {dict(load.refused)}"
        )
    finally:
        load.stop.set()
        results = await asyncio.gather(*workers, return_exceptions=True)
        used = await paths_used(bed) if workers else []
        bed.stop()
        for link in fibre:
            link.close()
    errors: list[Any] = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert (SHORT, True) not in used[used.index((LONG, True)) :]  # once cut, nothing went over 2-3
    assert load.tally.duplicated == 0 and load.tally.mismatched == 0
    assert load.tally.collected == load.tally.delivered
    assert Ledgers.read(tmp_path / "ledger").reused() == []
