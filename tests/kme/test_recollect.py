"""Re-collection with real KME processes: the slave KME is killed (SIGKILL, by a test-only fault hook) after
its dec_keys commit and before the answer leaves; after the restart the same slave collects the same bytes,
nobody else does, and once the window is over the key is erased (on SQLite: its bytes are gone from the
database file). SQLite and PostgreSQL stores."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qkdtls.kme.service import FAULT_ENV
from qkdtls.testbed import Testbed

from .conftest import Caller, tls_client_context

SAES = {1: (1001, 1002), 2: (2001, 2002)}
SHORT_WINDOW = 1.0  # SAE 2002's re-collection window (seconds); 2001 has the default (60 s)


def _caller(bed: Testbed, sae: int) -> Caller:
    return Caller(bed.sae_url(bed.kme_of(sae)), tls_client_context(*bed.sae_credentials(sae)), timeout=10.0)


def _give_sae_setting(bed: Testbed, kme_id: int, sae_id: int, line: str) -> None:
    path = bed.config_path(kme_id)
    entry = f"[[saes]]\nid = {sae_id}\nkme_id = {bed.kme_of(sae_id)}\n"
    text = path.read_text()
    assert entry in text
    path.write_text(text.replace(entry, entry + line + "\n"))


def _ids(keys: list[dict[str, Any]]) -> dict[str, Any]:
    return {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}


async def _stored_key_ids(bed: Testbed, stores: Any) -> set[str]:
    """Key IDs in KME 2's store (PostgreSQL: while it runs; SQLite: it must be stopped, one owner)."""
    if stores == "sqlite":
        import sqlite3

        conn = sqlite3.connect(bed.root / "kme2.sqlite3")
        try:
            return {row[0] for row in conn.execute("SELECT key_id FROM keys")}
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(stores[2], autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT key_id FROM keys").fetchall()}


async def test_slave_kme_killed_after_commit_before_answer(
    tmp_path: Path, stores: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bed = Testbed.create(
        tmp_path / "bed", store=stores, saes=SAES, initial_key_bytes=32 * 256, sweep_interval=0.2
    )
    _give_sae_setting(bed, 2, 2002, f"recollect_window = {SHORT_WINDOW}")
    callers: list[Caller] = []

    def caller(sae: int) -> Caller:
        callers.append(c := _caller(bed, sae))
        return c

    try:
        bed.start_kme(1)
        monkeypatch.setenv(FAULT_ENV, "kill-after-collect")
        bed.start_kme(2)  # this process dies after its first dec_keys commit
        monkeypatch.delenv(FAULT_ENV)
        master = caller(1001)
        sent = (await master.post("/api/v1/keys/2001/enc_keys", {"number": 2})).json["keys"]
        assert [k["key_extension"] for k in sent] == [{"master_SAE_ID": 1001, "slave_SAE_IDs": [2001]}] * 2
        with pytest.raises(aiohttp.ClientError):
            await caller(2001).post("/api/v1/keys/1001/dec_keys", _ids(sent))
        assert await asyncio.to_thread(bed.kmes[2].proc.wait, 10) == -signal.SIGKILL  # type: ignore[union-attr]

        await asyncio.to_thread(bed.start_kme, 2)
        admin = Caller(bed.sae_url(2), tls_client_context(*bed.admin_credentials(2)))
        callers.append(admin)

        async def link_1() -> dict[str, Any]:
            links = (await admin.get("/api/v1/admin/links")).json["links"]
            return {link["peer_KME_ID"]: link for link in links}[1]

        # The collection had committed before the kill: both keys wait only for a re-collection.
        assert (await link_1())["recollectable_keys"] == 2 and (await link_1())["reserved_keys"] == 0
        slave = caller(2001)
        for _ in range(2):  # the lost answer, and once more: the same bytes within the window
            got = await slave.post("/api/v1/keys/1001/dec_keys", _ids(sent))
            assert got.status == 200 and got.json["keys"] == sent
        assert (await caller(2002).post("/api/v1/keys/1001/dec_keys", _ids(sent))).status == 401
        assert (await master.post("/api/v1/keys/1001/dec_keys", _ids(sent))).status == 400

        # A key for 2002, whose window is short: collected, collected again, then erased.
        short = (await master.post("/api/v1/keys/2002/enc_keys", {})).json["keys"]
        other = caller(2002)
        for _ in range(2):
            assert (await other.post("/api/v1/keys/1001/dec_keys", _ids(short))).json["keys"] == short
        deadline = time.monotonic() + SHORT_WINDOW + 20
        while (await link_1())["recollectable_keys"] != 2:  # the sweeper erases it; 2001's two stay
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        reply = await other.post("/api/v1/keys/1001/dec_keys", _ids(short))
        assert reply.status == 400
        assert (await slave.post("/api/v1/keys/1001/dec_keys", _ids(sent))).json["keys"] == sent

        if stores == "sqlite":
            await asyncio.to_thread(bed.stop_kme, 2)  # one owner: stop it to read its file
        stored = await _stored_key_ids(bed, stores)
        assert {k["key_ID"] for k in sent} <= stored and short[0]["key_ID"] not in stored
        if stores == "sqlite":  # secure_delete: the erased key's bytes are overwritten in the file
            files = [p.read_bytes() for p in bed.root.glob("kme2.sqlite3*")]
            assert all(base64.b64decode(short[0]["key"]) not in data for data in files)
            assert any(base64.b64decode(sent[0]["key"]) in data for data in files)  # the scan finds keys
    finally:
        for c in callers:
            await c.close()
        await asyncio.to_thread(bed.stop)
