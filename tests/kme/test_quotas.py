"""Quotas and the re-collection window in the key service: token buckets per master and per pair, the cap on
uncollected keys (local and at the peer KME), refusal counts, and per-SAE settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qkdtls.etsi014.models import MSG_KEYS_NOT_FOUND, KeyRequest
from qkdtls.kme.errors import BadRequestError, UnauthorizedError, UnavailableError, UncollectedQuotaError
from qkdtls.kme.quotas import QuotaRefused, QuotaSettings, RateLimit, RateLimiter, SaeQuota
from qkdtls.kme.reservation import Reservation, ReservedKey
from qkdtls.kme.service import SaeEntry, ServiceSettings

from .test_service import SAES, Bed, Gateway


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    b = Bed(tmp_path, Gateway(), {}, {})
    try:
        yield b
    finally:
        for svc in b.services.values():
            await svc.close()


def test_token_buckets_per_master_and_pair() -> None:
    limiter = RateLimiter(
        QuotaSettings(
            default=SaeQuota(master_rate=RateLimit(10.0, 20), pair_rate=RateLimit(5.0, 8)),
            pairs={(11, 22): RateLimit(100.0, 100)},
        )
    )
    limiter.admit(11, 21, 8, now=0.0)  # the pair (11, 21) is empty now, the master has 12 left
    with pytest.raises(QuotaRefused) as info:
        limiter.admit(11, 21, 1, now=0.0)
    assert info.value.reason == "pair_rate" and "retry in 0.20 s" in info.value.message
    limiter.admit(11, 22, 12, now=0.0)  # another slave: its own (overridden) bucket; the master's last 12
    with pytest.raises(QuotaRefused) as info:
        limiter.admit(11, 22, 1, now=0.0)
    assert info.value.reason == "master_rate" and "SAE 11" in info.value.message
    limiter.admit(11, 21, 1, now=0.2)  # both refilled enough: 2 master tokens, 1 pair token
    with pytest.raises(QuotaRefused) as info:
        limiter.admit(11, 21, 2, now=0.2)  # the master has 1 left, the pair none: nothing taken
    limiter.admit(11, 22, 1, now=0.2)  # the master's token was not taken by the refused request
    with pytest.raises(QuotaRefused) as info:
        limiter.admit(11, 21, 9, now=100.0)
    assert "at most 8 keys per request" in info.value.message
    limiter.admit(12, 21, 8, now=0.0)  # every master has its own buckets


async def test_rate_limits_are_503_with_a_clear_message_and_counted(bed: Bed) -> None:
    quotas = QuotaSettings(
        saes={11: SaeQuota(master_rate=RateLimit(0.01, 4))}, pairs={(12, 21): RateLimit(0.01, 2)}
    )
    one = bed.open(1, quotas=quotas)
    bed.open(2)
    await bed.feed(1, 2, 32 * 64)
    await one.enc_keys(11, "21", KeyRequest(number=4))
    with pytest.raises(UnavailableError, match=r"rate limit of SAE 11: 0.01 keys/s, burst 4") as info:
        await one.enc_keys(11, "21", KeyRequest())
    assert info.value.status == 503
    await one.enc_keys(12, "21", KeyRequest(number=2))
    with pytest.raises(UnavailableError, match=r"rate limit of SAE pair 12 -> 21"):
        await one.enc_keys(12, "21", KeyRequest())
    await one.enc_keys(13, "21", KeyRequest(number=16))  # no limit for the others
    assert await one.store.free_blocks(2, 0) == 32 - 22  # refusals took no block
    assert one.refusals == {"master_rate": 1, "pair_rate": 1}


async def test_uncollected_keys_cap_at_the_slave_kme_spares_the_other_pairs(bed: Bed) -> None:
    """One master takes keys its slave never collects: at the cap the slave KME refuses its reservations
    (the master's KME answers 503 and keeps the blocks), and another pair still gets keys."""
    quotas = QuotaSettings(saes={12: SaeQuota(max_uncollected=6)})
    one = bed.open(1)
    two = bed.open(2, quotas=quotas)  # the cap is kept where the keys wait: at the slave's KME
    await bed.feed(1, 2, 32 * 64)
    taken = [k for _ in range(3) for k in (await one.enc_keys(12, "21", KeyRequest(number=2))).keys]
    with pytest.raises(UnavailableError, match=r"SAE 12 has 6 keys its slaves have not collected at KME 2"):
        await one.enc_keys(12, "21", KeyRequest())
    assert await one.store.free_blocks(2, 0) == 32 - 6  # released, not burnt
    assert (await one.store.link_stats(2)).burnt_blocks == 0
    assert one.refusals == {"uncollected": 1} and two.refusals == {"reservation_uncollected": 1}
    assert await two.uncollected_by_master() == {12: 6}
    other = await one.enc_keys(11, "21", KeyRequest(number=8))  # the other pair is not starved
    assert len(other.keys) == 8
    # Collected keys no longer count (their re-collection window does not matter).
    await two.dec_keys(21, "12", [k.key_ID for k in taken[:2]])
    assert await two.uncollected_by_master() == {12: 4, 11: 8}
    assert len((await one.enc_keys(12, "21", KeyRequest(number=2))).keys) == 2


async def test_uncollected_keys_cap_for_local_pairs(bed: Bed) -> None:
    one = bed.open(1, quotas=QuotaSettings(default=SaeQuota(max_uncollected=3)))
    await bed.feed(1, 1, 32 * 16)
    await one.enc_keys(11, "12", KeyRequest(number=3))
    with pytest.raises(UnavailableError, match="SAE 11 has 3 keys its slaves have not collected at KME 1"):
        await one.enc_keys(11, "12", KeyRequest())
    assert len((await one.enc_keys(13, "12", KeyRequest(number=3))).keys) == 3  # per master
    assert one.refusals == {"uncollected": 1}


async def test_accept_reservation_refuses_with_429_at_the_cap(bed: Bed) -> None:
    bed.open(1)
    two = bed.open(2, quotas=QuotaSettings(default=SaeQuota(max_uncollected=1)))
    await bed.feed(1, 2, 32 * 8)
    ids = ("6f0c8a7e-3d1b-4c55-9a51-0b2a1f4c9e11", "7f0c8a7e-3d1b-4c55-9a51-0b2a1f4c9e11")
    await two.accept_reservation(1, Reservation(1, 0, 11, (21,), 256, (ReservedKey(ids[0], (0,)),)))
    with pytest.raises(UncollectedQuotaError) as info:
        await two.accept_reservation(1, Reservation(1, 0, 11, (21,), 256, (ReservedKey(ids[1], (2,)),)))
    assert info.value.status == 429
    assert await two.store.free_blocks(1, 0) == 3  # block 2 still free


async def test_recollect_window_per_slave(bed: Bed, caplog: pytest.LogCaptureFixture) -> None:
    saes = {**SAES, 22: SaeEntry(22, 2, recollect_window=0.0), 23: SaeEntry(23, 2, recollect_window=0.05)}
    one = bed.open(1)
    two = bed.open(2, saes=saes)
    await bed.feed(1, 2, 32 * 16)
    for slave in (21, 22, 23):
        [key] = (await one.enc_keys(11, str(slave), KeyRequest())).keys
        assert (await two.dec_keys(slave, "11", [key.key_ID])).keys == (key,)
        if slave == 21:  # the service default: 60 s
            with caplog.at_level(logging.WARNING, logger="qkdtls.kme.service"):
                assert (await two.dec_keys(slave, "11", [key.key_ID])).keys == (key,)
            [record] = [r for r in caplog.records if getattr(r, "event", None) == "key.recollected"]
            assert record.key_IDs == [key.key_ID] and record.slave_SAE_ID == 21  # type: ignore[attr-defined]
            with pytest.raises(UnauthorizedError):
                await two.dec_keys(22, "11", [key.key_ID])
            continue
        await asyncio.sleep(0.1)
        with pytest.raises(BadRequestError, match=MSG_KEYS_NOT_FOUND):
            await two.dec_keys(slave, "11", [key.key_ID])
    reports = {r.peer_kme_id: r for r in await two.link_reports()}
    assert reports[1].recollectable_keys == 2 and reports[1].reserved_keys == 0  # 21's and 23's
    await two.expire_reservations()  # 23's window is over: erased; 21's stays
    assert {r.peer_kme_id: r for r in await two.link_reports()}[1].recollectable_keys == 1


def test_recollect_window_is_bounded() -> None:
    for bad in (-1.0, 3601.0):
        with pytest.raises(ValueError, match="recollect_window"):
            ServiceSettings(kme_id=1, recollect_window=bad)
    assert ServiceSettings(kme_id=1).recollect_window == 60.0


async def test_one_sweep_erases_every_due_key_in_chunks(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    from qkdtls.kme import service as service_module

    monkeypatch.setattr(service_module, "SWEEP_CHUNK", 4)
    one = bed.open(1, recollect_window=0.05, reservation_ttl=0.05)
    await bed.feed(1, 1, 32 * 32)
    collected = (await one.enc_keys(11, "12", KeyRequest(number=10))).keys
    await one.dec_keys(12, "11", [k.key_ID for k in collected])
    await one.enc_keys(11, "12", KeyRequest(number=9))  # never collected
    await asyncio.sleep(0.1)
    assert await one.expire_reservations() == 9  # 19 keys in chunks of 4, one call
    [report] = [r for r in await one.link_reports() if r.peer_kme_id == 1]
    assert (report.reserved_keys, report.recollectable_keys) == (0, 0)
