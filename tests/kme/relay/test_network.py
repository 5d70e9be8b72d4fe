"""Relayed keys between real KME processes on a ring of six (1-2-3-4-5-6-1): KME 1 and KME 4 are three links
apart both ways, so ``trusted`` takes one three-hop path and ``spread`` the two node-disjoint ones. Routing
learns the SAEs and the links from adverts. Every KME writes the test-only relay ledger, so the tests can
check what each intermediate KME received and that no block was used twice.

Also: multicast to slaves on two remote KMEs, quotas at the slave's KME, and hop messages forged by a test
posing as KME 3 (with its inter-KME certificate and the link's key files): malformed, looping, tampered and
replayed messages to KME 4 get 400 or 409, consume nothing twice, and KME 4 keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from qkdtls.kme.relay.hop import seal
from qkdtls.kme.relay.messages import RELAY_PATH, TAG_HEADER, RelayItem, decode_message
from qkdtls.kme.relay.otp import MAC_MATERIAL_BYTES, mac_keys, pad_bytes, xor
from qkdtls.kme.store import Block
from qkdtls.testbed import Testbed, ring, sites_saes

from ..conftest import Caller
from .network import Ledgers, admin, caller, ids, ledger_env, link_stream, make_bed, relay_until_ok, routed

BS = 32
QUOTA = 3  # max_uncollected at KME 5 (SAE 5001's keys wait there)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    root = tmp_path_factory.mktemp("ring6")
    testbed = make_bed(
        root / "bed",
        sites_saes(6),
        ring(6),
        key_bytes=64 * 1024,
        site_config={5: {"quotas": {"max_uncollected": QUOTA}}},
    )
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ledger_env(root / "ledger").items():
            mp.setenv(name, value)
        testbed.start()
    try:
        yield testbed
    finally:
        testbed.stop()


@pytest.fixture
async def callers(bed: Testbed) -> AsyncIterator[dict[int, Caller]]:
    made = {sae: caller(bed, sae) for sae in (1001, 3001, 4001, 5001)}
    try:
        await routed(made[1001], 4001)
        yield made
    finally:
        for c in made.values():
            await c.close()


def ledgers(bed: Testbed) -> Ledgers:
    return Ledgers.read(bed.root.parent / "ledger")


SPREAD = {"extension_mandatory": [{"qkdtls_relay_mode": "spread"}]}


async def relay_stats(bed: Testbed, kme: int) -> dict[str, Any]:
    who = admin(bed, kme)
    try:
        text = (await who.get("/metrics")).body.decode()
    finally:
        await who.close()
    out: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("qkdtls_kme_relays_total{"):
            labels, value = line.removeprefix("qkdtls_kme_relays_total").rsplit(" ", 1)
            out[labels] = float(value)
    return out


async def test_both_modes_deliver_the_same_bytes_three_hops_away(
    bed: Testbed, callers: dict[int, Caller]
) -> None:
    master, slave = callers[1001], callers[4001]
    for doc, mode in (({"number": 4, "size": 512}, "trusted"), ({"number": 4, **SPREAD}, "spread")):
        sent = await relay_until_ok(master, 4001, doc)
        holders = {"master_SAE_ID": 1001, "slave_SAE_IDs": [4001]}
        assert [k["key_extension"] for k in sent] == [holders] * 4
        got = await slave.post("/api/v1/keys/1001/dec_keys", ids(sent))
        assert got.status == 200 and got.json["keys"] == sent, mode
    stats = await relay_stats(bed, 1)
    assert stats['{mode="trusted",outcome="delivered"}'] >= 1
    assert stats['{mode="spread",outcome="delivered"}'] >= 1


async def test_spread_intermediates_see_one_share_each(bed: Testbed, callers: dict[int, Caller]) -> None:
    """Everything KMEs 2, 3, 5 and 6 received for one spread relay, opened with their link material (what
    they can know): each saw one XOR share, from its own path only. Either share alone is consistent with
    every key (the other share is uniformly random link material they never saw); the two together give
    the key, so the recording is complete."""
    sent = await relay_until_ok(callers[1001], 4001, {"number": 2, **SPREAD})
    key = b"".join(base64.b64decode(k["key"]) for k in sent)
    seen: dict[int, list[bytes]] = {}
    for sender, receiver, body in ledgers(bed).received:
        msg = decode_message(body)
        stream = link_stream(bed, sender, receiver)

        def block(seq: int, stream: bytes = stream) -> bytes:
            return stream[seq * BS : (seq + 1) * BS]

        for item in msg.items:
            if item.key_ids != tuple(k["key_ID"] for k in sent):
                continue
            assert item.mode == "spread" and item.share is not None
            if item.blocks:  # the first hop: the share is the link's own blocks
                value = b"".join(block(s) for s in item.blocks)
            else:
                value = xor(item.data, pad_bytes([block(s) for s in item.pad], len(item.data)))
            seen.setdefault(receiver, []).append(value)
            assert item.path in ((1, 2, 3, 4), (1, 6, 5, 4))
            assert receiver in item.path[1:]
    assert sorted(seen) == [2, 3, 4, 5, 6]
    assert all(len(seen[kme]) == 1 for kme in (2, 3, 5, 6))
    one, other = seen[2][0], seen[6][0]
    assert seen[3] == [one] and seen[5] == [other] and sorted(seen[4]) == sorted([one, other])
    assert xor(one, other) == key  # two intermediates together (k = 2) rebuild it ...
    # ... one alone does not: the share of path 1-2-3-4 left KME 1 as link 1-2's own blocks (QKD material
    # drawn for it: uniform, independent of the key), so the other share is the key one-time padded with
    # them, and nothing the KMEs of path 1-6-5-4 received carries those bytes.
    wanted = tuple(k["key_ID"] for k in sent)
    received = ledgers(bed).received
    first = [
        i for s, r, b in received if (s, r) == (1, 2) for i in decode_message(b).items if i.key_ids == wanted
    ]
    assert len(first) == 1 and first[0].blocks and not first[0].data
    assert key not in (one, other)
    for _, receiver, body in received:
        if receiver in (5, 6):
            assert all(one not in item.data for item in decode_message(body).items)


async def test_multicast_to_slaves_on_two_remote_kmes(bed: Testbed, callers: dict[int, Caller]) -> None:
    await routed(callers[1001], 3001)
    doc = {"number": 2, "additional_slave_SAE_IDs": [4001]}
    sent = await relay_until_ok(callers[1001], 3001, doc)
    holders = {"master_SAE_ID": 1001, "slave_SAE_IDs": [3001, 4001]}
    assert all(k["key_extension"] == holders for k in sent)
    for sae in (3001, 4001):
        got = await callers[sae].post("/api/v1/keys/1001/dec_keys", ids(sent))
        assert got.status == 200 and got.json["keys"] == sent
    # Neither slave's KME gives the key to the other's SAE, nor to the master.
    assert (await callers[1001].post("/api/v1/keys/1001/dec_keys", ids(sent))).status == 400


async def test_quotas_apply_to_relayed_keys(bed: Testbed, callers: dict[int, Caller]) -> None:
    await routed(callers[1001], 5001)
    sent = await relay_until_ok(callers[1001], 5001, {"number": QUOTA})
    refused = await callers[1001].post("/api/v1/keys/5001/enc_keys", {"number": 1})
    assert refused.status == 503
    assert "have not collected at KME 5" in refused.json["message"]
    assert (await callers[5001].post("/api/v1/keys/1001/dec_keys", ids(sent))).status == 200
    again = await relay_until_ok(callers[1001], 5001, {"number": 1})
    assert (await callers[5001].post("/api/v1/keys/1001/dec_keys", ids(again))).status == 200


# --- hop messages forged by the test, posing as KME 3 towards KME 4 -----------------------------------------


class Forger:
    """KME 3's inter-KME client (its certificate for peer 4) and the 3-4 link material: blocks of KME 3's
    direction (0: the lower ID) far beyond what KME 3 itself draws, so the real KME never meets them."""

    def __init__(self, bed: Testbed) -> None:
        zone = bed.pki.zones[3]
        client = zone.inter_kme_clients[4]
        ctx = ssl.create_default_context(cafile=str(bed.pki.zones[4].ca))
        ctx.load_cert_chain(client.cert, client.key)
        ctx.check_hostname = False
        self.url = bed.inter_kme_url(4) + RELAY_PATH
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))
        self.stream = link_stream(bed, 3, 4)
        self.next_seq = len(self.stream) // BS - 1  # the last even blocks: KME 3's direction
        if self.next_seq % 2:
            self.next_seq -= 1

    def blocks(self, count: int) -> list[Block]:
        out = []
        for _ in range(count):
            seq = self.next_seq
            self.next_seq -= 2
            out.append(Block(seq, self.stream[seq * BS : (seq + 1) * BS]))
        return out

    async def post(self, body: bytes, tag: bytes | None) -> tuple[int, bytes, str | None]:
        headers = {"Content-Type": "application/json"}
        if tag is not None:
            headers[TAG_HEADER] = base64.b64encode(tag).decode()
        async with self.session.post(self.url, data=body, headers=headers) as resp:
            return resp.status, await resp.read(), resp.headers.get(TAG_HEADER)

    async def close(self) -> None:
        await self.session.close()


def forged_item(forger: Forger, path: tuple[int, ...], key: bytes) -> tuple[RelayItem, list[Block]]:
    pad = forger.blocks(1)
    item = RelayItem(
        relay_id="5b8c2d0e-1f3a-4c5b-8d6e-7f8091a2b3c4",
        mode="trusted",
        path=path,
        master_sae=1001,
        slaves=(4001,),
        size=256,
        key_ids=("9d3f1b2a-4c5e-4f60-8a7b-c1d2e3f40516",),
        pad=tuple(b.seq for b in pad),
        data=xor(key, pad[0].data),
    )
    return item, pad


async def stock_from_3(bed: Testbed) -> int:
    """Free blocks of KME 3's direction on link 3-4, as KME 4 counts them."""
    who = admin(bed, 4)
    try:
        links = (await who.get("/api/v1/admin/links")).json["links"]
    finally:
        await who.close()
    return next(link["stock_blocks"]["0"] for link in links if link["peer_KME_ID"] == 3)


async def test_forged_hop_messages(bed: Testbed, callers: dict[int, Caller]) -> None:
    forger = Forger(bed)
    try:
        stock = await stock_from_3(bed)
        # Malformed bodies and headers: 400, nothing consumed.
        for body, tag in ((b"{", bytes(16)), (b"[]", bytes(16)), (b'{"version":1}', None), (b"{}", b"x")):
            status, answer, _ = await forger.post(body, tag)
            assert status == 400 and "message" in json.loads(answer)
        # A loop and a path that does not come from KME 3: 400, nothing consumed.
        for path, problem in (((1, 2, 3, 4, 3), "names a KME twice"), ((1, 2, 4), "from KME 3")):
            item, _ = forged_item(forger, path, bytes(32))
            sealed = seal(3, 4, forger.blocks(2), 5000, [item])
            status, answer, _ = await forger.post(sealed.body, sealed.tag)
            assert status == 400 and problem in json.loads(answer)["message"]
        assert await stock_from_3(bed) == stock

        # A well-formed message whose ciphertext changed after its tag was computed: refused, and the
        # blocks it named (2 MAC + 1 pad) are burnt at KME 4.
        key = bytes(range(32))
        item, _ = forged_item(forger, (1, 2, 3, 4), key)
        mac = forger.blocks(2)
        sealed = seal(3, 4, mac, 5000, [item])
        doc = json.loads(sealed.body)
        doc["items"][0]["data"] = base64.b64encode(xor(item.data, b"\x01" + bytes(31))).decode()
        status, answer, _ = await forger.post(json.dumps(doc, separators=(",", ":")).encode(), sealed.tag)
        assert status == 400 and "failed authentication" in json.loads(answer)["message"]
        assert await stock_from_3(bed) == stock - 3
        # The genuine message now names burnt blocks: 409, nothing consumed twice.
        status, answer, _ = await forger.post(sealed.body, sealed.tag)
        assert status == 409
        assert await stock_from_3(bed) == stock - 3

        # A genuine message is stored; its answer carries the one-time tag of the second MAC key; the same
        # message again (a replay) is refused and consumes nothing.
        item, _ = forged_item(forger, (1, 2, 3, 4), key)
        mac = forger.blocks(2)
        sealed = seal(3, 4, mac, 5000, [item])
        status, answer, tag_text = await forger.post(sealed.body, sealed.tag)
        assert status == 200 and json.loads(answer)["results"] == [{"status": 200, "message": "stored"}]
        _, answer_key = mac_keys(pad_bytes([b.data for b in mac], MAC_MATERIAL_BYTES))
        assert tag_text is not None and answer_key.verify(answer, base64.b64decode(tag_text))
        status, _, _ = await forger.post(sealed.body, sealed.tag)
        assert status == 409
        assert await stock_from_3(bed) == stock - 6
        got = await callers[4001].post(
            "/api/v1/keys/1001/dec_keys", {"key_IDs": [{"key_ID": item.key_ids[0]}]}
        )
        assert base64.b64decode(got.json["keys"][0]["key"]) == key
    finally:
        await forger.close()
    # KME 4 still relays and serves.
    sent = await relay_until_ok(callers[1001], 4001, {})
    assert (await callers[4001].post("/api/v1/keys/1001/dec_keys", ids(sent))).json["keys"] == sent


async def test_no_block_was_used_twice(bed: Testbed, callers: dict[int, Caller]) -> None:
    await asyncio.sleep(0)  # runs last in the module: every relay above wrote the ledgers
    found = ledgers(bed)
    assert found.spends and found.takes
    assert found.reused() == []
    # Every block a KME accepted was spent by its neighbour (the forged ones excepted: the test sent them).
    assert {k for k in found.takes if k[0] != 3 or k[1] != 4} <= set(found.spends)
