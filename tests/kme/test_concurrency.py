"""Many masters on both sides of one link at once: full cycles (enc_keys, then dec_keys at the slave).

The direction split must keep the two KMEs from ever handing the same block to two SAE pairs.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from qkdtls.testbed import Testbed

from .conftest import SMALL_STOCK, Caller, tls_client_context

PAIRS = ((1001, 2001), (1002, 2001), (2001, 1001), (2001, 1002), (1001, 1002), (1002, 1001))
WORKERS_PER_PAIR = 3
CYCLES = 25


def _caller(bed: Testbed, sae: int) -> Caller:
    return Caller(bed.sae_url(bed.kme_of(sae)), tls_client_context(*bed.sae_credentials(sae)), timeout=10.0)


async def _cycles(bed: Testbed, master: int, slave: int, seed: int) -> list[tuple[str, bytes]]:
    m, s = _caller(bed, master), _caller(bed, slave)
    seen: list[tuple[str, bytes]] = []
    try:
        for i in range(CYCLES):
            number = 1 + (seed + i) % 3
            size = 256 if i % 2 else 512
            reply = await m.post(f"/api/v1/keys/{slave}/enc_keys", {"number": number, "size": size})
            assert reply.status == 200, reply.body
            keys = {k["key_ID"]: base64.b64decode(k["key"]) for k in reply.json["keys"]}
            assert len(keys) == number and all(len(v) == size // 8 for v in keys.values())
            body = {"key_IDs": [{"key_ID": k} for k in keys]}
            collected = await s.post(f"/api/v1/keys/{master}/dec_keys", body)
            assert collected.status == 200, collected.body
            assert {k["key_ID"]: base64.b64decode(k["key"]) for k in collected.json["keys"]} == keys
            seen.extend(keys.items())
    finally:
        await m.close()
        await s.close()
    return seen


@pytest.mark.parametrize("event_loop", ["asyncio", "auto"])
async def test_many_masters_on_both_sides(tmp_path: Path, event_loop: str) -> None:
    # "auto" runs the KMEs on uvloop when it is installed; "asyncio" always on the standard loop.
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=SMALL_STOCK * 4, event_loop=event_loop)
    with bed:
        tasks = [_cycles(bed, m, s, w) for m, s in PAIRS for w in range(WORKERS_PER_PAIR)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    keys = [item for result in results for item in result]
    ids = [k for k, _ in keys]
    values = [v for _, v in keys]
    assert len(ids) == len(set(ids)), "a key ID was delivered twice"
    # Blocks are never shared, so no key (nor any 32-byte block of one) repeats.
    assert len(values) == len(set(values)), "key material was delivered twice"
    blocks = [v[i : i + 32] for v in values for i in range(0, len(v), 32)]
    assert len(blocks) == len(set(blocks))
