"""Two KME processes of the testbed: the operator CLI, restarts, and a peer KME that is down or hung."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdtls.cli.kme import main as kme_cli
from qkdtls.etsi014.models import MSG_KEYS_NOT_FOUND
from qkdtls.testbed import Testbed, TestbedError

from .conftest import SMALL_STOCK, Caller, tls_client_context


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Testbed]:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=SMALL_STOCK, peer_timeout=1.5)
    with bed:
        yield bed


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert kme_cli(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def sae_args(bed: Testbed, sae: int) -> list[str]:
    cert, key, ca = bed.sae_credentials(sae)
    return ["--kme", bed.sae_url(bed.kme_of(sae)), "--cert", str(cert), "--key", str(key), "--ca", str(ca)]


def test_cli_end_to_end(running: Testbed, capsys: pytest.CaptureFixture[str]) -> None:
    bed = running
    status = cli(capsys, "status", *sae_args(bed, 1001), "2001")
    assert status["source_KME_ID"] == "1" and status["target_KME_ID"] == "2"
    got = cli(capsys, "get-keys", *sae_args(bed, 1001), "2001", "-n", "2", "--size", "512")
    ids = [k["key_ID"] for k in got["keys"]]
    assert len(ids) == 2 and all(len(base64.b64decode(k["key"])) == 64 for k in got["keys"])
    collected = cli(capsys, "get-keys-by-id", *sae_args(bed, 2001), "1001", *ids)
    assert sorted(collected["keys"], key=lambda k: k["key_ID"]) == sorted(
        got["keys"], key=lambda k: k["key_ID"]
    )
    hexed = cli(capsys, "get-keys", *sae_args(bed, 2001), "1002", "--hex")
    assert len(bytes.fromhex(hexed["keys"][0]["key"])) == 32

    cert, key, ca = bed.admin_credentials(1)
    links = cli(
        capsys, "links", "--kme", bed.sae_url(1), "--cert", str(cert), "--key", str(key), "--ca", str(ca)
    )
    assert {link["peer_KME_ID"] for link in links["links"]} == {1, 2}
    # A mistake is reported on stderr with exit status 2, without a traceback.
    assert kme_cli(["get-keys-by-id", *sae_args(bed, 2001), "1001", str(uuid.uuid4())]) == 2
    assert MSG_KEYS_NOT_FOUND in capsys.readouterr().err
    assert kme_cli(["check-config", "--config", str(bed.config_path(2))]) == 0


async def _status_count(caller: Caller, slave: int) -> int:
    reply = await caller.get(f"/api/v1/keys/{slave}/status")
    assert reply.status == 200, reply.body
    return reply.json["stored_key_count"]


def _caller(bed: Testbed, sae: int) -> Caller:
    return Caller(bed.sae_url(bed.kme_of(sae)), tls_client_context(*bed.sae_credentials(sae)), timeout=10.0)


async def test_reservations_and_stock_survive_restarts(running: Testbed) -> None:
    bed = running
    master = _caller(bed, 1001)
    try:
        delivered = (await master.post("/api/v1/keys/2001/enc_keys", {"number": 3})).json["keys"]
        count = await _status_count(master, 2001)
        bed.restart(2)  # the slave's KME holds the reservation
        bed.restart(1)  # the master's KME must not re-import its key files
        assert await _status_count(master, 2001) == count
    finally:
        await master.close()
    slave = _caller(bed, 2001)
    try:
        body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in delivered]}
        reply = await slave.post("/api/v1/keys/1001/dec_keys", body)
        assert reply.status == 200, reply.body
        assert reply.json["keys"] == delivered
    finally:
        await slave.close()


async def test_peer_down_or_hung_gives_bounded_503_and_keeps_the_stock(running: Testbed) -> None:
    bed = running
    master = _caller(bed, 1001)
    try:
        before = await _status_count(master, 2001)
        bed.kill(2)
        started = time.monotonic()
        reply = await master.post("/api/v1/keys/2001/enc_keys", {"number": 2})
        assert reply.status == 503 and reply.content_type == "application/json"
        assert time.monotonic() - started < 1.5
        assert await _status_count(master, 2001) == before

        bed.start_kme(2)
        pid = bed.pid(2)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # accepts TCP in the kernel but never answers
        try:
            started = time.monotonic()
            reply = await master.post("/api/v1/keys/2001/enc_keys")
            elapsed = time.monotonic() - started
            assert reply.status == 503, reply.body
            assert 1.0 < elapsed < 4.0  # the peer timeout (1.5 s) bounds the wait
            assert await _status_count(master, 2001) == before
        finally:
            os.kill(pid, signal.SIGCONT)

        # Back to normal: a full cycle works again.
        reply = await master.post("/api/v1/keys/2001/enc_keys")
        assert reply.status == 200, reply.body
    finally:
        await master.close()


def test_sigterm_shuts_down_cleanly(running: Testbed) -> None:
    bed = running
    started = time.monotonic()
    bed.stop_kme(1)
    proc = bed.kmes[1].proc
    assert proc is not None and proc.returncode == 0
    assert time.monotonic() - started < 3.0
    assert "Traceback" not in bed.log_tail(1, lines=200)


async def test_new_key_files_are_imported_by_both_kmes(running: Testbed) -> None:
    bed = running
    master, other = _caller(bed, 1001), _caller(bed, 2001)
    try:
        before = (await _status_count(master, 2001), await _status_count(other, 1001))
        bed.add_key_material(64 * 100)  # 200 blocks: 100 for each direction
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = (await _status_count(master, 2001), await _status_count(other, 1001))
            if after == (before[0] + 100, before[1] + 100):
                break
            await asyncio.sleep(0.05)
        assert after == (before[0] + 100, before[1] + 100)
        reply = await master.post("/api/v1/keys/2001/enc_keys", {"number": 1})
        assert reply.status == 200
    finally:
        await master.close()
        await other.close()


def test_port_in_use_is_reported_without_traceback(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=1024)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", bed.kmes[1].sae_port))
        squatter.listen()
        with pytest.raises(TestbedError, match="exited with 2"):
            bed.start_kme(1, timeout=20)
    log = bed.log_tail(1)
    assert "cannot start the KME" in log and "Traceback" not in log


async def test_first_request_after_a_peer_restart_succeeds(running: Testbed) -> None:
    bed = running
    master = _caller(bed, 1001)
    try:
        for _ in range(3):
            assert (await master.post("/api/v1/keys/2001/enc_keys")).status == 200
            bed.restart(2)  # KME 1's kept-alive inter-KME connection is now dead
            reply = await master.post("/api/v1/keys/2001/enc_keys")
            assert reply.status == 200, reply.body
    finally:
        await master.close()


async def test_debug_logs_carry_events_but_never_key_bytes(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=4096, verbosity=2)
    with bed:
        keys: list[bytes] = []
        for master, slave in ((1001, 2001), (2001, 1001), (1001, 1002)):
            m, s = _caller(bed, master), _caller(bed, slave)
            try:
                got = (await m.post(f"/api/v1/keys/{slave}/enc_keys", {"number": 2})).json["keys"]
                body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in got]}
                assert (await s.post(f"/api/v1/keys/{master}/dec_keys", body)).status == 200
                keys += [base64.b64decode(k["key"]) for k in got]
            finally:
                await m.close()
                await s.close()
    logs = bed.kmes[1].log.read_text() + bed.kmes[2].log.read_text()
    assert "key.reserved" in logs and "key.collected" in logs and "http.request" in logs
    for key in keys:
        for form in (base64.b64encode(key).decode(), key.hex(), repr(key)[2:-1]):
            assert form[:16] not in logs
