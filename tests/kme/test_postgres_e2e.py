"""The PostgreSQL key store end to end: two KME processes, each with its own database on a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkdtls.testbed import Testbed

from .conftest import SMALL_STOCK, Caller, tls_client_context

pytestmark = pytest.mark.postgres


def _caller(bed: Testbed, sae: int) -> Caller:
    return Caller(bed.sae_url(bed.kme_of(sae)), tls_client_context(*bed.sae_credentials(sae)), timeout=10.0)


async def test_cross_kme_cycles_and_restart_on_postgres(
    tmp_path: Path, two_databases: dict[int, str]
) -> None:
    bed = Testbed.create(tmp_path / "bed", store=two_databases, initial_key_bytes=SMALL_STOCK)
    with bed:
        m1, s2, m2, s1 = _caller(bed, 1001), _caller(bed, 2001), _caller(bed, 2001), _caller(bed, 1002)
        try:
            for master, slave, m_id, s_id in ((m1, s2, 1001, 2001), (m2, s1, 2001, 1002)):
                reply = await master.post(f"/api/v1/keys/{s_id}/enc_keys", {"number": 4, "size": 512})
                assert reply.status == 200, reply.body
                body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in reply.json["keys"]]}
                got = await slave.post(f"/api/v1/keys/{m_id}/dec_keys", body)
                assert got.status == 200 and got.json["keys"] == reply.json["keys"]
            pending = (await m1.post("/api/v1/keys/2001/enc_keys", {"number": 2})).json["keys"]
            count = (await m1.get("/api/v1/keys/2001/status")).json["stored_key_count"]
        finally:
            for c in (m1, s2, m2, s1):
                await c.close()
        bed.restart(1)
        bed.restart(2)
        m1, s2 = _caller(bed, 1001), _caller(bed, 2001)
        try:
            assert (await m1.get("/api/v1/keys/2001/status")).json["stored_key_count"] == count
            body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in pending]}
            got = await s2.post("/api/v1/keys/1001/dec_keys", body)
            assert got.status == 200 and got.json["keys"] == pending
        finally:
            await m1.close()
            await s2.close()
