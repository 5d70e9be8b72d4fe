"""Key stores: blocks per link, keys awaiting their slaves, the import ledger and counters.

``open_store`` picks the backend from a URL: ``sqlite:///path/to/db.sqlite3`` (absolute path),
``sqlite://relative.sqlite3``, ``sqlite://:memory:`` or ``postgresql://...`` (psycopg 3 conninfo URL).
"""

from __future__ import annotations

from qkdtls.kme.store.base import (
    DELIVERED,
    EXISTS,
    INCONSISTENT,
    MISMATCH,
    QUOTA,
    Block,
    BlocksTaken,
    ImportRejected,
    KeysNotFound,
    KeyStore,
    LinkStats,
    LostHold,
    MulticastRefused,
    NewKeySpec,
    NotASlave,
    RelayDecision,
    RelayIntake,
    RelayKeys,
    RelayShares,
    ShortStock,
    StoredKey,
    StoreError,
    StoreUnavailable,
    Swept,
    UncollectedQuota,
)

__all__ = [
    "DELIVERED",
    "EXISTS",
    "INCONSISTENT",
    "MISMATCH",
    "QUOTA",
    "Block",
    "BlocksTaken",
    "ImportRejected",
    "KeyStore",
    "KeysNotFound",
    "LinkStats",
    "LostHold",
    "MulticastRefused",
    "NewKeySpec",
    "NotASlave",
    "RelayDecision",
    "RelayIntake",
    "RelayKeys",
    "RelayShares",
    "ShortStock",
    "StoreError",
    "StoreUnavailable",
    "StoredKey",
    "Swept",
    "UncollectedQuota",
    "open_store",
]


def open_store(url: str) -> KeyStore:
    """Open (creating the schema if needed) the store named by ``url``; ValueError for an unknown scheme."""
    if url.startswith("sqlite://"):
        from qkdtls.kme.store.sqlite import SqliteKeyStore

        path = url.removeprefix("sqlite://")
        if not path:
            raise ValueError("sqlite URL needs a path, e.g. sqlite:///var/lib/qkdtls/kme.sqlite3")
        return SqliteKeyStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        from qkdtls.kme.store.postgres import PostgresKeyStore

        return PostgresKeyStore(url)
    raise ValueError(f"unsupported key store URL scheme in {url.split(':', 1)[0]!r}")
