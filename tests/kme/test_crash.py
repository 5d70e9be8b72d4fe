"""``kill -9`` of a KME under load in both directions, then restart.

Every key a master received must be collectable once by its slave with the same bytes (no recorded
reservation lost), and no key ID or key value may ever reach two masters (no key delivered twice).
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import aiohttp

from qkdtls.testbed import Testbed

from .conftest import SMALL_STOCK, Caller, tls_client_context

DIRECTIONS = ((1001, 2001), (2001, 1001), (1002, 2001))  # (master, slave)


async def _load(
    bed: Testbed, master: int, slave: int, stop: asyncio.Event, out: list[tuple[int, int, dict]]
) -> None:
    caller = Caller(
        bed.sae_url(bed.kme_of(master)), tls_client_context(*bed.sae_credentials(master)), timeout=5.0
    )
    try:
        for _ in range(2000):  # bounded even if stop never comes
            if stop.is_set():
                return
            try:
                reply = await caller.post(f"/api/v1/keys/{slave}/enc_keys", {"number": 2})
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.02)  # the KME is down: the client retries like a real SAE
                continue
            if reply.status == 200:
                out.extend((master, slave, k) for k in reply.json["keys"])
            else:
                assert reply.status == 503, reply.body
                await asyncio.sleep(0.01)
    finally:
        await caller.close()


async def test_kill_9_under_load_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=SMALL_STOCK * 2, peer_timeout=2.0)
    with bed:
        delivered: list[tuple[int, int, dict]] = []
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(_load(bed, m, s, stop, delivered)) for m, s in DIRECTIONS for _ in range(3)
        ]
        await asyncio.sleep(0.6)
        before_kill = len(delivered)
        await asyncio.to_thread(bed.kill, 2)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(bed.start_kme, 2)
        deadline = time.monotonic() + 10
        while len(delivered) < before_kill + 30 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=15)
        assert before_kill > 0 and len(delivered) > before_kill

        ids = [k["key_ID"] for _, _, k in delivered]
        values = [k["key"] for _, _, k in delivered]
        assert len(set(ids)) == len(ids), "a key ID reached two masters"
        assert len(set(values)) == len(values), "key material reached two masters"

        by_pair: dict[tuple[int, int], list[dict]] = {}
        for master, slave, key in delivered:
            by_pair.setdefault((master, slave), []).append(key)
        for (master, slave), keys in by_pair.items():
            caller = Caller(bed.sae_url(bed.kme_of(slave)), tls_client_context(*bed.sae_credentials(slave)))
            try:
                for i in range(0, len(keys), 100):
                    chunk = keys[i : i + 100]
                    body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in chunk]}
                    reply = await caller.post(f"/api/v1/keys/{master}/dec_keys", body)
                    assert reply.status == 200, (master, slave, reply.body)
                    got = {k["key_ID"]: base64.b64decode(k["key"]) for k in reply.json["keys"]}
                    assert got == {k["key_ID"]: base64.b64decode(k["key"]) for k in chunk}
                    # Collected once and committed: the same slave may collect them again within the
                    # re-collection window, with the same bytes.
                    again = await caller.post(f"/api/v1/keys/{master}/dec_keys", body)
                    assert again.status == 200 and again.json["keys"] == reply.json["keys"]
            finally:
                await caller.close()
