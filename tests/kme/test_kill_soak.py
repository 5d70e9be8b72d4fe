"""Key cycles while both KMEs are killed with SIGKILL in turn: no key lost, duplicated or mismatched.

Eight workers loop: ``enc_keys`` for 1001 → 2001 at KME 1, then ``dec_keys`` by 2001 at KME 2, retried like
a real SAE would while KME 2 is down. A killer kills KME 1 and KME 2 alternately and restarts them. A key is
*delivered* once its master got it; it is *lost* if its slave never gets it. Before the re-collection
window, a slave KME killed between its ``dec_keys`` commit and its answer lost the key.

``QKDTLS_SOAK_KILLS`` sets the number of kills (default 4, lean for CI; 16 reproduces the reliability run).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from qkdtls.testbed import Testbed

from .conftest import Caller, tls_client_context

KILLS = int(os.environ.get("QKDTLS_SOAK_KILLS", "4"))
WORKERS = 8
COLLECT_FOR = 30.0  # seconds a worker keeps retrying one dec_keys (KME 2 restarts within a few)


class Tally:
    def __init__(self) -> None:
        self.delivered: dict[str, bytes] = {}  # key ID -> bytes the master got
        self.collected: dict[str, bytes] = {}  # key ID -> bytes the slave got
        self.duplicated = 0  # a key ID or key value handed to the masters twice
        self.mismatched = 0
        self.collect_retries = 0
        self.values: set[bytes] = set()

    def deliver(self, key: dict[str, Any]) -> None:
        value = base64.b64decode(key["key"])
        if key["key_ID"] in self.delivered or value in self.values:
            self.duplicated += 1
        self.delivered[key["key_ID"]] = value
        self.values.add(value)

    @property
    def lost(self) -> int:
        return sum(1 for key_id in self.delivered if key_id not in self.collected)


async def _collect(slave: Caller, key_ids: list[str], tally: Tally) -> None:
    body = {"key_IDs": [{"key_ID": k} for k in key_ids]}
    deadline = time.monotonic() + COLLECT_FOR
    while time.monotonic() < deadline:
        try:
            reply = await slave.post("/api/v1/keys/1001/dec_keys", body)
        except (aiohttp.ClientError, TimeoutError):
            tally.collect_retries += 1
            await asyncio.sleep(0.05)
            continue
        if reply.status == 200:
            for key in reply.json["keys"]:
                value = base64.b64decode(key["key"])
                tally.mismatched += value != tally.delivered[key["key_ID"]]
                tally.collected[key["key_ID"]] = value
            return
        if reply.status == 400:  # the key is gone: lost (counted at the end)
            return
        await asyncio.sleep(0.05)  # 503: store or KME busy


async def _worker(bed: Testbed, stop: asyncio.Event, tally: Tally) -> None:
    master = Caller(bed.sae_url(1), tls_client_context(*bed.sae_credentials(1001)), timeout=5.0)
    slave = Caller(bed.sae_url(2), tls_client_context(*bed.sae_credentials(2001)), timeout=5.0)
    try:
        for _ in range(100_000):  # bounded even if stop never comes
            if stop.is_set():
                return
            try:
                reply = await master.post("/api/v1/keys/2001/enc_keys", {"number": 2})
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.05)  # KME 1 is down
                continue
            if reply.status != 200:
                assert reply.status == 503, reply.body
                await asyncio.sleep(0.02)
                continue
            keys = reply.json["keys"]
            for key in keys:
                tally.deliver(key)
            await _collect(slave, [k["key_ID"] for k in keys], tally)
    finally:
        await master.close()
        await slave.close()


async def test_alternating_kill_9_loses_no_key(tmp_path: Path, stores: Any) -> None:
    bed = Testbed.create(
        tmp_path / "bed", store=stores, initial_key_bytes=1 << 21, local_key_bytes=0, peer_timeout=2.0
    )
    tally = Tally()
    with bed:
        stop = asyncio.Event()
        workers = [asyncio.create_task(_worker(bed, stop, tally)) for _ in range(WORKERS)]
        try:
            for kill in range(KILLS):
                await asyncio.sleep(0.5)
                victim = 2 if kill % 2 == 0 else 1
                await asyncio.to_thread(bed.kill, victim)
                await asyncio.sleep(0.1)
                await asyncio.to_thread(bed.start_kme, victim)
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=COLLECT_FOR + 30)
    print(
        f"\nkills={KILLS} delivered={len(tally.delivered)} collected={len(tally.collected)} "
        f"lost={tally.lost} duplicated={tally.duplicated} mismatched={tally.mismatched} "
        f"dec_keys retries after a dropped connection={tally.collect_retries}"
    )
    assert len(tally.delivered) > 100
    assert (tally.lost, tally.duplicated, tally.mismatched) == (0, 0, 0)
