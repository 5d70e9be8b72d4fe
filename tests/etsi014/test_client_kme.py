"""KmeClient against two real KME processes (qkdtls.testbed) on loopback, fed by the simulated QKD link."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qkdtls import link_sim, pki
from qkdtls.etsi014.client import (
    AsyncKmeClient,
    KmeClient,
    KmeClientSettings,
    KmeProtocolError,
    KmeRefused,
    KmeTlsError,
    KmeUnavailable,
)
from qkdtls.testbed import Testbed

MASTER, LOCAL_SLAVE, SLAVE = 1001, 1002, 2001
STOCK = 64 * 1024


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    with Testbed.create(tmp_path_factory.mktemp("testbed"), initial_key_bytes=STOCK) as bed:
        yield bed


def _settings(bed: Testbed, sae: int, **overrides: object) -> KmeClientSettings:
    cert, key, ca = bed.sae_credentials(sae)
    return KmeClientSettings(bed.sae_url(bed.kme_of(sae)), cert, key, ca, **overrides)  # type: ignore[arg-type]


def _established(port: int) -> int:
    """Server-side count of ESTABLISHED TCP connections to a loopback port (from /proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":
            count += 1
    return count


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_key_from_kme_1_is_collected_at_kme_2(testbed: Testbed) -> None:
    with (
        KmeClient(_settings(testbed, MASTER, expected_kme_id=1)) as master,
        KmeClient(_settings(testbed, SLAVE, expected_kme_id=2)) as slave,
    ):
        sent = master.enc_keys(SLAVE, number=3, size=512)
        got = slave.dec_keys(MASTER, [k.key_ID for k in sent.keys])
        assert [(k.key_ID, k.key) for k in got.keys] == [(k.key_ID, k.key) for k in sent.keys]
        assert all(len(k.key) == 64 for k in got.keys)
        # A collected key stays collectable by its slave for the re-collection window, by nobody else.
        again = slave.dec_keys(MASTER, [sent.keys[0].key_ID])
        assert (again.keys[0].key_ID, again.keys[0].key) == (sent.keys[0].key_ID, sent.keys[0].key)
        with pytest.raises(KmeRefused) as info:
            master.dec_keys(SLAVE, [sent.keys[0].key_ID])
        assert info.value.status == 400


def test_get_variants_and_local_pair(testbed: Testbed) -> None:
    with (
        KmeClient(_settings(testbed, MASTER)) as master,
        KmeClient(_settings(testbed, LOCAL_SLAVE)) as local_slave,
    ):
        sent = master.enc_keys(LOCAL_SLAVE, number=1, method="GET").keys[0]
        got = local_slave.dec_keys(MASTER, [sent.key_ID], method="GET").keys[0]
        assert (got.key_ID, got.key) == (sent.key_ID, sent.key)


def test_status_and_identity(testbed: Testbed) -> None:
    with KmeClient(_settings(testbed, MASTER)) as master:
        status = master.status(SLAVE)
        assert (status.source_KME_ID, status.target_KME_ID) == ("1", "2")
        assert (status.master_SAE_ID, status.slave_SAE_ID) == ("1001", "2001")
        info = master.sae_info()
        assert (info.SAE_ID, info.KME_ID) == (MASTER, 1)
    confused = KmeClient(_settings(testbed, MASTER, expected_kme_id=2))
    with confused, pytest.raises(KmeProtocolError, match="expects KME 2"):
        confused.enc_keys(SLAVE)


def test_only_the_named_slave_collects(testbed: Testbed) -> None:
    with (
        KmeClient(_settings(testbed, MASTER)) as master,
        KmeClient(_settings(testbed, LOCAL_SLAVE)) as other,
    ):
        key = master.enc_keys(SLAVE).keys[0]
        with pytest.raises(KmeRefused):
            other.dec_keys(MASTER, [key.key_ID])


def test_unregistered_and_foreign_certificates(testbed: Testbed, tmp_path: Path) -> None:
    zone = testbed.pki.zones[1]
    stranger = pki.issue_client_cert(zone.ca, zone.ca_key, tmp_path, "SAE-9999", serial=9999)
    settings = KmeClientSettings(testbed.sae_url(1), stranger.cert, stranger.key, zone.ca)
    with KmeClient(settings) as client, pytest.raises(KmeRefused) as info:
        client.enc_keys(SLAVE)
    assert info.value.status == 401

    _, foreign = pki.build_foreign_client(tmp_path / "foreign", serial=zone.saes[MASTER].serial)
    settings = KmeClientSettings(testbed.sae_url(1), foreign.cert, foreign.key, zone.ca, timeout=2.0)
    with KmeClient(settings) as client, pytest.raises((KmeTlsError, KmeUnavailable)):
        client.enc_keys(SLAVE)


def test_admin_links_needs_the_admin_certificate(testbed: Testbed) -> None:
    cert, key, ca = testbed.admin_credentials(1)
    with KmeClient(KmeClientSettings(testbed.sae_url(1), cert, key, ca)) as admin:
        links = admin.admin_links()
    assert {link["peer_KME_ID"] for link in links} == {1, 2}
    with KmeClient(_settings(testbed, MASTER)) as sae, pytest.raises(KmeRefused) as info:
        sae.admin_links()
    assert info.value.status == 401


def test_one_kept_alive_connection_serves_many_requests(testbed: Testbed) -> None:
    port = testbed.kmes[1].sae_port
    baseline = _established(port)
    with KmeClient(_settings(testbed, MASTER)) as master:
        master.status(SLAVE)
        sock = master._idle[0].sock
        for _ in range(30):
            master.status(SLAVE)
        assert master.connections_opened == 1
        assert master._idle[0].sock is sock
        assert _established(port) == baseline + 1  # seen from the KME's side of loopback


def test_prefetch_against_real_kmes(testbed: Testbed) -> None:
    with (
        KmeClient(_settings(testbed, MASTER, prefetch=8)) as master,
        KmeClient(_settings(testbed, SLAVE)) as slave,
    ):
        prefetcher = master._prefetcher
        assert prefetcher is not None
        first = master.get_key(SLAVE)
        _wait_for(lambda: prefetcher.available("2001") == 8)
        timings = []
        keys = [first]
        for _ in range(8):
            started = time.perf_counter()
            keys.append(master.get_key(SLAVE))
            timings.append((time.perf_counter() - started) * 1000)
        assert len({k.key_ID for k in keys}) == 9
        collected = slave.dec_keys(MASTER, [k.key_ID for k in keys])
        assert [k.key for k in collected.keys] == [k.key for k in keys]
        print(f"\nget_key from the prefetch pool: median {statistics.median(timings):.3f} ms")
        assert statistics.median(timings) < 1.0


def test_fresh_link_material_becomes_keys(testbed: Testbed) -> None:
    folders = testbed.links[(1, 2)].folders
    cert, key, ca = testbed.admin_credentials(2)
    with KmeClient(KmeClientSettings(testbed.sae_url(2), cert, key, ca)) as admin:

        def imported() -> int:
            return next(link["imported_bytes"] for link in admin.admin_links() if link["peer_KME_ID"] == 1)

        before = imported()
        link_sim.QkdLink(*folders).emit(8192, 4096)
        _wait_for(lambda: imported() == before + 8192)


async def test_async_client_against_real_kmes(testbed: Testbed) -> None:
    async with (
        AsyncKmeClient(_settings(testbed, MASTER)) as master,
        AsyncKmeClient(_settings(testbed, SLAVE)) as slave,
    ):
        sent = await asyncio.gather(*(master.get_key(SLAVE) for _ in range(4)))
        got = await slave.dec_keys(MASTER, [k.key_ID for k in sent])
        assert [k.key for k in got.keys] == [k.key for k in sent]


def test_client_survives_a_kme_restart(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path, initial_key_bytes=STOCK)
    with bed, KmeClient(_settings(bed, MASTER, timeout=2.0)) as master:
        master.status(SLAVE)
        bed.kill(1)
        with pytest.raises(KmeUnavailable):
            master.status(SLAVE)
        bed.start_kme(1)
        assert master.status(SLAVE).slave_SAE_ID == "2001"  # reconnects by itself


def test_failing_link_shows_in_the_kme_entropy(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path, initial_key_bytes=0)
    cert, key, ca = bed.admin_credentials(1)
    with bed, KmeClient(KmeClientSettings(bed.sae_url(1), cert, key, ca)) as admin:
        link_sim.QkdLink(*bed.links[(1, 2)].folders, qber=link_sim.FAIL_QBER).emit(32 * 1024, 8192)

        def peer_link() -> dict[str, object]:
            return next(link for link in admin.admin_links() if link["peer_KME_ID"] == 2)

        _wait_for(lambda: peer_link()["imported_bytes"] == 32 * 1024)
        entropy = peer_link()["entropy_bits_per_byte"]
        assert isinstance(entropy, float)
        assert entropy == pytest.approx(link_sim.shannon_entropy_per_byte(0.5 + link_sim.FAIL_QBER), abs=0.1)
