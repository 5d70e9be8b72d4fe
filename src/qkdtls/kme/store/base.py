"""The key store contract: what the service and the ingestor need from persistent storage.

Every method is one atomic transaction. Key bytes live only in the store and in return values; the errors
below never carry them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class StoreError(Exception):
    """Base of the store's typed refusals."""


class StoreUnavailable(StoreError):
    """The database failed or is busy; nothing was changed."""


class ShortStock(StoreError):
    def __init__(self, available: int) -> None:
        super().__init__(f"only {available} free blocks")
        self.available = available


class BlocksTaken(StoreError):
    """Some blocks of a reservation are not free (used, burnt, held or never imported)."""


class LostHold(StoreError):
    """Held blocks were released behind our back (stale-hold recovery); the key must not be delivered."""


class KeysNotFound(StoreError):
    """A key ID is unknown, already collected by this slave, or belongs to another master."""


class NotASlave(StoreError):
    """The key exists for that master but the caller is not one of its slaves."""


class UncollectedQuota(StoreError):
    """Recording the keys would leave their master with more than ``limit`` keys not collected yet."""

    def __init__(self, uncollected: int, limit: int) -> None:
        super().__init__(f"{uncollected} keys not collected yet (limit {limit})")
        self.uncollected = uncollected
        self.limit = limit


class MulticastRefused(StoreError):
    """A key with several slaves was asked for by a slave that takes only keys of one master and one slave."""


class ImportRejected(StoreError):
    """A key file cannot be appended to the link's stream (name reused with other content, out of order,
    or another block size); the file is left in place."""


@dataclass(frozen=True, slots=True, repr=False)
class Block:
    seq: int
    data: bytes

    def __repr__(self) -> str:
        return f"Block(seq={self.seq})"


@dataclass(frozen=True, slots=True, repr=False)
class StoredKey:
    key_id: str
    data: bytes
    # The key's slave SAEs in request order (filled by ``collect``; the caller knows them elsewhere).
    slaves: tuple[int, ...] = ()
    # ``collect``: this slave had collected it before (a re-collection within its window).
    again: bool = False

    def __repr__(self) -> str:
        return f"StoredKey(key_id={self.key_id!r})"


@dataclass(frozen=True, slots=True)
class NewKeySpec:
    """A key to record on the slave side: ``blocks`` in concatenation order."""

    key_id: str
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True, repr=False)
class RelayKeys:
    """Relayed keys to record at their destination KME (trusted mode: the relay carried the keys)."""

    keys: Sequence[StoredKey]
    master_sae: int
    slaves: tuple[int, ...]  # every holder, in request order (the ``key_extension``)
    pending: tuple[int, ...]  # the slaves attached to this KME: the key waits for them
    size_bits: int
    expires_at: float
    max_uncollected: int = 0

    def __repr__(self) -> str:
        return f"RelayKeys(keys={len(self.keys)})"


@dataclass(frozen=True, slots=True, repr=False)
class RelayShares:
    """One share of each of some relayed keys (spread mode), to keep until enough shares rebuild each key.

    ``combine(shares)`` rebuilds a key from ``k`` shares ``(x, value)``; ``consistent(shares)`` says whether
    more than ``k`` shares lie on one sharing. Both are pure (``kme/relay/sharing.py``)."""

    key_ids: Sequence[str]
    values: Sequence[bytes]
    x: int
    k: int
    n: int
    scheme: str
    master_sae: int
    slaves: tuple[int, ...]
    pending: tuple[int, ...]
    size_bits: int
    expires_at: float
    combine: Callable[[list[tuple[int, bytes]]], bytes]
    consistent: Callable[[list[tuple[int, bytes]]], bool]
    max_uncollected: int = 0

    def __repr__(self) -> str:
        return f"RelayShares(keys={len(self.key_ids)}, x={self.x})"


# What happened to one delivery of :meth:`KeyStore.relay_accept`.
DELIVERED = "delivered"  # keys stored, or the share stored (and the key rebuilt once k shares arrived)
EXISTS = "exists"  # a key ID (or this share of it) is stored already: nothing changed for this delivery
QUOTA = "quota"  # the master SAE would have too many keys not collected here: nothing changed
INCONSISTENT = "inconsistent"  # the shares of a key disagree: its key and shares are erased (burnt)
MISMATCH = "mismatch"  # the share's metadata (holders, size, sharing) differs from its siblings'


@dataclass(frozen=True, slots=True)
class RelayIntake:
    """The link material one received hop message consumes, in one transaction.

    ``seqs``: blocks the sender named (its ``direction`` of ``link``), which must all be free here;
    ``spend``: blocks this instance holds (per link) for the messages it sends next and for nothing else."""

    link: int
    direction: int
    seqs: Sequence[int]
    spend: Mapping[int, Sequence[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, repr=False)
class RelayDecision:
    """What :meth:`KeyStore.relay_accept`'s ``decide`` makes of the named blocks' bytes: the deliveries to
    record (destination items) and anything else the caller needs back (opened values, the answer key)."""

    deliveries: Sequence[RelayKeys | RelayShares]
    opened: Any = None

    def __repr__(self) -> str:
        return f"RelayDecision(deliveries={len(self.deliveries)})"


@dataclass(frozen=True, slots=True)
class LinkStats:
    link: int
    free_blocks: dict[int, int]
    reserved_keys: int  # waiting for at least one slave
    imported_bytes: int
    burnt_blocks: int
    expired_keys: int
    histogram: tuple[int, ...] = field(default=(0,) * 256)
    recollectable_keys: int = 0  # collected by every slave, kept for the re-collection window


@dataclass(frozen=True, slots=True)
class Swept:
    """What one :meth:`KeyStore.expire` deleted, as (link, key ID) pairs."""

    expired: list[tuple[int, str]]  # some slave never collected it within its reservation TTL
    erased: list[tuple[int, str]]  # collected by every slave; the re-collection window ended


class KeyStore(abc.ABC):
    """Blocks per link, reserved keys awaiting their slaves, the import ledger and counters.

    ``link`` is the peer KME ID (this KME's own ID for the local link). Peer-link blocks carry direction
    ``seq % 2``; local-link blocks all carry direction 0.
    """

    @abc.abstractmethod
    async def import_file(
        self,
        link: int,
        name: str,
        data: bytes,
        sha256: str,
        block_size: int,
        *,
        local: bool,
        offset: int = 0,
        total: int | None = None,
    ) -> int | None:
        """Append a key file, or its part ``data`` at ``offset`` of ``total`` bytes, to the link's stream.

        Returns the bytes imported, or None if the ledger already has them. ``sha256`` is the whole file's.
        The ledger row of a file counts the bytes imported so far (its ``size``), so a file can be imported
        in parts, one transaction each, and a restart resumes after the last committed part.
        """

    @abc.abstractmethod
    async def import_progress(self, link: int, name: str) -> tuple[int, str] | None:
        """(bytes imported so far, sha256 of the whole file) from the ledger, or None if it has no row."""

    @abc.abstractmethod
    async def hold_blocks(self, link: int, direction: int, count: int) -> list[Block]:
        """Mark the ``count`` oldest free blocks of a direction as held by this store instance."""

    @abc.abstractmethod
    async def release_blocks(self, link: int, seqs: Sequence[int]) -> int:
        """Make blocks held by this instance free again; returns how many were still held."""

    @abc.abstractmethod
    async def consume_held(self, link: int, seqs: Sequence[int]) -> None:
        """Delete held blocks (the key was reserved at the peer). LostHold if any is no longer ours."""

    @abc.abstractmethod
    async def burn_held(self, link: int, seqs: Sequence[int]) -> int:
        """Delete held blocks that the peer has already used; they are never handed out."""

    @abc.abstractmethod
    async def take_reserved(
        self,
        link: int,
        direction: int,
        keys: Sequence[NewKeySpec],
        master_sae: int,
        slaves: Sequence[int],
        size_bits: int,
        expires_at: float,
        *,
        max_uncollected: int = 0,
    ) -> None:
        """Slave side of a reservation: consume the named free blocks and record the keys. BlocksTaken if any
        block is not free or a key ID exists; UncollectedQuota if the master would then have more than
        ``max_uncollected`` (> 0) keys not collected here; either way nothing changes."""

    @abc.abstractmethod
    async def spend_held(self, spend: Mapping[int, Sequence[int]]) -> None:
        """Delete held blocks (per link) durably, before anything made with them leaves this process (a relay
        message's pads and MAC keys, and the blocks it names): committed when this returns. LostHold if any
        block is no longer held by this instance; then nothing changes."""

    @abc.abstractmethod
    async def read_named(self, link: int, direction: int, seqs: Sequence[int]) -> dict[int, bytes]:
        """The bytes of named free blocks of a direction (the sender's), changing nothing: what a relay hop
        needs to verify and open a message before :meth:`relay_accept` consumes the same blocks. BlocksTaken
        unless every one is free and named once."""

    @abc.abstractmethod
    async def relay_accept(
        self, intake: RelayIntake, decide: Callable[[dict[int, bytes]], RelayDecision | None]
    ) -> tuple[RelayDecision | None, list[str]]:
        """Receive a relay hop message in one transaction: consume the named free blocks of the sender's
        direction, call ``decide`` with their bytes (it verifies the message's MAC and opens its items), then
        consume the held ``spend`` blocks and record the deliveries, each all-or-nothing (one outcome per
        delivery: DELIVERED, EXISTS, QUOTA, INCONSISTENT, MISMATCH).

        BlocksTaken if a named block is not free (a replay, or blocks already used): nothing changes.
        ``decide`` returning None (the MAC does not verify) commits the consumption of the named blocks alone:
        a tampered message burns what it named. ``decide`` must be a pure function of its argument (a batch
        may run again)."""

    @abc.abstractmethod
    async def take_local(
        self,
        link: int,
        count: int,
        blocks_per_key: int,
        size_bits: int,
        make_id: Callable[[bytes], str],
        master_sae: int,
        slaves: Sequence[int],
        expires_at: float,
        *,
        max_uncollected: int = 0,
    ) -> list[StoredKey]:
        """Local pair: consume blocks, record the keys for the slaves and return them for the master
        (ShortStock, UncollectedQuota: nothing changes)."""

    @abc.abstractmethod
    async def collect(
        self,
        master_sae: int,
        slave_sae: int,
        key_ids: Sequence[str],
        *,
        unicast_only: bool = False,
        recollect_window: float = 0.0,
    ) -> list[StoredKey]:
        """All-or-nothing delivery to a slave: NotASlave / KeysNotFound and nothing changes. With
        ``unicast_only`` a key with more than one slave is refused (MulticastRefused), nothing changes.

        With ``recollect_window`` > 0 a first collection records that this slave may collect the key again
        until ``recollect_window`` seconds from now, and the key stays stored (not awaited any more) until
        the last of its slaves' windows ends; a collection by that slave within its window returns the same
        bytes and changes nothing. With 0 the key is deleted once its last slave collected it."""

    @abc.abstractmethod
    async def expire(self, now: float, limit: int = 1000) -> Swept:
        """Delete up to ``limit`` keys whose reservation TTL or re-collection window ended before ``now``."""

    @abc.abstractmethod
    async def uncollected_by_master(self) -> dict[int, int]:
        """Keys stored here and not yet collected by every slave, per master SAE (the quota's counter)."""

    @abc.abstractmethod
    async def release_stale_holds(self, held_before: float, limit: int = 10_000) -> int:
        """Free blocks held since before ``held_before`` by any instance (a crashed process)."""

    @abc.abstractmethod
    async def free_blocks(self, link: int, direction: int) -> int: ...

    @abc.abstractmethod
    async def link_stats(self, link: int) -> LinkStats: ...

    @abc.abstractmethod
    async def close(self) -> None: ...
