"""The link-state exchange between in-process KMEs (the adapter): the Router fed by adverts, the exchange
switched off at one end, a peer falling silent, and a KME whose own advert is refused as stale continuing
above the seq its peer holds."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qkdtls.kme.routing.exchange import LinkStateExchange
from qkdtls.testbed import Testbed

from ..conftest import start_pair, stop_pair

BOUND = 20.0  # seconds; the exchange needs about one hello (1 s)


async def eventually(what: str, condition: Callable[[], bool], bound: float = BOUND) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > bound:
            pytest.fail(f"{what}: not within {bound} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_two_kmes_learn_each_other(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=4096, local_key_bytes=0)
    pair = await start_pair(bed)
    try:
        one, two = pair.servers[1].router, pair.servers[2].router
        assert one is not None and two is not None
        assert pair.servers[1].service is not None and pair.servers[1].service.router is one
        await eventually(
            "the link is up at both ends", lambda: one.path(2) == (1, 2) and two.path(1) == (2, 1)
        )
        assert one.kme_of(2001) == 2 and two.kme_of(1002) == 1  # static entries, and advertised too
        assert two.db is not None and two.db.sae_owners(1001) == (1,)
        # 4096 bytes = 128 blocks of 32 bytes, 64 per direction, as both stores count them.
        assert one.stock(1, 2) == 64 and one.stock(2, 1) == 64
        snap = one.snapshot()
        assert [(n["kme_id"], n["up"], n["name"]) for n in snap["nodes"]] == [
            (1, True, "site A"),
            (2, True, "site B"),
        ]

        # KME 2 stops: KME 1 no longer uses the link once the dead interval has passed.
        await pair.servers[2].stop()
        gone = await eventually("KME 1 sees KME 2 down", lambda: one.path(2) is None)
        assert gone > 1.5  # not before the dead interval (3 s) could pass (minus the last hello's age)
        assert one.snapshot()["links"][0]["up"] is False
    finally:
        await stop_pair(pair)


async def test_the_exchange_off_at_one_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bed = Testbed.create(
        tmp_path / "bed",
        initial_key_bytes=4096,
        local_key_bytes=0,
        site_config={2: {"network": {"enabled": False}}},
    )
    with caplog.at_level(logging.WARNING, logger="qkdtls.kme.routing"):
        pair = await start_pair(bed)
        try:
            one, two = pair.servers[1].router, pair.servers[2].router
            assert one is not None and one.db is not None and two is not None and two.db is None
            exchange = pair.servers[1]._exchange
            assert isinstance(exchange, LinkStateExchange)
            await eventually("KME 1 tried twice", lambda: exchange.stats.failed_requests >= 2)
            assert two.path(1) == (2, 1)  # without the exchange the peer counts as up
            assert one.path(2) is None  # KME 2 never says the link is up: KME 1 does not use it
        finally:
            await stop_pair(pair)
    refusals = [r for r in caplog.records if getattr(r, "event", "") == "routing.peer_refused"]
    assert refusals and refusals[0].status == 503 and "off at this KME" in refusals[0].reason


async def test_a_stale_own_advert_continues_above_the_known_seq(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=4096, local_key_bytes=0)
    pair = await start_pair(bed)
    try:
        one = pair.servers[1].router
        two = pair.servers[2]._exchange
        assert one is not None and one.db is not None and two is not None
        await eventually("the link is up", lambda: one.path(2) == (1, 2))
        held = one.db.advert(2, time.monotonic())
        assert held is not None
        # As if KME 2 had restarted with its clock an hour back: its own advert is far below what 1 holds.
        entry, back = two.db._entries[2], held.seq - 3_600_000
        entry.advert = dataclasses.replace(entry.advert, seq=back, boot=back)
        two.db._boot, two.db._seq_floor = back, 0
        took = await eventually(
            "KME 2 continues above the seq KME 1 holds",
            lambda: (a := one.db.advert(2, time.monotonic())) is not None and a.seq > held.seq,  # type: ignore[union-attr]
        )
        assert took < 5.0  # one refused hello, then the next advert (not the refresh, 15 s later)
        assert pair.servers[1]._exchange is not None
        refused = pair.servers[1]._exchange.stats.refused
        assert set(refused) == {"stale"} and 1 <= refused["stale"] <= 2
        assert one.path(2) == (1, 2)
    finally:
        await stop_pair(pair)
