"""The key store contract: what the service and the ingestor need from persistent storage.

Every method is one atomic transaction. Key bytes live only in the store and in return values; the errors
below never carry them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


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

    def __repr__(self) -> str:
        return f"StoredKey(key_id={self.key_id!r})"


@dataclass(frozen=True, slots=True)
class NewKeySpec:
    """A key to record on the slave side: ``blocks`` in concatenation order."""

    key_id: str
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LinkStats:
    link: int
    free_blocks: dict[int, int]
    reserved_keys: int
    imported_bytes: int
    burnt_blocks: int
    expired_keys: int
    histogram: tuple[int, ...] = field(default=(0,) * 256)


class KeyStore(abc.ABC):
    """Blocks per link, reserved keys awaiting their slaves, the import ledger and counters.

    ``link`` is the peer KME ID (this KME's own ID for the local link). Peer-link blocks carry direction
    ``seq % 2``; local-link blocks all carry direction 0.
    """

    @abc.abstractmethod
    async def import_file(
        self, link: int, name: str, data: bytes, sha256: str, block_size: int, *, local: bool
    ) -> int | None:
        """Append a key file to the link's stream; bytes imported, or None if the ledger already has it."""

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
    ) -> None:
        """Slave side of a reservation: consume the named free blocks and record the keys. BlocksTaken if any
        block is not free or a key ID exists; then nothing changes."""

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
    ) -> list[StoredKey]:
        """Local pair: consume blocks, record the keys for the slaves and return them for the master."""

    @abc.abstractmethod
    async def collect(
        self, master_sae: int, slave_sae: int, key_ids: Sequence[str], *, unicast_only: bool = False
    ) -> list[StoredKey]:
        """All-or-nothing delivery to a slave: NotASlave / KeysNotFound and nothing changes. With
        ``unicast_only`` a key with more than one slave is refused (MulticastRefused), nothing changes."""

    @abc.abstractmethod
    async def expire(self, now: float, limit: int = 10_000) -> list[tuple[int, str]]:
        """Delete keys whose ``expires_at`` passed; returns (link, key ID) pairs."""

    @abc.abstractmethod
    async def release_stale_holds(self, held_before: float, limit: int = 10_000) -> int:
        """Free blocks held since before ``held_before`` by any instance (a crashed process)."""

    @abc.abstractmethod
    async def free_blocks(self, link: int, direction: int) -> int: ...

    @abc.abstractmethod
    async def link_stats(self, link: int) -> LinkStats: ...

    @abc.abstractmethod
    async def close(self) -> None: ...
