"""One SAE tries to drain a link (real KME processes): its rate is limited at its own KME, its uncollected
keys are capped at the slave's KME (across a restart too), and the other pair of the link keeps its keys."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from qkdtls.testbed import Testbed

from .conftest import Caller, Reply, tls_client_context

CAP = 256  # keys of master 1002 that KME 2 keeps uncollected
STOCK_KEYS = 2048  # per direction of the link: far more than the cap, far less than a free-for-all drain


def _append(bed: Testbed, kme_id: int, text: str) -> None:
    path = bed.config_path(kme_id)
    path.write_text(path.read_text() + text)


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}{{{labels}}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_one_master_cannot_starve_the_other_pair(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=32 * 2 * STOCK_KEYS, local_key_bytes=0)
    _append(bed, 2, f"\n[quotas]\nmax_uncollected = {CAP}\n")  # enforced where the keys wait
    text = bed.config_path(1).read_text()
    entry = "[[saes]]\nid = 1002\nkme_id = 1\n"
    bed.config_path(1).write_text(text.replace(entry, entry + "master_rate = 100.0\nmaster_burst = 64\n"))
    with bed:
        hog = Caller(bed.sae_url(1), tls_client_context(*bed.sae_credentials(1002)))
        master = Caller(bed.sae_url(1), tls_client_context(*bed.sae_credentials(1001)))
        admins = {k: Caller(bed.sae_url(k), tls_client_context(*bed.admin_credentials(k))) for k in (1, 2)}
        slave: Caller | None = None
        try:
            taken: list[str] = []
            refusals: dict[str, int] = {"rate": 0, "uncollected": 0}

            async def drain() -> None:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and refusals["uncollected"] < 5:
                    reply = await hog.post("/api/v1/keys/2001/enc_keys", {"number": 16})
                    if reply.status == 200:
                        taken.extend(k["key_ID"] for k in reply.json["keys"])
                        continue
                    assert reply.status == 503, reply.body
                    message = reply.json["message"]
                    if "rate limit of SAE 1002" in message:
                        refusals["rate"] += 1
                        await asyncio.sleep(0.01)
                    else:
                        assert f"SAE 1002 has {CAP} keys its slaves have not collected at KME 2" in message
                        refusals["uncollected"] += 1

            await asyncio.gather(*(drain() for _ in range(4)))
            assert len(taken) == CAP and refusals["uncollected"] >= 5 and refusals["rate"] > 0

            # The other pair of the link is served, in full.
            status = (await master.get("/api/v1/keys/2001/status")).json
            assert status["stored_key_count"] == STOCK_KEYS - CAP
            sent = (await master.post("/api/v1/keys/2001/enc_keys", {"number": 128})).json["keys"]
            slave = Caller(bed.sae_url(2), tls_client_context(*bed.sae_credentials(2001)))
            body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in sent]}
            assert (await slave.post("/api/v1/keys/1001/dec_keys", body)).json["keys"] == sent

            one = (await admins[1].get("/metrics")).body.decode()
            two = (await admins[2].get("/metrics")).body.decode()
            assert _metric(one, "qkdtls_kme_refusals_total", 'reason="uncollected"') >= 5
            assert _metric(one, "qkdtls_kme_refusals_total", 'reason="master_rate"') == refusals["rate"]
            assert _metric(two, "qkdtls_kme_refusals_total", 'reason="reservation_uncollected"') >= 5
            assert _metric(two, "qkdtls_kme_uncollected_keys", 'master_sae="1002"') == CAP
            assert _metric(two, "qkdtls_kme_uncollected_keys", 'master_sae="1001"') == 0

            async def hog_takes(number: int) -> Reply:
                for _ in range(100):  # past the rate limit: 100 keys/s
                    reply = await hog.post("/api/v1/keys/2001/enc_keys", {"number": number})
                    if reply.status == 200 or "rate limit" not in reply.json["message"]:
                        return reply
                    await asyncio.sleep(0.05)
                raise AssertionError("still rate limited")

            # The count lives in KME 2's store: a restart does not reset it.
            await slave.close()
            await asyncio.to_thread(bed.restart, 2)
            slave = Caller(bed.sae_url(2), tls_client_context(*bed.sae_credentials(2001)))
            reply = await hog_takes(1)
            assert reply.status == 503 and "have not collected" in reply.json["message"]
            # Once its slave collects some, the master may take as many again.
            body = {"key_IDs": [{"key_ID": k} for k in taken[:32]]}
            assert (await slave.post("/api/v1/keys/1002/dec_keys", body)).status == 200
            reply = await hog_takes(32)
            assert reply.status == 200, reply.body
            reply = await hog_takes(1)
            assert reply.status == 503 and "have not collected" in reply.json["message"]
        finally:
            for c in (hog, master, *admins.values(), *([slave] if slave else [])):
                await c.close()
