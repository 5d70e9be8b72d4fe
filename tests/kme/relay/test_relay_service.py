"""The relay logic across KME services wired in-process (real SQLite stores): trusted and spread relays,
multicast to two KMEs, what each link pays, tampering, replay, malformed and looping messages."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qkdtls.etsi014.models import KeyRequest
from qkdtls.kme.errors import BadRequestError, KmeError, UnavailableError
from qkdtls.kme.relay import sharing
from qkdtls.kme.relay.hop import seal
from qkdtls.kme.relay.messages import HopMessage, RelayItem, decode_message
from qkdtls.kme.relay.otp import xor
from qkdtls.kme.relay.policy import RelayPolicy, RelaySettings
from qkdtls.kme.store import Block

from .inprocess import BS, Net, chain, network


def spread(paths: int, threshold: int = 0) -> KeyRequest:
    ext = {"qkdtls_relay_mode": "spread", "qkdtls_relay_paths": paths}
    if threshold:
        ext["qkdtls_relay_threshold"] = threshold
    return KeyRequest(number=2, extension_mandatory=(ext,))


@pytest.fixture
async def four(tmp_path: Path) -> AsyncIterator[Net]:
    net = await chain(tmp_path, [1, 2, 3, 4])
    try:
        yield net
    finally:
        await net.close()


async def free(net: Net, a: int, b: int) -> int:
    """Free blocks of a's direction on link a-b, as a sees them."""
    return await net.services[a].store.free_blocks(b, 0 if a < b else 1)


async def test_trusted_relay_over_three_hops(four: Net) -> None:
    one, four_ = four.services[1], four.services[4]
    before = {(a, b): await free(four, a, b) for a, b in ((1, 2), (2, 3), (3, 4))}
    sent = await one.enc_keys(1001, "4001", KeyRequest(number=3, size=512))
    assert [k.key_extension for k in sent.keys] == [{"master_SAE_ID": 1001, "slave_SAE_IDs": [4001]}] * 3
    got = await four_.dec_keys(4001, "1001", [k.key_ID for k in sent.keys])
    assert [k.key for k in got.keys] == [k.key for k in sent.keys]
    assert [k.key_extension for k in got.keys] == [k.key_extension for k in sent.keys]
    # The keys are blocks of KME 1's direction (0) of the first link, held before the batch's MAC keys.
    assert sent.keys[0].key == four.block(1, 2, 0) + four.block(1, 2, 2)
    # What each link paid (sender's direction): 3 keys x 2 blocks + 2 MAC blocks on every link; each sender
    # (KME 1, and KMEs 2 and 3 passing the message on) also deleted the blocks its pool holds for the next
    # relays (burnt if it crashes, never used twice).
    after = {(a, b): await free(four, a, b) for a, b in before}
    pooled = {(a, b): len(four.services[a].relay._pools[b]) for a, b in before}
    assert all(pooled.values())
    assert {k: before[k] - after[k] for k in before} == {k: 8 + pooled[k] for k in before}
    stats = one.relay_stats()
    assert stats["relays"] == {"trusted": 1, "spread": 0, "failed": 0}
    assert stats["last_paths"][-1]["paths"] == [[1, 2, 3, 4]]
    consumed = {(c["purpose"]): c["bytes"] for c in stats["consumed_bytes"]}
    assert consumed == {"key": 6 * BS, "mac": 2 * BS}
    mid = {c["purpose"]: c["bytes"] for c in four.services[2].relay_stats()["consumed_bytes"]}
    assert mid == {"pad": 6 * BS, "mac": 2 * BS}


async def test_status_of_a_remote_slave(four: Net) -> None:
    st = await four.services[1].status(1001, "4001")
    assert st.target_KME_ID == "4" and st.source_KME_ID == "1"
    # 2048 blocks of KME 1's direction on 1-2, minus 2 MAC blocks, at 1 block per 256-bit key; the other
    # links are not advertised by the static router, so they do not limit the count.
    assert st.stored_key_count == 2046


async def test_spread_xor_over_two_disjoint_paths(tmp_path: Path) -> None:
    net = await network(tmp_path, [(1, 2), (2, 4), (1, 3), (3, 4)])
    try:
        sent = await net.services[1].enc_keys(1001, "4001", spread(2))
        got = await net.services[4].dec_keys(4001, "1001", [k.key_ID for k in sent.keys])
        assert [k.key for k in got.keys] == [k.key for k in sent.keys]
        paths = net.services[1].relay_stats()["last_paths"][-1]
        assert paths["mode"] == "spread" and sorted(paths["paths"]) == [[1, 2, 4], [1, 3, 4]]
    finally:
        await net.close()


async def test_spread_shamir_tolerates_a_lost_path(tmp_path: Path) -> None:
    net = await network(tmp_path, [(1, 2), (2, 5), (1, 3), (3, 5), (1, 4), (4, 5)])
    try:
        net.down.add(3)  # KME 3 answers nothing: its share never arrives
        sent = await net.services[1].enc_keys(1001, "5001", spread(3, 2))
        got = await net.services[5].dec_keys(5001, "1001", [k.key_ID for k in sent.keys])
        assert [k.key for k in got.keys] == [k.key for k in sent.keys]
    finally:
        await net.close()


async def test_spread_without_enough_paths_is_503_and_consumes_nothing(four: Net) -> None:
    before = await free(four, 1, 2)
    with pytest.raises(UnavailableError, match="needs 2 node-disjoint paths; 1 available"):
        await four.services[1].enc_keys(1001, "4001", spread(2))
    assert await free(four, 1, 2) == before
    assert four.services[1].refusals["no_path"] == 1


async def test_spread_falls_back_to_trusted_when_the_policy_allows(tmp_path: Path) -> None:
    relay = RelaySettings(default=RelayPolicy(mode="spread", fallback=True))
    net = await chain(tmp_path, [1, 2, 3], relay=relay)
    try:
        sent = await net.services[1].enc_keys(1001, "3001", KeyRequest())
        assert net.services[1].relay_stats()["relays"]["trusted"] == 1
        got = await net.services[3].dec_keys(3001, "1001", [sent.keys[0].key_ID])
        assert got.keys[0].key == sent.keys[0].key
        with pytest.raises(UnavailableError, match="node-disjoint"):  # mandatory spread never falls back
            await net.services[1].enc_keys(1001, "3001", spread(2))
    finally:
        await net.close()


async def test_multicast_to_slaves_on_two_remote_kmes(four: Net) -> None:
    sent = await four.services[1].enc_keys(
        1001, "3001", KeyRequest(number=2, additional_slave_SAE_IDs=("4001",))
    )
    holders = {"master_SAE_ID": 1001, "slave_SAE_IDs": [3001, 4001]}
    assert all(k.key_extension == holders for k in sent.keys)
    for kme, sae in ((3, 3001), (4, 4001)):
        got = await four.services[kme].dec_keys(sae, "1001", [k.key_ID for k in sent.keys])
        assert [k.key for k in got.keys] == [k.key for k in sent.keys]
        assert all(k.key_extension == holders for k in got.keys)


async def test_no_path_is_503_at_once(four: Net) -> None:
    four.routers[1].down.add(frozenset((2, 3)))
    before = await free(four, 1, 2)
    with pytest.raises(UnavailableError, match="no path to KME 4"):
        await four.services[1].enc_keys(1001, "4001", KeyRequest())
    assert await free(four, 1, 2) == before and four.sent == []


def _flip_data(sender: int, receiver: int, body: bytes, tag: bytes) -> tuple[bytes, bytes]:
    if (sender, receiver) != (2, 3):
        return body, tag
    doc = json.loads(body)
    data = bytearray(base64.b64decode(doc["items"][0]["data"]))
    data[0] ^= 1
    doc["items"][0]["data"] = base64.b64encode(data).decode()
    return json.dumps(doc, separators=(",", ":")).encode(), tag


async def test_a_tampered_message_is_refused_and_its_blocks_burnt(four: Net) -> None:
    four.tamper = _flip_data
    before = await four.services[3].store.free_blocks(2, 0)
    with pytest.raises(UnavailableError, match="failed authentication"):
        await four.services[1].enc_keys(1001, "4001", KeyRequest())
    hop = next(m for m in four.sent if (m.sender, m.receiver) == (2, 3))
    assert hop.status == 400
    # KME 3 consumed every block the message named (2 MAC blocks + 1 pad block), and nothing went on.
    assert await four.services[3].store.free_blocks(2, 0) == before - 3
    assert not any(m.sender == 3 for m in four.sent)
    assert four.services[3].relay_stats()["hops"] == {"tampered": 1}
    # The same message again finds its blocks gone: 409, nothing consumed twice.
    with pytest.raises(KmeError) as info:
        await four.services[3].accept_relay(2, hop.body, base64.b64encode(hop.tag).decode())
    assert info.value.status == 409
    assert await four.services[3].store.free_blocks(2, 0) == before - 3


async def test_a_replayed_message_is_refused_with_nothing_consumed(four: Net) -> None:
    sent = await four.services[1].enc_keys(1001, "4001", KeyRequest())
    hop = next(m for m in four.sent if (m.sender, m.receiver) == (3, 4))
    stock = await four.services[4].store.free_blocks(3, 0)
    with pytest.raises(KmeError) as info:
        await four.services[4].accept_relay(3, hop.body, base64.b64encode(hop.tag).decode())
    assert info.value.status == 409
    assert await four.services[4].store.free_blocks(3, 0) == stock
    got = await four.services[4].dec_keys(4001, "1001", [sent.keys[0].key_ID])
    assert got.keys[0].key == sent.keys[0].key


async def test_an_intermediate_forwards_before_its_commit_and_answers_after_it(four: Net) -> None:
    """KME 2 passes the message on before it consumed the named blocks (that commit runs while KMEs 3 and 4
    work), answers only once it is durable, and refuses the same message while it is still in flight."""
    two = four.services[2]
    forwarded, committed, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    send, accept = two.relay.transport.relay, two.store.relay_accept

    async def held_forward(peer: int, body: bytes, tag: bytes, timeout: float) -> Any:
        forwarded.set()
        return await send(peer, body, tag, timeout)

    async def held_commit(*args: Any) -> Any:
        await release.wait()
        result = await accept(*args)
        committed.set()
        return result

    two.relay.transport.relay = held_forward  # type: ignore[method-assign]
    two.store.relay_accept = held_commit  # type: ignore[method-assign]
    stock = await two.store.free_blocks(1, 0)
    request = asyncio.create_task(four.services[1].enc_keys(1001, "4001", KeyRequest()))
    await asyncio.wait_for(forwarded.wait(), 5)
    # Forwarded, not committed: KMEs 3 and 4 answer (the key is stored at KME 4), KME 2's blocks are still
    # free, and KME 1 has no answer.
    for _ in range(100):
        if any(m.sender == 2 and m.status for m in four.sent):
            break
        await asyncio.sleep(0.01)
    assert [(m.sender, m.receiver, m.status) for m in four.sent if m.sender > 1] == [(2, 3, 200), (3, 4, 200)]
    assert await two.store.free_blocks(1, 0) == stock
    assert not request.done()
    # The same message again while the first is in flight: refused at once, nothing forwarded twice.
    hop = next(m for m in four.sent if (m.sender, m.receiver) == (1, 2))
    with pytest.raises(KmeError) as info:
        await two.accept_relay(1, hop.body, base64.b64encode(hop.tag).decode())
    assert info.value.status == 409
    assert len([m for m in four.sent if m.sender == 2]) == 1
    release.set()
    sent = await asyncio.wait_for(request, 5)
    assert committed.is_set()
    assert await two.store.free_blocks(1, 0) == stock - 3  # 2 MAC blocks + 1 key block
    got = await four.services[4].dec_keys(4001, "1001", [sent.keys[0].key_ID])
    assert got.keys[0].key == sent.keys[0].key
    assert two.relay_stats()["hops"] == {"accepted": 1, "replay": 1}


async def test_a_second_message_leaves_only_when_four_items_wait(four: Net) -> None:
    """One message per path in flight; a second one only once enough requests wait to fill it."""
    two = four.services[2]
    release = asyncio.Event()
    accept = two.accept_relay

    async def held(caller: int, body: bytes, tag: str | None) -> Any:
        await release.wait()
        return await accept(caller, body, tag)

    two.accept_relay = held  # type: ignore[method-assign]

    def messages() -> list[int]:
        return [len(decode_message(m.body).items) for m in four.sent if (m.sender, m.receiver) == (1, 2)]

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    one = four.services[1]
    requests = [asyncio.create_task(one.enc_keys(1001, "4001", KeyRequest()))]
    await settle()
    assert messages() == [1]
    requests += [asyncio.create_task(one.enc_keys(1001, "4001", KeyRequest())) for _ in range(3)]
    await settle()
    assert messages() == [1]  # three wait: not worth a second message yet
    requests.append(asyncio.create_task(one.enc_keys(1001, "4001", KeyRequest())))
    await settle()
    assert messages() == [1, 4]
    requests += [asyncio.create_task(one.enc_keys(1001, "4001", KeyRequest())) for _ in range(5)]
    await settle()
    assert messages() == [1, 4]  # two in flight: the rest waits for one of them
    release.set()
    sent = await asyncio.wait_for(asyncio.gather(*requests), 10)
    assert sorted(messages()) == [1, 4, 5]
    ids = [c.keys[0].key_ID for c in sent]
    got = await four.services[4].dec_keys(4001, "1001", ids)
    assert [k.key for k in got.keys] == [c.keys[0].key for c in sent]


def _item(path: tuple[int, ...], **kw: object) -> RelayItem:
    fields: dict[str, object] = dict(
        relay_id="6f1c4c63-5a3b-4e0c-9c53-0d5e3c6c9a11",
        mode="trusted",
        path=path,
        master_sae=1001,
        slaves=(4001,),
        size=256,
        key_ids=("0b3c1a52-8f0e-4b1f-9a0c-5a7b8c9d0e1f",),
        pad=(4,),
        data=bytes(32),
    )
    fields.update(kw)
    return RelayItem(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ((1, 2, 3, 2, 4), "names a KME twice"),
        ((1, 2, 4), "does not pass through KME 3"),  # misrouted
        ((1, 3, 4), "does not reach KME 3 from KME 2"),
        ((2, 3, 9), "has no link with KME 3"),
        ((1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), "more than 8 hops"),
    ],
)
async def test_looping_or_misrouted_messages_are_400_with_nothing_consumed(
    four: Net, path: tuple[int, ...], message: str
) -> None:
    mac = [Block(seq, four.block(2, 3, seq)) for seq in (0, 2)]
    sealed = seal(2, 3, mac, 5000, [_item(path)])
    stock = await four.services[3].store.free_blocks(2, 0)
    with pytest.raises(BadRequestError, match=message):
        await four.services[3].accept_relay(2, sealed.body, base64.b64encode(sealed.tag).decode())
    assert await four.services[3].store.free_blocks(2, 0) == stock


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b"{}",
        b'{"version": 1}',
        b"\xff\xfe",
        b'{"version":1,"link":[2,3],"mac_blocks":[0,2],"budget_ms":100,"items":[{}]}',
        b'{"version":1,"link":[2,3],"mac_blocks":[0,2],"budget_ms":100,"items":[]}',
        json.dumps(
            {"version": 1, "link": [2, 3], "mac_blocks": [0, 2], "budget_ms": 1, "items": [1] * 300}
        ).encode(),
    ],
)
async def test_malformed_messages_are_400(four: Net, body: bytes) -> None:
    stock = await four.services[3].store.free_blocks(2, 0)
    with pytest.raises(BadRequestError):
        await four.services[3].accept_relay(2, body, base64.b64encode(bytes(16)).decode())
    assert await four.services[3].store.free_blocks(2, 0) == stock


async def test_blocks_of_the_wrong_direction_or_named_twice_are_400(four: Net) -> None:
    for mac_seqs, pad in (((0, 1), (4,)), ((0, 2), (2,)), ((0, 2), (5,))):
        mac = [Block(seq, four.block(2, 3, seq)) for seq in mac_seqs]
        sealed = seal(2, 3, mac, 5000, [_item((1, 2, 3, 4), pad=pad)])
        with pytest.raises(BadRequestError):
            await four.services[3].accept_relay(2, sealed.body, base64.b64encode(sealed.tag).decode())


async def test_the_decoder_round_trips(four: Net) -> None:
    item = _item((1, 2, 3, 4))
    msg = HopMessage(2, 3, (0, 2), 100, (item,))
    again = decode_message(msg.encode())
    assert again == msg


async def test_shamir_spread_no_two_intermediates_learn_the_key(tmp_path: Path) -> None:
    """Four node-disjoint paths 1-k-6 (k = 2..5), Shamir 3-of-4: what each intermediate received, opened with
    its own link material, is one share; any three shares rebuild the key; any two are consistent with
    every value of the key (here: every value of its first byte)."""
    links = [(1, k) for k in (2, 3, 4, 5)] + [(k, 6) for k in (2, 3, 4, 5)]
    net = await network(tmp_path, links)
    try:
        sent = await net.services[1].enc_keys(1001, "6001", spread(4, 3))
        key = b"".join(k.key for k in sent.keys)
        seen: dict[int, list[tuple[int, bytes]]] = {}
        for m in net.sent:
            if m.receiver == 6:
                continue
            for item in decode_message(m.body).items:
                assert item.share is not None and item.share.scheme == "shamir" and not item.blocks
                pad = b"".join(net.block(m.sender, m.receiver, s) for s in item.pad)[: len(item.data)]
                seen.setdefault(m.receiver, []).append((item.share.x, xor(item.data, pad)))
        assert sorted(seen) == [2, 3, 4, 5] and all(len(v) == 1 for v in seen.values())
        points = [v[0] for v in seen.values()]
        assert len({x for x, _ in points}) == 4 and key not in {y for _, y in points}
        for trio in itertools.combinations(points, 3):
            assert sharing.shamir_combine(list(trio)) == key
        for pair in itertools.combinations(points, 2):
            known = [(x, y[0]) for x, y in pair]
            for candidate in range(256):
                # The polynomial through the pair's first bytes and this key byte gives a complete 3-of-4
                # sharing that agrees with everything the two saw.
                curve = [(0, candidate), *known]
                full = [(x, bytes([_lagrange(curve, x)])) for x in range(1, 5)]
                assert all(full[x - 1][1] == bytes([y]) for x, y in known)
                assert sharing.shamir_consistent(full, 3)
                assert sharing.shamir_combine(full[:3]) == bytes([candidate])
    finally:
        await net.close()


def _lagrange(points: list[tuple[int, int]], at: int) -> int:
    """The polynomial through ``points`` (x, byte) over GF(2^8), evaluated at ``at``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        weight = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                weight = sharing.gf_mul(weight, sharing.gf_div(at ^ xj, xi ^ xj))
        total ^= sharing.gf_mul(yi, weight)
    return total
