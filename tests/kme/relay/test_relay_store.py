"""The key store's relay operations on real SQLite files and a real PostgreSQL server: spending held blocks
durably, accepting a hop message in one transaction (named blocks, held blocks, deliveries), shares that
rebuild a key, disagree, or arrive twice."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from qkdtls.kme.relay import sharing
from qkdtls.kme.store import (
    DELIVERED,
    EXISTS,
    INCONSISTENT,
    MISMATCH,
    QUOTA,
    BlocksTaken,
    KeysNotFound,
    KeyStore,
    LostHold,
    RelayDecision,
    RelayIntake,
    RelayKeys,
    RelayShares,
    StoredKey,
    open_store,
)

PEER = 2  # link to KME 2; this store is KME 3's: KME 2 draws direction 0 on it, KME 3 direction 1
MASTER, SLAVE = 1001, 3001


async def feed(store: KeyStore, blocks: int, link: int = PEER) -> bytes:
    data = os.urandom(32 * blocks)
    await store.import_file(link, "0001.key", data, hashlib.sha256(data).hexdigest(), 32, local=False)
    return data


def keys(n: int, size: int = 32) -> list[StoredKey]:
    return [StoredKey(f"00000000-0000-4000-8000-{i:012d}", os.urandom(size)) for i in range(n)]


def relay_keys(stored: list[StoredKey], **kw: object) -> RelayKeys:
    fields: dict[str, object] = dict(
        keys=stored,
        master_sae=MASTER,
        slaves=(SLAVE,),
        pending=(SLAVE,),
        size_bits=256,
        expires_at=time.time() + 60,
    )
    fields.update(kw)
    return RelayKeys(**fields)  # type: ignore[arg-type]


def shares(
    key_ids: list[str], values: list[bytes], x: int, k: int, n: int, scheme: str = "shamir"
) -> RelayShares:
    if scheme == "xor":
        combine = lambda s: sharing.xor_combine([v for _, v in s])  # noqa: E731
        consistent = lambda s: True  # noqa: E731
    else:
        combine = lambda s: sharing.shamir_combine(s[:k])  # noqa: E731
        consistent = lambda s: sharing.shamir_consistent(s, k)  # noqa: E731
    return RelayShares(
        key_ids=key_ids,
        values=values,
        x=x,
        k=k,
        n=n,
        scheme=scheme,
        master_sae=MASTER,
        slaves=(SLAVE,),
        pending=(SLAVE,),
        size_bits=256,
        expires_at=time.time() + 60,
        combine=combine,
        consistent=consistent,
    )


async def test_spend_held_deletes_durably_and_refuses_what_is_not_held(
    store: KeyStore, store_url: str
) -> None:
    await feed(store, 16)
    held = await store.hold_blocks(PEER, 1, 3)
    await store.spend_held({PEER: [b.seq for b in held]})
    assert await store.free_blocks(PEER, 1) == 5
    with pytest.raises(LostHold):
        await store.spend_held({PEER: [b.seq for b in held]})  # gone: never spent twice
    other = await store.hold_blocks(PEER, 1, 2)
    assert {b.seq for b in other}.isdisjoint(b.seq for b in held)
    with pytest.raises(LostHold):  # one of them not held: nothing changes
        await store.spend_held({PEER: [other[0].seq, 0]})
    assert await store.free_blocks(PEER, 1) == 3
    await store.close()
    reopened = open_store(store_url)
    try:  # a restart may free holds (SQLite at once, PostgreSQL when stale), never spent blocks
        again = await reopened.hold_blocks(PEER, 1, 3)
        assert {b.seq for b in again}.isdisjoint(b.seq for b in held)
    finally:
        await reopened.close()


async def test_accept_consumes_named_and_held_blocks_in_one_transaction(store: KeyStore) -> None:
    stream = await feed(store, 16)
    out = await store.hold_blocks(PEER, 1, 2)  # what this KME will send next
    seen: list[dict[int, bytes]] = []

    def decide(data: dict[int, bytes]) -> RelayDecision:
        seen.append(data)
        return RelayDecision([relay_keys(keys(2))], opened="values")

    intake = RelayIntake(PEER, 0, [0, 2, 4], {PEER: [b.seq for b in out]})
    decision, outcomes = await store.relay_accept(intake, decide)
    assert decision is not None and decision.opened == "values" and outcomes == [DELIVERED]
    assert seen[-1] == {s: stream[s * 32 : (s + 1) * 32] for s in (0, 2, 4)}
    stats = await store.link_stats(PEER)
    assert stats.free_blocks == {0: 5, 1: 6} and stats.reserved_keys == 2
    # A replay names blocks that are gone: refused, and nothing at all changes.
    more = await store.hold_blocks(PEER, 1, 1)
    with pytest.raises(BlocksTaken):
        await store.relay_accept(RelayIntake(PEER, 0, [4, 6], {PEER: [more[0].seq]}), decide)
    assert (await store.link_stats(PEER)).free_blocks == {0: 5, 1: 5}  # 6 minus the one still held
    await store.release_blocks(PEER, [more[0].seq])
    assert await store.free_blocks(PEER, 1) == 6


async def test_reading_named_blocks_changes_nothing(store: KeyStore) -> None:
    """What an intermediate reads before it forwards: the bytes of free blocks of the sender's direction;
    blocks used, of the other direction or named twice are refused; the later accept consumes them."""
    stream = await feed(store, 16)
    assert await store.read_named(PEER, 0, [2, 6]) == {2: stream[64:96], 6: stream[192:224]}
    assert (await store.link_stats(PEER)).free_blocks == {0: 8, 1: 8}
    for seqs, direction in (([2, 2], 0), ([3], 0), ([2], 1), ([40], 0)):
        with pytest.raises(BlocksTaken):
            await store.read_named(PEER, direction, seqs)
    decision, _ = await store.relay_accept(RelayIntake(PEER, 0, [2, 6]), lambda d: RelayDecision([], d))
    assert decision is not None and decision.opened == {2: stream[64:96], 6: stream[192:224]}
    with pytest.raises(BlocksTaken):
        await store.read_named(PEER, 0, [2])
    assert (await store.link_stats(PEER)).free_blocks == {0: 6, 1: 8}


async def test_a_message_that_fails_authentication_burns_only_what_it_named(store: KeyStore) -> None:
    await feed(store, 16)
    out = await store.hold_blocks(PEER, 1, 2)
    intake = RelayIntake(PEER, 0, [0, 2], {PEER: [b.seq for b in out]})
    decision, outcomes = await store.relay_accept(intake, lambda data: None)
    assert decision is None and outcomes == []
    stats = await store.link_stats(PEER)
    assert stats.free_blocks[0] == 6 and stats.burnt_blocks == 2
    assert await store.release_blocks(PEER, [b.seq for b in out]) == 2  # still held: never sent
    assert await store.free_blocks(PEER, 1) == 8


async def test_deliveries_are_each_all_or_nothing(store: KeyStore) -> None:
    await feed(store, 32)
    first = keys(2)
    await store.relay_accept(RelayIntake(PEER, 0, [0]), lambda d: RelayDecision([relay_keys(first)]))
    fresh = keys(3)[2:]
    decision = RelayDecision(
        [
            relay_keys([first[0], *fresh]),  # a key ID already stored: this delivery changes nothing
            relay_keys(fresh, max_uncollected=2),  # 2 uncollected already: over the quota
            relay_keys(fresh),
        ]
    )
    _, outcomes = await store.relay_accept(RelayIntake(PEER, 0, [2]), lambda d: decision)
    assert outcomes == [EXISTS, QUOTA, DELIVERED]
    assert await store.uncollected_by_master() == {MASTER: 3}
    got = await store.collect(MASTER, SLAVE, [first[0].key_id, fresh[0].key_id])
    assert [k.data for k in got] == [first[0].data, fresh[0].data]


async def test_relayed_keys_wait_only_for_the_slaves_of_this_kme(store: KeyStore) -> None:
    await feed(store, 8)
    stored = keys(1)
    delivery = relay_keys(stored, slaves=(4001, SLAVE), pending=(SLAVE,))
    await store.relay_accept(RelayIntake(PEER, 0, [0]), lambda d: RelayDecision([delivery]))
    got = await store.collect(MASTER, SLAVE, [stored[0].key_id])
    assert got[0].slaves == (4001, SLAVE)  # the holders, in request order
    assert await store.uncollected_by_master() == {}  # collected by every slave of this KME
    with pytest.raises(KeysNotFound):
        await store.collect(MASTER, SLAVE, [stored[0].key_id])


async def test_shamir_shares_rebuild_check_and_erase(store: KeyStore) -> None:
    await feed(store, 64)
    secret = os.urandom(32)
    split = sharing.shamir_split(secret, 2, 3)
    kid = ["00000000-0000-4000-8000-00000000abcd"]
    seq = iter(range(0, 128, 2))

    async def arrive(delivery: RelayShares) -> str:
        _, outcomes = await store.relay_accept(
            RelayIntake(PEER, 0, [next(seq)]), lambda d: RelayDecision([delivery])
        )
        return outcomes[0]

    x1, y1 = split[0]
    assert await arrive(shares(kid, [y1], x1, 2, 3)) == DELIVERED
    with pytest.raises(KeysNotFound):  # one share is not a key
        await store.collect(MASTER, SLAVE, kid, recollect_window=60)
    assert await arrive(shares(kid, [y1], x1, 2, 3)) == EXISTS  # the same share twice
    assert await arrive(shares(kid, [y1], 2, 2, 4)) == MISMATCH  # another sharing
    x2, y2 = split[1]
    assert await arrive(shares(kid, [y2], x2, 2, 3)) == DELIVERED
    got = await store.collect(MASTER, SLAVE, kid, recollect_window=60)
    assert got[0].data == secret
    # A third share off the polynomial: the key is erased (even for its slave), never delivered corrupt.
    x3, y3 = split[2]
    assert await arrive(shares(kid, [bytes(a ^ 1 for a in y3)], x3, 2, 3)) == INCONSISTENT
    with pytest.raises(KeysNotFound):
        await store.collect(MASTER, SLAVE, kid, recollect_window=60)


async def test_xor_shares_rebuild_when_all_arrived_and_expire_otherwise(store: KeyStore) -> None:
    await feed(store, 64)
    parts = [os.urandom(32) for _ in range(3)]
    kid = ["00000000-0000-4000-8000-00000000beef"]
    for i, part in enumerate(parts[:2]):
        delivery = shares(kid, [part], i + 1, 3, 3, "xor")
        _, outcomes = await store.relay_accept(
            RelayIntake(PEER, 0, [2 * i]), lambda d, x=delivery: RelayDecision([x])
        )
        assert outcomes == [DELIVERED]
    swept = await store.expire(time.time() + 3600)  # the third never came: the two shares go
    assert swept.expired == []
    delivery = shares(kid, [parts[2]], 3, 3, 3, "xor")
    _, outcomes = await store.relay_accept(RelayIntake(PEER, 0, [4]), lambda d: RelayDecision([delivery]))
    assert outcomes == [DELIVERED]
    with pytest.raises(KeysNotFound):  # the first two shares expired: no key
        await store.collect(MASTER, SLAVE, kid)
    other = ["00000000-0000-4000-8000-00000000cafe"]
    for i, part in enumerate(parts):
        delivery = shares(other, [part], i + 1, 3, 3, "xor")
        await store.relay_accept(RelayIntake(PEER, 0, [6 + 2 * i]), lambda d, x=delivery: RelayDecision([x]))
    got = await store.collect(MASTER, SLAVE, other)
    assert got[0].data == sharing.xor_combine(parts)
