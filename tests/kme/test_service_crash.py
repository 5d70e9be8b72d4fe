"""kill -9 at arbitrary points of the key lifecycle: no key is delivered twice, no key is lost.

A child process runs two KMEs (SQLite stores, in-process peer gateway) and many concurrent masters on both
sides of their link. It prints every key it delivered to a master (``D``), and brackets every slave
collection (``S`` before, ``C`` after). The test kills it with SIGKILL mid-flight, restarts it on the same
stores several times, then checks from the stores themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from qkdtls.kme.errors import BadRequestError
from qkdtls.kme.service import KmeService, SaeEntry, ServiceSettings
from qkdtls.kme.store import open_store

SAES = {11: SaeEntry(11, 1), 21: SaeEntry(21, 2)}

CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, sys
    from qkdtls.etsi014.models import KeyRequest
    from qkdtls.kme.errors import BlocksTakenError, PeerRejected, UnavailableError
    from qkdtls.kme.service import KmeService, SaeEntry, ServiceSettings
    from qkdtls.kme.store import open_store

    SAES = {11: SaeEntry(11, 1), 21: SaeEntry(21, 2)}
    services = {}

    class Gateway:
        async def reserve(self, peer, reservation):
            try:
                await services[peer].accept_reservation(reservation.master_KME_ID, reservation)
            except BlocksTakenError:
                raise PeerRejected("taken") from None

    def out(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    async def worker(w):
        for i in range(100_000):
            master, slave = (11, 21) if (w + i) % 2 else (21, 11)
            try:
                c = await services[master // 10].enc_keys(master, str(slave), KeyRequest())
            except UnavailableError as exc:
                if "not enough" in exc.message:
                    return
                continue
            k = c.keys[0]
            out(f"D {k.key_ID} {hashlib.sha256(k.key).hexdigest()} {master} {slave}")
            if i % 2:
                out(f"S {k.key_ID}")
                got = await services[slave // 10].dec_keys(slave, str(master), [k.key_ID])
                assert got.keys[0].key == k.key
                out(f"C {k.key_ID}")

    async def main(tmp):
        for kme in (1, 2):
            store = open_store(f"sqlite://{tmp}/kme{kme}.sqlite3")
            services[kme] = KmeService(ServiceSettings(kme_id=kme), store, SAES, Gateway(), [1, 2])
        out("ready")
        await asyncio.gather(*(worker(w) for w in range(8)))

    asyncio.run(main(sys.argv[1]))
    """
)


async def run_and_kill(tmp: Path, script: Path, deliveries_before_kill: int) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(tmp), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while sum(line.startswith("D ") for line in lines) < deliveries_before_kill:
                raw = await proc.stdout.readline()
                if not raw:
                    break
                lines.append(raw.decode().strip())
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
        rest, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert lines and lines[0] == "ready", err.decode()[-2000:]
    lines += rest.decode().splitlines()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    return lines


@pytest.mark.timeout(120)
async def test_kill_9_never_delivers_twice_nor_loses_a_reservation(tmp_path: Path) -> None:
    stream = os.urandom(32 * 12_000)
    digest = hashlib.sha256(stream).hexdigest()
    for kme, peer in ((1, 2), (2, 1)):
        store = open_store(f"sqlite://{tmp_path / f'kme{kme}.sqlite3'}")
        await store.import_file(peer, "0001.key", stream, digest, 32, local=False)
        await store.close()
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    rng = random.Random(1234)
    lines: list[str] = []
    for _ in range(4):
        lines += await run_and_kill(tmp_path, script, rng.randrange(20, 400))

    delivered = [line.split() for line in lines if line.startswith("D ")]
    started = {line.split()[1] for line in lines if line.startswith("S ")}
    completed = {line.split()[1] for line in lines if line.startswith("C ")}
    assert len(delivered) >= 80
    assert len({d[1] for d in delivered}) == len(delivered)  # key IDs
    assert len({d[2] for d in delivered}) == len(delivered)  # key bytes
    blocks = {hashlib.sha256(stream[i : i + 32]).hexdigest() for i in range(0, len(stream), 32)}
    assert {d[2] for d in delivered} <= blocks  # every key is one block of the shared stream

    services = {}
    for kme in (1, 2):
        store = open_store(f"sqlite://{tmp_path / f'kme{kme}.sqlite3'}")
        services[kme] = KmeService(ServiceSettings(kme_id=kme), store, SAES, None, [1, 2])
    try:
        fresh = 0
        for _, key_id, sha, master, slave in delivered:
            # Never collected, collected with the answer lost to a kill (started, not completed), or
            # collected and answered: within the re-collection window the slave gets the same bytes.
            got = await services[int(slave) // 10].dec_keys(int(slave), master, [key_id])
            assert hashlib.sha256(got.keys[0].key).hexdigest() == sha
            fresh += key_id not in started
        assert fresh > 0 and len(completed) > 0
        # Nobody but the slave: the master asking its own KME, or the slave naming another master.
        _, key_id, _, master, slave = delivered[0]
        with pytest.raises(BadRequestError):
            await services[int(master) // 10].dec_keys(int(master), slave, [key_id])
        with pytest.raises(BadRequestError):
            await services[int(slave) // 10].dec_keys(int(slave), slave, [key_id])
    finally:
        for svc in services.values():
            await svc.close()
