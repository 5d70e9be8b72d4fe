"""The inter-KME HTTPS gateway against a real KME: committed, refused (burn) and unreachable outcomes."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest

from qkdtls.kme.errors import PeerRejected, PeerUnavailable
from qkdtls.kme.peers import RESERVATIONS_PATH, HttpPeerGateway
from qkdtls.kme.reservation import Reservation, ReservedKey

from .conftest import Caller, Pair, tls_client_context


def _reservation(blocks: tuple[int, ...]) -> Reservation:
    # KME 2 is the higher ID: it draws direction 1 (odd blocks) of the 1<->2 link.
    return Reservation(
        master_KME_ID=2,
        direction=1,
        master_SAE_ID=2001,
        slave_SAE_IDs=(1001,),
        size=256,
        keys=(ReservedKey(str(uuid.uuid4()), blocks),),
    )


async def test_reserve_commits_then_refuses_the_same_blocks(pair: Pair) -> None:
    gateway = HttpPeerGateway(pair.config(2).peers)
    try:
        await gateway.reserve(1, _reservation((1,)))
        with pytest.raises(PeerRejected):
            await gateway.reserve(1, _reservation((1,)))
        # Kept alive: both calls used one connection.
        client, _ = gateway._clients[1]
        assert client.connections_opened == 1
    finally:
        await gateway.close()
    stock = (await pair.admins[1].get("/api/v1/admin/links")).json["links"]
    link = next(link for link in stock if link["peer_KME_ID"] == 2)
    assert link["reserved_keys"] == 1


async def test_unreachable_or_untrusted_peer_is_unavailable(pair: Pair) -> None:
    peer = pair.config(2).peers[0]
    wrong_ca = dataclasses.replace(peer, ca=pair.testbed.pki.zones[2].ca)  # KME 1's server cert is zone 1's
    closed_port = dataclasses.replace(peer, url="https://127.0.0.1:1")
    for config in (wrong_ca, closed_port):
        gateway = HttpPeerGateway([config])
        try:
            with pytest.raises(PeerUnavailable):
                await gateway.reserve(1, _reservation((3,)))
        finally:
            await gateway.close()
    gateway = HttpPeerGateway([peer])
    try:
        with pytest.raises(PeerUnavailable):
            await gateway.reserve(7, _reservation((3,)))  # no route to KME 7
    finally:
        await gateway.close()


async def test_concurrent_reservations_travel_as_one_batch(pair: Pair) -> None:
    gateway = HttpPeerGateway(pair.config(2).peers)
    try:
        reservations = [_reservation((seq,)) for seq in (5, 7, 9, 11, 5)]  # the last reuses block 5
        outcomes = await asyncio.gather(
            *(gateway.reserve(1, r) for r in reservations), return_exceptions=True
        )
        assert sum(isinstance(o, PeerRejected) for o in outcomes) == 1
        assert sum(o is None for o in outcomes) == 4
        client, _ = gateway._clients[1]
        assert client.connections_opened == 1
    finally:
        await gateway.close()
    metrics = (await pair.admins[1].get("/metrics")).body.decode()
    # One HTTP request carried the five reservations.
    assert 'qkdtls_kme_responses_total{route="/kme/v1/reservations",status="200"} 1.0' in metrics


async def test_batch_answers_each_reservation(pair: Pair) -> None:
    peer = pair.testbed.pki.zones[2].inter_kme_clients[1]
    caller = Caller(
        pair.testbed.inter_kme_url(1), tls_client_context(peer.cert, peer.key, pair.testbed.pki.zones[1].ca)
    )
    try:
        good = _reservation((13,)).to_json()
        reply = await caller.post(RESERVATIONS_PATH, {"reservations": [good, {"keys": 1}, good]})
        assert reply.status == 200
        assert [r["status"] for r in reply.json["results"]] == [200, 400, 409]
        assert (await caller.post(RESERVATIONS_PATH, {"reservations": []})).status == 400
        assert (await caller.post(RESERVATIONS_PATH, {"reservations": [good] * 65})).status == 400
    finally:
        await caller.close()
